"""`qkvcomm bench gpu` (`make bench-gpu`): the card path on a device, on a model of a real shape with
random weights (only shapes and speed matter here, not answers), in one command and one JSON.

    codec   per codec: encode from the device's KV to packed host bytes (`build_card`), and decode
            from those bytes into the device's KV through the receiver's validating reader
            (`ReceiverEngine.decode`), in GB/s of fp16-equivalent KV (the codec's speed as a card
            path sees it: host copies, checksums and framing included)
    ttft    per context length: the receiver's time to the first token with the card held in host
            memory (decode into the device, then one forward pass over the question) against
            re-prefilling the context and the question; the sender's prefill and encode beside them

Shapes (`SHAPES`) are the models' published configurations; the weights are made at start on the
device. `--shape tiny --device cpu` is the dry run `make test` runs. Each timing is the best of
`--repeats`, with the device synchronised around it.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.codec import registry
from qkv_core.config import StoreConfig
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.model.kv import prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.loading import model_source, wrap
from qkv_core.types import KVCache
from qkv_eval.bench import machine

# Llama-3.1-8B's configuration (its config.json: 32 layers, 8 KV heads of 128, GQA 4:1, RoPE theta
# 500,000; the llama3 frequency scaling left out: a shape, not a checkpoint); tiny: the dry run.
SHAPES = {
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 4096},
}
CODECS = ("fp16", "int8", "kivi-4", "kivi-2+rot+prerope")  # budget-B needs the model's calibrated profile
QUESTION_TOKENS = 16


@dataclass
class CodecRow:
    codec: str
    tokens: int
    bits_per_element: float
    encode_gbps: float
    decode_gbps: float


@dataclass
class TtftRow:
    tokens: int
    codec: str
    sender_prefill_s: float
    encode_s: float
    wire_bytes: int
    card_decode_s: float
    ttft_card_s: float
    ttft_reprefill_s: float


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A Llama of `shape` with random weights made on `device` (the embedded model's tokenizer: the
    receiver's prompt format needs one; token ids here are random)."""
    config = LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in its dtype on the device: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    lm = wrap(f"random-{shape}", model, AutoTokenizer.from_pretrained(model_source("smollm2-135m", "")))
    with torch.inference_mode():
        prefill(lm, _ids(64, config.vocab_size, 0))  # kernels loaded before anything is timed
    return lm


