"""What several commands share: the runtime flags of one-shot commands and the stats printout."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from qkv_core.config import RuntimeConfig


def runtime_flags(p: argparse.ArgumentParser) -> None:
    """--model, --revision, --device, --dtype, made from RuntimeConfig's fields."""
    for f in dataclasses.fields(RuntimeConfig):
        p.add_argument(f"--{f.name}", help=f"{f.metadata['help']} (default {f.default or 'none'})")


def runtime(args: argparse.Namespace, model: str | None = None) -> RuntimeConfig:
    """The runtime flags of a one-shot command (eval, calibrate); `model` overrides --model."""
    given = {f.name: v for f in dataclasses.fields(RuntimeConfig) if (v := getattr(args, f.name, None))}
    return RuntimeConfig(**{**given, **({"model": model} if model else {})})


def print_stats(answer: object) -> None:
    s = answer.stats  # type: ignore[attr-defined]
    print(
        f"\n--\ncard {s.card_id[:12]}  codec {s.codec}  context {s.context_tokens} tokens\n"
        f"wire {s.wire_bytes:,} B  vs fp16 KV {s.kv_fp16_bytes:,} B  -> {s.compression_ratio:.2f}x "
        f"(vs fp32: {s.compression_ratio_fp32:.2f}x){'  [card reused]' if s.card_reused else ''}\n"
        f"prefill {s.prefill_s * 1e3:.0f} ms  quantize {s.quantize_s * 1e3:.0f} ms  transfer {s.transfer_s * 1e3:.0f} ms  "
        f"dequantize {s.dequantize_s * 1e3:.0f} ms  ttft {s.ttft_s * 1e3:.0f} ms  total {s.total_s * 1e3:.0f} ms",
        file=sys.stderr,
    )
