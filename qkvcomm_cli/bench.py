"""`qkvcomm bench codec`: size, error and speed of every codec preset on a real KV cache."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from qkv_core import allocator
from qkv_core import codec as codecs
from qkv_core.card import build_header, encode_layers, encode_tensors, frames
from qkv_core.config import RuntimeConfig
from qkv_core.kv import KVCache, prefill
from qkv_core.models import load_model
from qkv_core.prompt import PromptFormat, encode
from qkv_core.quant import dequantize


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


def measure(kv16: KVCache, ids: list[int], fp, name: str, repeats: int) -> Row:
    layer_codecs = codecs.resolve(name, kv16.num_layers)
    fp16_bytes = kv16.nbytes(2)
    header = build_header(fp, ids, kv16, name, layer_codecs)
    wire = sum(f.ByteSize() for f in frames(header, encode_layers(kv16, layer_codecs)))
    pairs = [(t, c) for c, k, v in zip(layer_codecs, kv16.keys, kv16.values) for t, c in ((k, c.key), (v, c.value))]
    tensors, tensor_codecs = [t for t, _ in pairs], [c for _, c in pairs]
    blobs = encode_tensors(tensors, tensor_codecs)
    q_s = _best_of(lambda: encode_tensors(tensors, tensor_codecs), repeats)
    d_s = _best_of(lambda: [dequantize(b, c, tuple(t.shape), torch.float16) for b, (t, c) in zip(blobs, pairs)], repeats)
    errs = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
    for i, (b, (t, c)) in enumerate(zip(blobs, pairs)):
        x = t.float()
        d = dequantize(b, c, tuple(t.shape), torch.float32) - x
        e = errs["k" if i % 2 == 0 else "v"]
        e[0] += float(d.pow(2).sum())
        e[1] += float(x.pow(2).sum())
    return Row(
        codec=name, device=str(kv16.keys[0].device), bits_per_element=8 * wire / (fp16_bytes / 2),
        ratio_fp16=fp16_bytes / wire, rel_err_k=(errs["k"][0] / errs["k"][1]) ** 0.5,
        rel_err_v=(errs["v"][0] / errs["v"][1]) ** 0.5, quant_gbps=fp16_bytes / q_s / 1e9,
        dequant_gbps=fp16_bytes / d_s / 1e9,
    )


def run_codec_bench(model: str, data: Path, tokens: int, presets: list[str], repeats: int) -> list[Row]:
    lm = load_model(RuntimeConfig(model=model, device="cpu", dtype="float32"))
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    ids = encode(lm.tokenizer, fmt.context_part(long_context(data, lm.tokenizer, tokens)))[:tokens]
    kv, _ = prefill(lm, ids)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        kv16 = kv.to(device, torch.float16)
        rows += [measure(kv16, ids, lm.fingerprint, name, repeats) for name in presets]
    return rows


def table(rows: list[Row], tokens: int, model: str) -> str:
    lines = [
        f"codec bench: {model}, {tokens}-token cache, fp16 input; {date.today()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"glibc malloc thresholds raised: {allocator.tune()}",
        "",
        "| codec | device | bits/elem (wire) | ratio vs fp16 | rel err K | rel err V | quant+pack GB/s | unpack+dequant GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.codec} | {r.device} | {r.bits_per_element:.2f} | {r.ratio_fp16:.2f} | {r.rel_err_k:.4f} | "
            f"{r.rel_err_v:.4f} | {r.quant_gbps:.2f} | {r.dequant_gbps:.2f} |"
        )
    return "\n".join(lines)
