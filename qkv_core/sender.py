"""The sender's work: prefill a context and turn its KV cache into a card."""
from __future__ import annotations

import time
from dataclasses import dataclass

from . import codec as codecs
from .card import build_header, encode_layers
from .kv import prefill
from .models import LoadedModel
from .prompt import PromptFormat, encode
from .wire import pb


@dataclass
class PreparedCard:
    header: pb.CardHeader
    blobs: list[bytes]
    kv_fp16_bytes: int  # the fp16 KV of all layers of these tokens: the headline baseline
    kv_fp32_bytes: int
    prefill_s: float
    quantize_s: float


class SenderEngine:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.prompt = PromptFormat.for_tokenizer(lm.tokenizer)

    def context_ids(self, context: str) -> list[int]:
        if not context.strip():
            raise ValueError("the context is empty")
        return encode(self.lm.tokenizer, self.prompt.context_part(context))

    def prepare(self, context: str, codec_name: str) -> PreparedCard:
        layer_codecs = codecs.resolve(codec_name, self.lm.num_layers)
        ids = self.context_ids(context)
        start = time.perf_counter()
        kv, _ = prefill(self.lm, ids)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        header = build_header(self.lm.fingerprint, ids, kv, codec_name, layer_codecs)
        blobs = encode_layers(kv, layer_codecs)
        quantize_s = time.perf_counter() - start
        return PreparedCard(header, blobs, kv.nbytes(2), kv.nbytes(4), prefill_s, quantize_s)
