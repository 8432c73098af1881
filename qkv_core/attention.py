"""Attention probes: how much attention each context token receives, read during a prefill.

The probe runs the model with eager attention (the fused kernels never materialize the
weights) and reduces each layer's weights on the spot, so memory stays one layer's
attention matrix, not all of them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .models import LoadedModel


@contextmanager
def attention_received(lm: LoadedModel, queries: int) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward pass appends, per layer, the attention each key
    position receives from the last `queries` query positions, averaged over heads and
    those queries (a [keys] tensor that sums to 1). The caller keeps other requests off the
    model meanwhile: the hooks and the attention switch are the model's, not this call's."""
    received: list[torch.Tensor] = []

    def hook(module, args, output):
        weights = output[1]  # [batch, heads, queries, keys]
        received.append(weights[0, :, -queries:].float().mean(dim=(0, 1)))
        return output[0], None

    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    handles = [layer.self_attn.register_forward_hook(hook) for layer in lm.model.model.layers]
    try:
        yield received
    finally:
        for h in handles:
            h.remove()
        lm.model.set_attn_implementation(previous)
