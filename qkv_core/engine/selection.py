"""Layer selection (KVComm): which layers' KV a card carries.

Scores per layer l of an L-layer model, from calibration samples (context, question, answer):
    attention  S_a(l): mean attention mass the question's tokens pay to the context's own
               tokens (after the shared chat header) at layer l, eager attention, averaged over
               heads, question tokens and samples; min-max normalized across layers
    prior      P(l) = exp(-(l - mu)^2 / (2 sigma^2)), mu = gamma_mu * L, sigma = gamma_sigma * L
    loo        leave-one-layer-out: how much the gold answer's log-likelihood drops when layer
               l keeps only the shared header instead of the context (data-driven)
Methods: combined (S = alpha * S_a + (1 - alpha) * P), attention (alpha = 1), prior (alpha = 0),
random, contiguous (the block of consecutive layers with the highest combined score), loo.
The top round(ratio * L) layers are selected; the others travel as nothing at all, and the
receiver gives them its own KV of the shared header (qkv_core.ragged attends over that).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qkv_core import bundled
from qkv_core.bundled import Sample
from qkv_core.config import LAYER_METHOD
from qkv_core.errors import RequestError, Unsupported
from qkv_core.model.attention import Probe
from qkv_core.model.kv import answer_log_likelihood, prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.prompt import PromptFormat, encode
from qkv_core.profile_file import ProfileFile
from qkv_core.types import KVCache

METHODS = ("combined", "attention", "prior", "random", "contiguous", "loo")


@dataclass(frozen=True)
class SelectionConfig:
    ratio: float = 1.0
    method: str = LAYER_METHOD
    alpha: float = 0.5
    gamma_mu: float = 0.5
    gamma_sigma: float = 0.25
    seed: int = 0  # random

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise RequestError(f"the layer ratio must be within (0, 1], got {self.ratio}")
        if self.method not in METHODS:
            raise RequestError(f"unknown layer selection {self.method!r}; choose one of {', '.join(METHODS)}")

    @property
    def name(self) -> str:
        return f"{self.method}@{self.ratio:g}"


@dataclass
class LayerProfile(ProfileFile):
    KIND = "layers"
    samples: int
    attention: list[float]  # raw S_a per layer
    loo: list[float]  # answer log-likelihood drop per layer (nats)



def shared_prefix(lm: LoadedModel, context_ids: list[int]) -> int:
    """Tokens at the start of every context card that any receiver of this model computes
    itself: the chat header (system prompt and user turn opener)."""
    head = encode(lm.tokenizer, PromptFormat.for_tokenizer(lm.tokenizer).head)
    if context_ids[: len(head)] != head:
        raise ValueError("the context's tokens do not start with the model's chat header")
    return len(head)


def keep_prefix(kv: KVCache, layers: set[int], prefix: int) -> KVCache:
    """`kv` with every layer outside `layers` cut to its first `prefix` tokens (a ragged cache)."""
    cut = [i not in layers for i in range(kv.num_layers)]
    return KVCache([k[:, :prefix] if c else k for k, c in zip(kv.keys, cut)],
                   [v[:, :prefix] if c else v for v, c in zip(kv.values, cut)])


def calibrate(lm: LoadedModel, samples: list[Sample]) -> LayerProfile:
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    attention = [0.0] * lm.num_layers
    loo = [0.0] * lm.num_layers
    for context, question, answer in tqdm(samples, desc="calibrate layer profile", disable=None, leave=False):
        c = encode(lm.tokenizer, fmt.context_part(context))
        q = encode(lm.tokenizer, fmt.query_part(question))
        a = encode(lm.tokenizer, " " + answer.strip())
        prefix = shared_prefix(lm, c)
        probe = Probe(queries=len(q))
        prefill(lm, c + q, probe=probe)
        for layer, weights in enumerate(probe.received):
            attention[layer] += float(weights[prefix : len(c)].sum()) / len(samples)
        kv, _ = prefill(lm, c)
        full = answer_log_likelihood(lm, kv, q, a)
        everything = set(range(lm.num_layers))
        for layer in range(lm.num_layers):
            dropped = keep_prefix(kv, everything - {layer}, prefix)
            loo[layer] += (full - answer_log_likelihood(lm, dropped, q, a)) / len(samples)
    fp = lm.fingerprint
    return LayerProfile(fp.name, fp.weights_sha256, len(samples), attention, loo)


def load_or_calibrate(lm: LoadedModel, path: Path | None = None) -> LayerProfile:
    """The saved profile, or one calibrated on the bundled samples (and saved) on first use."""
    return LayerProfile.load_or_make(lm.fingerprint, path, lambda: calibrate(lm, bundled.samples()))


def _minmax(xs: list[float]) -> list[float]:
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]


def needs_profile(cfg: SelectionConfig) -> bool:
    """Whether the method reads calibrated scores (prior and random need none)."""
    return cfg.ratio < 1 and cfg.method not in ("prior", "random")


def scores(cfg: SelectionConfig, num_layers: int, profile: LayerProfile | None) -> list[float]:
    """Per-layer score of the method (higher = more worth sending)."""
    n = num_layers
    mu, sigma = cfg.gamma_mu * n, max(cfg.gamma_sigma * n, 1e-6)
    prior = [math.exp(-((layer - mu) ** 2) / (2 * sigma**2)) for layer in range(n)]
    if cfg.method == "prior":
        return prior
    if profile is None or len(profile.attention) != n:
        raise Unsupported(f"layer selection {cfg.method!r} needs a calibrated profile of this {n}-layer model")
    if cfg.method == "loo":
        return list(profile.loo)
    alpha = 1.0 if cfg.method == "attention" else cfg.alpha
    return [alpha * a + (1 - alpha) * p for a, p in zip(_minmax(profile.attention), prior)]


def select(cfg: SelectionConfig, num_layers: int, profile: LayerProfile | None = None) -> list[int]:
    """The selected layer indices, ascending."""
    n = num_layers
    k = max(1, min(n, round(cfg.ratio * n)))
    if k == n:
        return list(range(n))
    if cfg.method == "random":
        return sorted(random.Random(cfg.seed).sample(range(n), k))
    s = scores(cfg, n, profile)
    if cfg.method == "contiguous":
        start = max(range(n - k + 1), key=lambda i: sum(s[i : i + k]))
        return list(range(start, start + k))
    return sorted(sorted(range(n), key=lambda i: -s[i])[:k])
