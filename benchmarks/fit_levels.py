"""Fit the `+lloyd` level tables (qkv_core.codec.levels.LLOYD) on the bundled calibration texts.

The KV of SmolLM2-135M (the embedded model) for each text, rotated (seed 1) with K pre-RoPE,
the layouts kivi-B codes (K per channel, V per token), each row scaled to [0, 1] by its own
min and max; Lloyd-Max levels of the pooled values per width, rounded to multiples of 1/4096.
Usage: .venv/bin/python benchmarks/fit_levels.py
"""
from __future__ import annotations

import torch

from qkv_core import bundled
from qkv_core.codec import rope
from qkv_core.codec.levels import fit, unit_values
from qkv_core.codec.rotation import rotate
from qkv_core.codec.tools import ROTATION_SEED
from qkv_core.config import RuntimeConfig
from qkv_core.model.kv import prefill
from qkv_core.model.loading import load_model
from qkv_core.model.prompt import PromptFormat, encode

SAMPLE = 4_000_000  # values per fit, drawn from the pooled rows


def main() -> None:
    lm = load_model(RuntimeConfig())
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    pooled = []
    for text in bundled.texts():
        ids = encode(lm.tokenizer, fmt.context_part(text))[:1024]
        kv, _ = prefill(lm, ids)
        for k, v in zip(kv.keys, kv.values):
            k = rotate(rope.apply(k.float(), rope.inv_freq(lm.fingerprint), 0, -1.0), ROTATION_SEED)
            v = rotate(v.float(), ROTATION_SEED)
            pooled += [unit_values(k, per_channel=True), unit_values(v, per_channel=False)]
    values = torch.cat(pooled)
    sample = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE]]
    print(f"# {values.numel()} values from {len(bundled.texts())} texts; Lloyd-Max on {sample.numel()}")
    for bits in (1, 2, 3, 4):
        print(f"    {bits}: ({', '.join(repr(x) for x in fit(sample, bits))}),")


if __name__ == "__main__":
    main()
