"""What kind of text a context is, from cheap signals that are returned with the verdict."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class ContextType(enum.Enum):
    API_DOC = "api_documentation"
    PRODUCT_SPEC = "product_specification"
    NARRATIVE = "narrative"
    CONVERSATIONAL = "conversational"
    GENERAL = "general"


_SIGNALS: dict[ContextType, list[re.Pattern[str]]] = {
    ContextType.API_DOC: [
        re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE)\b"), re.compile(r"(?<![\w/])/[a-z{][\w\-{}]*/"),
        re.compile(r"\b(?:API|endpoint|JSON|HTTP|header|request|response|token|status code|rate limit|SDK|webhook)s?\b",
                   re.I),
    ],
    ContextType.PRODUCT_SPEC: [
        re.compile(r"\b\d[\d.,]*\s?(?:kg|g|cm|mm|W|watts|mAh|GB|TB|inch(?:es)?|decibels|dB|meters?|hours)\b"),
        re.compile(r"\b(?:warranty|weighs|dimensions|battery|features|model|price|costs?|filter|sensor|"
                   r"specifications?)\b", re.I),
        re.compile(r"[$€£]\s?\d|\b\d+\s?(?:dollars|euros)\b"),
    ],
    ContextType.CONVERSATIONAL: [
        re.compile(r"(?:^|\s)(?:[A-Z][a-z]+|[A-Z]):\s"), re.compile(r"\?"),
        re.compile(r"\b(?:I|you|I'm|you're|we|my|your|thanks|thank you|please|hi|hello)\b", re.I),
    ],
    ContextType.NARRATIVE: [
        re.compile(r"\b(?:he|she|they|his|her|him|their)\b", re.I), re.compile(r"\b\w+ed\b"),
        re.compile(r"\b(?:said|told|looked|walked|felt|thought|knew|night|morning|smiled|whispered)\b", re.I),
    ],
}
_THRESHOLD = 4.0  # signal hits per 100 words below which a text is `general`


@dataclass
class Detection:
    type: ContextType
    scores: dict[str, float] = field(default_factory=dict)  # signal hits per 100 words, per type


def detect(text: str) -> Detection:
    words = max(1, len(text.split()))
    scores = {t.value: 100 * sum(len(p.findall(text)) for p in pats) / words for t, pats in _SIGNALS.items()}
    # Conversations need at least two distinct speakers; narratives are long-form prose.
    speakers = set(re.findall(r"(?:^|\s)([A-Z][a-z]+|[A-Z]):\s", text))
    if len(speakers) < 2:
        scores[ContextType.CONVERSATIONAL.value] /= 4
    best = max(scores, key=lambda name: scores[name])
    kind = ContextType(best) if scores[best] >= _THRESHOLD else ContextType.GENERAL
    return Detection(kind, scores)
