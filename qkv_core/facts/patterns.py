"""Regular-expression extractors for the exact strings that aggressive quantization blurs:
endpoints and URLs, HTTP methods, rate limits, versions, money, percentages, quantities with
units, dates, times, emails, years and other numbers."""
from __future__ import annotations

import re
from collections.abc import Iterator

from qkv_core.facts.fact import Fact

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December|"
          r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)\.?")
_NUM = r"\d[\d,]*(?:\.\d+)?"
_UNIT = (r"(?:(?:square|cubic)\s+)?(?:kilomet(?:er|re)s?|km|met(?:er|re)s?|centimet(?:er|re)s?|cm|mm|"
         r"kilograms?|kg|grams?|g|pounds|lbs?|miles?|mi|feet|foot|ft|inch(?:es)?|lit(?:er|re)s?|ml|"
         r"kWh|kW|watts?|W|volts?|V|amps?|mAh|Hz|kHz|MHz|GHz|[KMGT]i?B|bytes?|bits?|decibels?|dB|°[CF]|degrees|"
         r"ms|seconds?|minutes?|hours?|days?|weeks?|months?|years?)")

# (type, pattern, confidence); earlier types win where spans overlap.
PATTERNS: list[tuple[str, re.Pattern[str], float]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), 0.95),
    ("url", re.compile(r"\bhttps?://[^\s<>\"'()\[\]]+[^\s<>\"'()\[\].,;:!?]"), 0.95),
    ("endpoint", re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS)\s+/[\w\-./{}:]*"), 0.95),
    ("endpoint", re.compile(r"(?<![\w/.:])/[A-Za-z{][\w\-{}.:]*(?:/[\w\-{}.:]+)*"), 0.8),
    ("rate_limit", re.compile(
        rf"\b{_NUM}\s*(?:requests?|calls?|req|queries|messages|tokens|jobs)\s*(?:per|/|an?|each)\s*"
        r"(?:second|sec|s|minute|min|hour|hr|h|day|month)\b", re.I), 0.95),
    ("version", re.compile(r"\b(?:v|version\s+)\d+(?:\.\d+){0,3}\b|\b\d+\.\d+\.\d+\b", re.I), 0.85),
    ("money", re.compile(
        rf"[$€£¥]\s?{_NUM}(?:\s?(?:million|billion|thousand|[kKmMbB]n?)\b)?|"
        rf"\b{_NUM}\s?(?:(?:million|billion|thousand)\s)?"
        r"(?:dollars|euros|pounds sterling|yen|USD|EUR|GBP|cents)\b"), 0.9),
    ("percent", re.compile(rf"\b{_NUM}\s?(?:%|percent\b|per cent\b)"), 0.9),
    ("date", re.compile(
        rf"\b\d{{1,2}}\s+{_MONTH}(?:,?\s+\d{{4}})?\b|\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?\b|"
        rf"\b{_MONTH}\s+\d{{4}}\b|\b\d{{4}}-\d{{2}}-\d{{2}}\b"), 0.9),
    ("time", re.compile(
        r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\s?[AaPp]\.?[Mm]\.?)?(?:\s?(?:UTC|GMT|[A-Z]{2,4}T))?|"
        r"\b\d{1,2}\s?(?:am|pm|a\.m\.|p\.m\.)"), 0.85),
    ("quantity", re.compile(rf"\b{_NUM}[\s-]?{_UNIT}(?![\w])"), 0.8),
    ("year", re.compile(r"\b(?:1[5-9]\d\d|20\d\d)s?\b"), 0.6),
    ("number", re.compile(rf"\b{_NUM}\b"), 0.4),
]


def find(text: str) -> Iterator[Fact]:
    """Every pattern match, longest and highest-priority first where spans overlap."""
    taken: list[tuple[int, int]] = []
    for kind, pattern, confidence in PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            yield Fact(kind, m.group().strip(), confidence, start, end)
