"""`codec = "auto"` for one sender: its candidates, its estimates, and the decision per request.

The candidates' wire bytes and quality come from quality.py, the link and the sender's own
quantization rates from estimates.py (a codec the sender has not used yet is timed once on a
random cache of PRIOR_TOKENS tokens), the receiver's speeds from its Info; decide.py chooses.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from qkv_core.card.header import CardPlan
from qkv_core.codec import registry
from qkv_core.codec.allocation import Profile
from qkv_core.codec.registry import TEXT
from qkv_core.codec.tools import ZSTD
from qkv_core.errors import RequestError
from qkv_core.policy.decide import Decision, Link, Option, Receiver, Request, decide
from qkv_core.policy.estimates import LinkEstimate, Rates
from qkv_core.policy.quality import candidate_layers, profile_sets, quality_loss
from qkv_core.types import Fingerprint, KVCache

AUTO = "auto"
PRIOR_TOKENS = 256


def parse_candidates(names: list[str], num_layers: int) -> dict[str, registry.Codec | None]:
    """The configured candidates parsed (text: None), or a clear error for one auto cannot predict."""
    parsed: dict[str, registry.Codec | None] = {}
    for name in names:
        if name == TEXT:
            parsed[name] = None
            continue
        stem, tools = registry.split_tools(name)
        plain = set(tools) <= {ZSTD.suffix}  # lossless: predicted by the plain profile
        codec = registry.parse(name, num_layers) if name != AUTO else None  # kivi-9 and the like fail here, at start
        budget = codec is not None and codec.kind is not None and codec.kind.allocator == "budget"
        if codec is None or not (name in ("fp16", "fp32") or (stem.startswith("kivi-") and plain) or budget):
            raise ValueError(f"auto candidate {name!r}: auto predicts text, fp16, fp32, kivi-B (optionally "
                             f"{ZSTD.suffix}) and budget-B (with any tools) only")
        parsed[name] = codec
    if TEXT not in names and "fp16" not in names and "fp32" not in names:
        raise ValueError("auto candidates need a lossless option (text, fp16 or fp32) so that one is always eligible")
    return parsed


class AutoPolicy:
    def __init__(self, fp: Fingerprint, profile: Callable[[str], Profile], candidates: list[str],
                 max_quality_loss: float):
        """`profile(tools)`: the codec profile measured with `tools` ('' for none), as the sender has it."""
        self.fp, self.profile = fp, profile
        self.candidates = parse_candidates(candidates, fp.num_layers)
        self.max_quality_loss = max_quality_loss
        self.link, self.rates = LinkEstimate(), Rates()
        self.receiver: Receiver | None = None  # as its last Info reported it
        self._candidates: dict[tuple[str, int], tuple[list, float]] = {}  # (name, token bucket) -> layers, loss

    def candidate(self, codec: registry.Codec, tokens: int) -> tuple[list, float]:
        """A candidate's layer codecs and predicted loss, made once per power-of-two token bucket: a
        budget's allocation shifts with the length only through the weight of its scales, and the
        decision runs on every request (the card itself is allocated at its exact length)."""
        key = (codec.name, 1 << max(0, tokens - 1).bit_length())
        if key not in self._candidates:
            profiles = [self.profile(tools) for tools in profile_sets(codec)]
            layers = candidate_layers(codec, profiles, self.fp, tokens)
            self._candidates[key] = layers, quality_loss(layers, profiles)
        return self._candidates[key]

    def options(self, context: str, tokens: int, text: bool = True,
                reused: Mapping[str, int] | None = None) -> list[Option]:
        """Every candidate that applies to this context (a budget below its smallest allocation does not;
        text does not when the request needs a card: facts asked for, or a layer selection).
        `reused`: per codec, the tokens of a held prefix its card would extend as a delta: its bytes,
        encoding and decoding are then those of the rest."""
        out = []
        for name, codec in self.candidates.items():
            if codec is None:  # text
                if text:
                    out.append(Option(TEXT, len(context.encode())))
                continue
            held = (reused or {}).get(name, 0)
            own = tokens - held
            try:
                layers, loss = self.candidate(codec, own)
            except RequestError:
                continue
            size = registry.wire_bytes(layers, self.fp.num_kv_heads, own, self.fp.head_dim)
            out.append(Option(name, size, loss, self.quantize_rate(name, layers), self.fp.kv_bytes(own, 2), held))
        return out

    def quantize_rate(self, name: str, layers: list) -> float:
        """The sender's rate on `name` (fp16 KV bytes/s): measured on its past cards, else timed now."""
        if (rate := self.rates.get(name)) is None:
            kv = KVCache([torch.randn(self.fp.num_kv_heads, PRIOR_TOKENS, self.fp.head_dim) for _ in layers],
                         [torch.randn(self.fp.num_kv_heads, PRIOR_TOKENS, self.fp.head_dim) for _ in layers])
            start = time.perf_counter()
            CardPlan(name, layers).encode(kv, self.fp)
            rate = self.rates.observe(name, kv.nbytes(2), time.perf_counter() - start)
        return rate

    def choose(self, context: str, tokens: int, receiver: Receiver, text: bool = True,
               reused: Mapping[str, int] | None = None) -> Decision:
        self.receiver = receiver
        request = Request(tokens, self.fp.num_layers, self.fp.kv_bytes(tokens, 2))
        throughput, rtt_s = self.link.throughput.value, self.link.rtt_s.value
        if throughput is None or rtt_s is None:
            raise RuntimeError("codec auto decides on a measured link: probe it first")
        link = Link(throughput, rtt_s)
        return decide(self.options(context, tokens, text, reused), request, link, receiver, self.max_quality_loss)
