"""Imported first by conftest: without CUDA, Triton's kernels (qkv_core.codec.kernels) run through
its interpreter on the CPU, which must be chosen before anything imports triton (transformers does)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
