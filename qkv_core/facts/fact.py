"""One extracted fact."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    type: str  # e.g. endpoint, rate_limit, money, date, entity:person, keyphrase
    text: str
    confidence: float  # 0..1, comparable across extractors (ranking uses it)
    start: int  # character span in the context
    end: int
