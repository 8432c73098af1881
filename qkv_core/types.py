"""The two values every layer passes around, free of any model library: the model fingerprint a
card is bound to, and a KV cache as per-layer tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fingerprint:
    """What a receiver must share with a sender to use its KV cache as is."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: str  # canonical JSON of the RoPE parameters
    tokenizer_sha256: str
    weights_sha256: str

    def kv_bytes(self, tokens: int, bytes_per_value: int = 2) -> int:
        """Size of K and V of all layers for `tokens` tokens (full-attention layers)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * tokens * bytes_per_value

    def mismatch(self, other: Fingerprint) -> list[str]:
        """Names of the fields that differ (the display name does not count)."""
        return [
            f
            for f in self.__dataclass_fields__
            if f != "name" and getattr(self, f) != getattr(other, f)
        ]



@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def tokens(self) -> int:
        return max((k.shape[1] for k in self.keys), default=0)

    @property
    def is_ragged(self) -> bool:
        """Layers hold different numbers of tokens (selective injection)."""
        return len({k.shape[1] for k in self.keys}) > 1

    def nbytes(self, bytes_per_value: int) -> int:
        """Size of all layers' K and V at `bytes_per_value` (2: the fp16 baseline)."""
        return bytes_per_value * sum(k.numel() + v.numel() for k, v in zip(self.keys, self.values))

    def to(self, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache([k.to(device, dtype) for k in self.keys], [v.to(device, dtype) for v in self.values])

    def span(self, start: int, stop: int | None = None) -> KVCache:
        """Tokens start..stop of every layer (views: nothing is copied)."""
        return KVCache([k[:, start:stop] for k in self.keys], [v[:, start:stop] for v in self.values])

    def extended(self, tail: KVCache) -> KVCache:
        """This cache followed by `tail`'s tokens, layer by layer (a new cache)."""
        return KVCache([torch.cat((a, b), dim=1) for a, b in zip(self.keys, tail.keys)],
                       [torch.cat((a, b), dim=1) for a, b in zip(self.values, tail.values)])