def _timed(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """The best time of `repeats` runs, the device synchronised around each, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def _ids(tokens: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(2, min(vocab, 32000), (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def codec_rows(lm: LoadedModel, receiver: ReceiverEngine, codecs: list[str], tokens: int,
               repeats: int) -> list[CodecRow]:
    fp = lm.fingerprint
    gen = torch.Generator().manual_seed(1)
    shape = (fp.num_kv_heads, tokens, fp.head_dim)
    kv = KVCache([torch.randn(shape, generator=gen).to(lm.device, lm.dtype) for _ in range(fp.num_layers)],
                 [torch.randn(shape, generator=gen).to(lm.device, lm.dtype) for _ in range(fp.num_layers)])
    ids, fp16 = _ids(tokens, 1024, 1), kv.nbytes(2)
    rows = []
    for name in tqdm(codecs, desc="bench gpu: codecs", leave=False):
        plan = CardPlan(name, registry.resolve(name, fp.num_layers))
        encode_s, (header, blobs) = _timed(lambda: build_card(fp, ids, kv, plan), lm.device, repeats)  # noqa: B023
        stream = list(frames(header, blobs))
        decode_s, _ = _timed(lambda: receiver.decode(iter(stream)), lm.device, repeats)  # noqa: B023
        wire = sum(f.ByteSize() for f in stream)
        rows.append(CodecRow(name, tokens, 8 * wire / (fp16 / 2), fp16 / encode_s / 1e9, fp16 / decode_s / 1e9))
    return rows


def ttft_rows(lm: LoadedModel, receiver: ReceiverEngine, codec: str, lengths: list[int], repeats: int) -> list[TtftRow]:
    question = _ids(QUESTION_TOKENS, lm.model.config.vocab_size, 2)
    rows = []
    for tokens in tqdm(lengths, desc="bench gpu: ttft", leave=False):
        with torch.inference_mode():
            rows.append(_ttft_row(lm, receiver, codec, _ids(tokens, lm.model.config.vocab_size, tokens), question,
                                  repeats))
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()  # this length's caches are gone before the next one's
    return rows


def _ttft_row(lm: LoadedModel, receiver: ReceiverEngine, codec: str, ids: list[int], question: list[int],
              repeats: int) -> TtftRow:
    fp = lm.fingerprint
    prefill_s, (kv, _) = _timed(lambda: prefill(lm, ids), lm.device, 1)
    plan = CardPlan(codec, registry.resolve(codec, fp.num_layers))
    encode_s, (header, blobs) = _timed(lambda: build_card(fp, ids, kv, plan), lm.device, 1)
    stream = list(frames(header, blobs))
    decode_s, held = _timed(lambda: receiver.decode(iter(stream))[1], lm.device, repeats)
    first_s, _ = _timed(lambda: prefill(lm, question, held), lm.device, repeats)
    text_s, _ = _timed(lambda: prefill(lm, ids + question), lm.device, repeats)
    return TtftRow(len(ids), codec, prefill_s, encode_s, sum(f.ByteSize() for f in stream), decode_s,
                   decode_s + first_s, text_s)


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = random_model(args.shape, device, dtype)
    receiver = ReceiverEngine(lm, StoreConfig(store_bytes=1 << 40, hot_bytes=1 << 40), max_card_bytes=1 << 40)
    codecs = args.codecs.split(",") if args.codecs else list(CODECS)
    lengths = [int(n) for n in args.lengths.split(",")]
    codec = codec_rows(lm, receiver, codecs, args.tokens, args.repeats)
    ttft = ttft_rows(lm, receiver, args.codec, lengths, args.repeats)
    where = f"random-weight {args.shape} on {device} ({str(dtype).removeprefix('torch.')}); {machine()}"
    if args.json:
        args.json.write_text(json.dumps({"bench": "gpu", "shape": args.shape, "device": str(device), "machine": where,
                                         "codec": [asdict(r) for r in codec], "ttft": [asdict(r) for r in ttft]},
                                        indent=1))
    return table(args, where, codec, ttft)


def table(args: argparse.Namespace, where: str, codec: list[CodecRow], ttft: list[TtftRow]) -> str:
    lines = [f"`qkvcomm bench gpu --shape {args.shape} --device {args.device}`: {where}", "",
             f"Codec on the card path, {args.tokens:,}-token cache, best of {args.repeats}:", "",
             ("| codec | bits/elem (wire) | encode GB/s (device KV -> host card) | decode GB/s (host card -> "
              "device KV) |"), "|---|---|---|---|"]
    lines += [f"| {r.codec} | {r.bits_per_element:.2f} | {r.encode_gbps:.2f} | {r.decode_gbps:.2f} |" for r in codec]
    lines += ["", f"Time to first token, `{args.codec}` card held in host memory, against re-prefill:", "",
              ("| context tokens | sender prefill ms | encode ms | card MB | card decode ms | TTFT card ms | "
               "TTFT re-prefill ms | card / re-prefill |"), "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.tokens:,} | {r.sender_prefill_s * 1e3:.0f} | {r.encode_s * 1e3:.0f} | {r.wire_bytes / 1e6:.1f} | "
              f"{r.card_decode_s * 1e3:.0f} | {r.ttft_card_s * 1e3:.0f} | {r.ttft_reprefill_s * 1e3:.0f} | "
              f"{r.ttft_card_s / r.ttft_reprefill_s:.2f} |" for r in ttft]
    return "\n".join(lines)
