"""YAKE keyphrases (unsupervised, statistical: no model to load)."""
from __future__ import annotations

from functools import cache

from qkv_core.facts.fact import Fact


@cache
def _extractor(top: int):
    import yake  # noqa: PLC0415 - only the yake and hybrid methods need it

    return yake.KeywordExtractor(lan="en", n=3, dedupLim=0.8, top=top)


def find(text: str, top: int) -> list[Fact]:
    """The `top` keyphrases; YAKE scores (lower = better) mapped to confidence 0.55/(1+20*score)."""
    facts = []
    lower = text.lower()
    for phrase, score in _extractor(top).extract_keywords(text):
        start = lower.find(phrase.lower())
        if start >= 0:
            confidence = 0.55 / (1 + 20 * float(score))  # below the exact patterns and entities
            facts.append(Fact("keyphrase", text[start : start + len(phrase)], confidence, start, start + len(phrase)))
    return facts
