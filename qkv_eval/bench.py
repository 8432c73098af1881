"""`qkvcomm bench codec`: size, error and speed of every codec preset on a real KV cache."""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from qkv_core import malloc
from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.codec.encoding import encode_tensors, layer_salient, rope_removed, rope_restored
from qkv_core.codec.quant import dequantize
from qkv_core.codec.tools import ZSTD
from qkv_core.config import RuntimeConfig
from qkv_core.engine.sender import SenderEngine
from qkv_core.model.loading import load_model
from qkv_core.model.prompt import encode
from qkv_core.types import KVCache

CODECS = ("fp16", "int8", "seed-8", "seed-6", "seed-4", "seed-adaptive", "kivi-4", "kivi-3", "kivi-3+zstd", "kivi-2",
          "kivi-2+zstd", "kivi-2+rot", "kivi-2+rot+zstd", "kivi-2+prerope", "kivi-2+lloyd", "kivi-2+out10",
          "kivi-2+s8", "kivi-2+s8+zstd",
          "kivi-2+rot+prerope+zstd", "kivi-2+rot+prerope+lloyd+zstd", "budget-4", "budget-3", "budget-3+zstd",
          "budget-2.5", "budget-2.5+zstd", "budget-2.5+rot+prerope+zstd", "budget-2+zstd", "budget-2+rot+prerope+zstd",
          "budget-2.5+rot+prerope+s8+zstd", "budget-2+rot+prerope+s8+zstd",
          "tokenmix-4", "tokenmix-3")  # `bench codec`'s default: every family and preset, each tool alone and together


@dataclass
class Row:
    codec: str
    device: str
    bits_per_element: float
    ratio_fp16: float
    rel_err_k: float
    rel_err_v: float
    quant_gbps: float
    dequant_gbps: float


def long_context(data: Path, tokenizer, tokens: int) -> str:
    """Distinct contexts of a QA file, joined until the prompt reaches `tokens` tokens."""
    seen, parts = set(), []
    with open(data) as f:
        for line in f:
            ctx = json.loads(line)["context"]
            if ctx not in seen:
                seen.add(ctx)
                parts.append(ctx)
                if len(tokenizer("\n".join(parts)).input_ids) >= tokens:
                    break
    return "\n".join(parts)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def measure(kv16: KVCache, ids: list[int], fp, plan: CardPlan, repeats: int) -> Row:
    fp16_bytes = kv16.nbytes(2)
    layers, salient = plan.layers, plan.salient
    wire = sum(f.ByteSize() for f in frames(*build_card(fp, ids, kv16, plan)))
    tensors = kv16.keys + kv16.values
    tensor_codecs = [c.key for c in layers] + [c.value for c in layers]
    picks = [layer_salient(salient, kv16.tokens, t.shape[1], c) for t, c in zip(tensors, tensor_codecs)]

    def encode_all() -> list[torch.Tensor]:
        keys = [rope_removed(k, c.key, fp, kv16.tokens) for k, c in zip(kv16.keys, layers)]
        return encode_tensors(keys + kv16.values, tensor_codecs, salient, kv16.tokens)

    def decode_all(dtype: torch.dtype) -> list[torch.Tensor]:
        out = [dequantize(b, c, tuple(t.shape), dtype, i) for b, t, c, i in zip(blobs, tensors, tensor_codecs, picks)]
        return [rope_restored(k, c, fp, kv16.tokens) for k, c in zip(out, tensor_codecs)]  # values: never pre-RoPE

    blobs = encode_all()
    q_s = _best_of(encode_all, repeats)
    d_s = _best_of(lambda: decode_all(torch.float16), repeats)
    sq = [[0.0, 0.0], [0.0, 0.0]]  # [K, V] x [squared error, squared norm]
    for n, (decoded, t) in enumerate(zip(decode_all(torch.float32), tensors)):
        x = t.float()
        acc = sq[n >= len(layers)]
        acc[0] += float((decoded - x).pow(2).sum())
        acc[1] += float(x.pow(2).sum())
    return Row(
        codec=plan.codec, device=str(kv16.keys[0].device), bits_per_element=8 * wire / (fp16_bytes / 2),
        ratio_fp16=fp16_bytes / wire, rel_err_k=(sq[0][0] / sq[0][1]) ** 0.5, rel_err_v=(sq[1][0] / sq[1][1]) ** 0.5,
        quant_gbps=fp16_bytes / q_s / 1e9, dequant_gbps=fp16_bytes / d_s / 1e9,
    )


def run_codec_bench(model: str, data: Path, tokens: int, presets: list[str], repeats: int) -> list[Row]:
    lm = load_model(RuntimeConfig(model=model, device="cpu", dtype="float32"))
    sender = SenderEngine(lm)
    ids = encode(lm.tokenizer, sender.prompt.context_part(long_context(data, lm.tokenizer, tokens)))[:tokens]
    kv, importance = sender.prefill(ids, probe=True)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        kv16 = kv.to(device, torch.float16)
        for name in tqdm(presets, desc="bench codec", disable=None, leave=False):
            plan = sender.plan(sender.codec(name), ids, kv16, importance)[1]
            rows.append(measure(kv16, ids, lm.fingerprint, plan, repeats))
    return rows


def machine() -> str:
    """The date and machine a benchmark table was measured on."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads{gpu}, "
        f"torch {torch.__version__}, glibc malloc thresholds raised: {malloc.tune()}"
    )


MIN_SAVED_BITS = 0.01  # per element: less is a budget's rounding, not coding's saving


def pays_below_gbps(plain: Row, coded: Row) -> float | None:
    """The link speed below which entropy coding saves time end to end: the bits it saves on the
    wire over the time its encode and decode add (no overlap of coding and transfer assumed);
    None when it saves no bits (a coded budget spends them on wider codes instead), inf when it
    adds no time. Both rows are per fp16 byte of cache."""
    if plain.bits_per_element - coded.bits_per_element < MIN_SAVED_BITS:
        return None
    saved_bits = 8 * (plain.bits_per_element - coded.bits_per_element) / 16
    extra_s = sum(1 / c - 1 / p for c,
                  p in ((coded.quant_gbps, plain.quant_gbps), (coded.dequant_gbps, plain.dequant_gbps)))
    return saved_bits / extra_s if extra_s > 0 else math.inf


def table(rows: list[Row], tokens: int, model: str) -> str:
    lines = [
        f"codec bench: {model}, {tokens}-token cache, fp16 input; {machine()}",
        "",
        "| codec | device | bits/elem (wire) | ratio vs fp16 | rel err K | rel err V | quant+pack GB/s "
        "| unpack+dequant GB/s | +zstd pays below (Gbit/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {(r.codec, r.device): r for r in rows}
    for r in rows:
        plain = by_name.get((r.codec.removesuffix(ZSTD.suffix),
                             r.device)) if r.codec.endswith(ZSTD.suffix) else None
        pays = pays_below_gbps(plain, r) if plain else None
        lines.append(
            f"| {r.codec} | {r.device} | {r.bits_per_element:.2f} | {r.ratio_fp16:.2f} | {r.rel_err_k:.4f} | "
            f"{r.rel_err_v:.4f} | {r.quant_gbps:.2f} | {r.dequant_gbps:.2f} | {'' if pays is None else f'{pays:.2f}'} |"
        )
    if any(r.codec.endswith(ZSTD.suffix) for r in rows):
        lines += ["", "+zstd pays below: the link speed under which coding saves time against the same codec "
                  "without it (bits saved / encode and decode time added, no overlap assumed)."]
    return "\n".join(lines)
