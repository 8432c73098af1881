"""The sender's work: prefill a context and turn its KV cache into a card."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import allocation
from . import codec as codecs
from .attention import attention_received
from .card import build_header, encode_layers
from .codec import LayerCodec
from .facts import FactCache, FactConfig
from .kv import KVCache, prefill
from .models import LoadedModel
from .prompt import PromptFormat, encode
from .wire import pb

PROBE_QUERIES = 32  # tokenmix: attention from the context's last tokens ranks its tokens


@dataclass
class PreparedCard:
    header: pb.CardHeader
    blobs: list[bytes]
    kv_fp16_bytes: int  # the fp16 KV of all layers of these tokens: the headline baseline
    kv_fp32_bytes: int
    prefill_s: float
    quantize_s: float  # allocation included
    facts_s: float = 0.0


class SenderEngine:
    def __init__(self, lm: LoadedModel, profile_path: Path | None = None):
        self.lm = lm
        self.prompt = PromptFormat.for_tokenizer(lm.tokenizer)
        self.profile_path = profile_path
        self._profile: allocation.Profile | None = None
        self._model_lock = threading.Lock()  # one prefill at a time: the attention probe rewires the model
        self.facts = FactCache()

    def profile(self) -> allocation.Profile:
        """The codec profile, calibrated on first use if no saved one exists."""
        if self._profile is None:
            self._profile = allocation.load_or_calibrate(self.lm, self.profile_path)
        return self._profile

    def context_ids(self, context: str) -> list[int]:
        if not context.strip():
            raise ValueError("the context is empty")
        return encode(self.lm.tokenizer, self.prompt.context_part(context))

    def prefill(self, ids: list[int], probe: bool = False) -> tuple[KVCache, torch.Tensor | None]:
        """The cache of `ids`, and with `probe` the attention each token receives (tokenmix)."""
        with self._model_lock:
            if not probe:
                return prefill(self.lm, ids)[0], None
            with attention_received(self.lm, PROBE_QUERIES) as received:
                kv, _ = prefill(self.lm, ids)
            return kv, torch.stack(received).mean(dim=0)

    def allocate(self, codec_name: str, kv: KVCache, importance: torch.Tensor | None) -> tuple[list[LayerCodec], list[int]]:
        """(per-layer codecs, salient token positions) for this cache."""
        kind = codecs.adaptive(codec_name)
        if kind is None:
            return codecs.resolve(codec_name, kv.num_layers), []
        allocator, bits = kind
        shapes = [tuple(k.shape) for k in kv.keys]
        if allocator == "seed-adaptive":
            with self._model_lock:
                return allocation.seed_adaptive(self.profile()), []
        if allocator == "budget":
            with self._model_lock:
                return allocation.budget(self.profile(), bits, shapes), []
        assert importance is not None
        return allocation.tokenmix(bits, shapes, importance)

    def prepare(self, context: str, codec_name: str, facts: FactConfig | None = None) -> PreparedCard:
        """Prefill, allocate, encode; with `facts`, extract them into the header too."""
        kind = codecs.adaptive(codec_name)
        if kind is None:
            codecs.resolve(codec_name, self.lm.num_layers)  # a bad name fails before the prefill
        ids = self.context_ids(context)
        start = time.perf_counter()
        kv, importance = self.prefill(ids, probe=kind is not None and kind[0] == "tokenmix")
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        layer_codecs, salient = self.allocate(codec_name, kv, importance)
        facts_start = time.perf_counter()
        extracted = self.facts.get(context, facts) if facts else None
        facts_s = time.perf_counter() - facts_start
        header = build_header(
            self.lm.fingerprint, ids, kv, codec_name, layer_codecs,
            facts=[pb.Fact(**asdict(f)) for f in extracted.facts] if extracted else (),
            fact_summary=extracted.summary if extracted else "", salient=salient,
        )
        blobs = encode_layers(kv, layer_codecs, salient)
        quantize_s = time.perf_counter() - start - facts_s
        return PreparedCard(header, blobs, kv.nbytes(2), kv.nbytes(4), prefill_s, quantize_s, facts_s)
