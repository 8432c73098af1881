"""A model ready to run: its weights, tokenizer, fingerprint, device and dtype (made by
qkv_core.model.loading, used by everything that runs the model)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qkv_core.types import Fingerprint


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: Fingerprint
    device: torch.device
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers
