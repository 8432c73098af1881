"""Run the extractors of a method, then deduplicate, rank and cut the facts to a budget."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

from qkv_core.errors import RequestError
from qkv_core.facts import entities, keyphrases, patterns
from qkv_core.facts.fact import Fact
from qkv_core.facts.text import normalize

METHODS = ("simple", "yake", "spacy", "hybrid")
SEPARATOR = "; "


@dataclass(frozen=True)
class FactConfig:
    method: str = "hybrid"
    budget_bytes: int = 400  # of the summary string (UTF-8); the facts in the header are cut alike
    keyphrases: int = 10  # YAKE's top-k

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RequestError(f"unknown fact method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget_bytes < 1:
            raise RequestError("the fact budget must be at least one byte")


@dataclass
class Extraction:
    facts: list[Fact]  # what fits the budget, in the order of the text
    summary: str  # the compact string the receiver's prompt gets: fact texts joined by "; "


def _candidates(text: str, cfg: FactConfig) -> list[Fact]:
    found = list(patterns.find(text))
    if cfg.method in ("yake", "hybrid"):
        found += keyphrases.find(text, cfg.keyphrases)
    if cfg.method in ("spacy", "hybrid"):
        found += entities.find(text)
    return found


def _rank(facts: list[Fact]) -> list[Fact]:
    """Most confident first (longer first on ties); a fact whose normalized text is inside an
    already kept fact's is a duplicate."""
    kept: list[tuple[Fact, str]] = []
    for fact in sorted(facts, key=lambda f: (-f.confidence, -(f.end - f.start), f.start)):
        norm = normalize(fact.text)
        if norm and not any(f" {norm} " in f" {k} " for _, k in kept):
            kept.append((fact, norm))
    return [f for f, _ in kept]


def _cut(ranked: list[Fact], budget: int) -> list[Fact]:
    chosen: list[Fact] = []
    used = 0
    for fact in ranked:
        size = len(fact.text.encode()) + (len(SEPARATOR) if chosen else 0)
        if used + size <= budget:
            chosen.append(fact)
            used += size
    return sorted(chosen, key=lambda f: f.start)


def extract(text: str, cfg: FactConfig = FactConfig()) -> Extraction:
    """Facts of `text` under `cfg`. Any text is accepted: empty, huge, non-English, binary junk."""
    text = text.replace("\x00", " ")
    facts = _cut(_rank(_candidates(text, cfg)), cfg.budget_bytes) if text.strip() else []
    return Extraction(facts, SEPARATOR.join(f.text for f in facts))


class FactCache:
    """Extractions keyed by tenant and a hash of the text and the config, least recently used
    evicted: a tenant's hit never depends on what another tenant sent."""

    def __init__(self, entries: int = 256):
        self.entries = entries
        self._items: OrderedDict[str, Extraction] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, text: str, cfg: FactConfig, tenant: str = "") -> Extraction:
        key = hashlib.sha256(b"\0".join([tenant.encode(), repr(sorted(asdict(cfg).items())).encode(),
                                          text.encode(errors="replace")])).hexdigest()
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
        result = extract(text, cfg)
        with self._lock:
            self.misses += 1
            self._items[key] = result
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return result
