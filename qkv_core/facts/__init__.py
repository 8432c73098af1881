"""Fact extraction: short typed facts from a context, to ride in the card next to the cache.

    from qkv_core.facts import FactConfig, extract
    result = extract(text, FactConfig(method="hybrid"))
    result.facts, result.summary

Methods: `simple` (patterns only), `yake` (patterns + YAKE keyphrases), `spacy` (patterns +
spaCy entities and noun chunks), `hybrid` (all three).
"""
from qkv_core.facts.extract import METHODS, Extraction, FactCache, FactConfig, extract
from qkv_core.facts.fact import Fact

__all__ = ["METHODS", "Extraction", "Fact", "FactCache", "FactConfig", "extract"]
