"""`make bench-gpu`'s script, as a CPU dry run on the tiny shape (its numbers are the benchmark's
business): every codec row and every length row is measured and lands in the JSON; and the 8B
shape it runs on a device is Llama-3.1-8B's (its parameter count, built on the meta device)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qkv_eval import bench_gpu, bench_policy

pytestmark = pytest.mark.integration


def test_the_gpu_bench_dry_run_measures_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    args = argparse.Namespace(shape="tiny", device="cpu", codecs="fp16,kivi-4,kivi-2+rot+prerope", tokens=128,
                              lengths="64,192", codec="kivi-4", repeats=1, json=out)
    table = bench_gpu.run(args)
    run = json.loads(out.read_text())
    bits = {r["codec"]: r["bits_per_element"] for r in run["codec"]}
    assert list(bits) == ["fp16", "kivi-4",
                          "kivi-2+rot+prerope"] and bits["fp16"] > 16 > bits["kivi-4"] > bits["kivi-2+rot+prerope"]
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in run["codec"])
    assert [r["tokens"] for r in run["ttft"]] == [64, 192] and all(r["ttft_card_s"] > r["card_decode_s"] > 0
                                                                  for r in run["ttft"])
    assert "| 192 |" in table and "random-weight tiny on cpu" in table
    # codec auto's model on paper, from what the run measured instead of a preset
    policy = bench_policy.run(argparse.Namespace(measured=out, preset="h100-8b", context_tokens=200, rtt_ms=0.2,
                                                 codec_gbps=0.0, links="1,100"))
    assert "measured by bench gpu (gpu.json): prefill and first token at 192 tokens" in policy
    assert "| text (ms) | fp16 (ms) | kivi-4 (ms) | kivi-2+rot+prerope (ms) | auto picks |" in policy
    hw = bench_policy.measured(out, 200)
    encoded = {r["codec"]: r["encode_gbps"] for r in run["codec"]}
    assert (hw.layers, hw.kv_heads, hw.head_dim) == (2, 2, 32) and hw.quantize_gbps == encoded
    assert hw.prefill_tokens_per_s > 0 and hw.quality["kivi-4"] == bench_policy.QUALITY["kivi-4"]


def test_the_8b_shape_is_llama_3_1_8b():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**bench_gpu.SHAPES["llama-3.1-8b"]))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.03
