"""`qkvcomm bench policy --simulate`: codec auto's prediction model on paper, for hardware this
machine does not have. For a model shape, a receiver's prefill rate and the codec's speeds, it
prints each option's predicted handoff time to first token at each link speed, what auto picks
(within the default quality floor), and the link speed above which each card beats the text.

The formulas are the ones the sender uses (qkv_core.policy.decide). The presets' inputs, and
where each comes from, are printed with the table; `--measured FILE` takes them from a `bench gpu
--json` run instead (`make bench-gpu`): the model's shape, its prefill rate and first-token time
at the length nearest the context, and each measured codec's encode and decode rates (the options
are then the text and the codecs it measured). The measured counterpart on this machine is
benchmarks/auto_link.py (`make bench-auto`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from qkv_core.codec import registry
from qkv_core.codec.registry import TEXT
from qkv_core.config import MAX_QUALITY_LOSS
from qkv_core.policy.decide import Link, Option, Receiver, Request, decide, predict

# Predicted next-token KL (nats) of SmolLM2-135M's calibrated profile (docs/codecs.md, codec auto), used as
# stand-ins: a real deployment reads its own model's profile.
QUALITY = {"fp16": 0.0, "kivi-4": 0.0215, "budget-3": 0.0844, "kivi-3": 0.1465, "kivi-2": 0.9419}
BYTES_PER_TOKEN_OF_TEXT = 4.2  # UTF-8 bytes per token of English prose (SQuAD paragraphs, this tokenizer)


@dataclass(frozen=True)
class Hardware:
    what: str
    layers: int
    kv_heads: int
    head_dim: int
    prefill_tokens_per_s: float
    first_token_s: float
    quantize_gbps: dict[str, float]  # the sender's codec, fp16 KV GB/s
    dequantize_gbps: float  # the receiver's card decoding (kivi-4), fp16 KV GB/s
    source: str
    quality: dict[str, float] = dataclasses.field(default_factory=lambda: dict(QUALITY))  # nats, per option


def measured(path: Path, tokens: int) -> Hardware:
    """The inputs a `bench gpu --json` run measured (module docstring)."""
    from qkv_eval.bench_gpu import SHAPES  # noqa: PLC0415 - the shapes it ran

    run = json.loads(path.read_text())
    shape = SHAPES[run["shape"]]
    row = min(run["ttft"], key=lambda r: abs(r["tokens"] - tokens))
    first_s = row["ttft_card_s"] - row["card_decode_s"]  # the question's prefill on the held cache
    codecs = {r["codec"]: r for r in run["codec"]}
    decode = codecs.get("kivi-4", next(iter(codecs.values())))["decode_gbps"]
    return Hardware(f"{run['shape']} ({run['machine']})", shape["num_hidden_layers"], shape["num_key_value_heads"],
                    shape["head_dim"], row["tokens"] / max(row["ttft_reprefill_s"] - first_s, 1e-9), first_s,
                    {name: r["encode_gbps"] for name, r in codecs.items()}, decode,
                    f"measured by bench gpu ({path.name}): prefill and first token at {row['tokens']:,} tokens, "
                    f"encode GB/s per codec, decode {decode:.2f} GB/s (kivi-4's)",
                    {name: QUALITY.get(name, 0.0 if name in ("fp16", "fp32") else float("nan")) for name in codecs})


# quant+pack GB/s of the codecs on the H100 (docs/results.md codec table, 2026-11-23): launch-bound on a
# 135M model's small tensors, so conservative for an 8B model's.
H100_QUANTIZE = {"fp16": 5.68, "kivi-4": 3.82, "budget-3": 2.11, "kivi-3": 2.92, "kivi-2": 3.38}
PRESETS = {
    "h100-8b": Hardware(
        "an 8B Llama-3 shape (32 layers, 8 KV heads x 128) on an H100", 32, 8, 128, 8192 / 0.27, 0.03,
        H100_QUANTIZE, 1.82,
        "prefill: 8K tokens in ~0.27 s (issue 23's figure for an 8B model on an H100, not measured here); "
        "first token 30 ms (assumed); codec GB/s: measured on the H100 with SmolLM2 (docs/results.md codec table)"),
    "h100-135m": Hardware(
        "SmolLM2-135M (30 layers, 3 KV heads x 64) on an H100", 30, 3, 64, 8126 / 0.024, 0.024, H100_QUANTIZE, 1.82,
        "prefill: 8,126 tokens in 24 ms and first token 24 ms, measured on the H100 (docs/results.md, bench ttft); "
        "codec GB/s: measured there (docs/results.md codec table)"),
}


def options(hw: Hardware, tokens: int) -> list[Option]:
    """The text and each codec the hardware has a rate for (a quality loss without a stand-in
    profile, NaN, is never within the floor: shown, never picked)."""
    out = [Option(TEXT, int(tokens * BYTES_PER_TOKEN_OF_TEXT))]
    for name in hw.quantize_gbps:
        kind = registry.adaptive(name)  # budget-B: B bits per element, at most (no profile of this model here)
        size = (int(kind.bits * 2 * hw.layers * hw.kv_heads * tokens * hw.head_dim / 8) if kind else
                registry.wire_bytes(registry.resolve(name, hw.layers), hw.kv_heads, tokens, hw.head_dim))
        out.append(Option(name, size, hw.quality.get(name, float("nan")), hw.quantize_gbps[name] * 1e9))
    return out


def crossover(card: Option, text: Option, request: Request, receiver: Receiver, rtt_s: float) -> float | None:
    """The link speed (bytes/s) above which `card` beats `text`; None if it never does."""
    lo, hi = 1e3, 1e13
    def faster(t: float) -> bool:
        return predict(card, request, Link(t, rtt_s), receiver) < predict(text, request, Link(t, rtt_s), receiver)

    if not faster(hi):
        return None
    if faster(lo):
        return lo
    for _ in range(200):  # bisection on a log scale; predict() is monotone in the throughput
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if faster(mid) else (mid, hi)
    return hi


def run(args: argparse.Namespace) -> str:
    tokens, rtt_s = args.context_tokens, args.rtt_ms / 1e3
    hw = measured(args.measured, tokens) if args.measured else PRESETS[args.preset]
    if args.codec_gbps:  # what-if: a codec this fast at both ends
        hw = dataclasses.replace(hw, quantize_gbps=dict.fromkeys(hw.quantize_gbps, args.codec_gbps),
                                 dequantize_gbps=args.codec_gbps,
                                 source=hw.source + f"; codec speeds replaced by {args.codec_gbps:g} GB/s (what-if)")
    request = Request(tokens, hw.layers, 2 * hw.layers * hw.kv_heads * tokens * hw.head_dim * 2)
    receiver = Receiver(hw.prefill_tokens_per_s, hw.first_token_s, hw.dequantize_gbps * 1e9)
    opts = options(hw, tokens)
    lines = [f"codec auto on paper: {hw.what}, {tokens:,}-token context, rtt {args.rtt_ms:g} ms, quality floor "
             f"{MAX_QUALITY_LOSS} nats", f"inputs: {hw.source}", "",
             "| link (Gbit/s) | " + " | ".join(f"{o.name} (ms)" for o in opts) + " | auto picks |",
             "|---|" + "---|" * (len(opts) + 1)]
    for gbit in (float(x) for x in args.links.split(",")):
        link = Link(gbit * 1e9 / 8, rtt_s)
        choice = decide(opts, request, link, receiver, MAX_QUALITY_LOSS)
        lines.append(f"| {gbit:g} | " + " | ".join(f"{predict(o, request, link, receiver) * 1e3:,.0f}" for o in opts)
                     + f" | {choice.chosen.option.name} |")
    lines += ["", "| option | wire MB | quality loss (nats) | beats text above (Gbit/s) |", "|---|---|---|---|"]
    for o in opts[1:]:
        at = crossover(o, opts[0], request, receiver, rtt_s)
        lines.append(f"| {o.name} | {o.wire_bytes / 1e6:,.1f} | {o.quality_loss:g} | "
                     f"{'never' if at is None else f'{at * 8 / 1e9:,.2f}'} |")
    return "\n".join(lines)
