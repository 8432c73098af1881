"""Fact extraction: short typed facts from a context, to ride in the card next to the cache.

    from qkv_core.facts import FactConfig, detect, extract
    result = extract(text, FactConfig(method="hybrid"))
    result.facts, result.summary
    detect(text).type, detect(text).scores     # the context type, on its own: nothing in the handoff uses it yet

Methods: `simple` (patterns only), `yake` (patterns + YAKE keyphrases), `spacy` (patterns +
spaCy entities and noun chunks), `hybrid` (all three).
"""
from qkv_core.facts.context_type import ContextType, detect
from qkv_core.facts.extract import METHODS, Extraction, FactCache, FactConfig, extract
from qkv_core.facts.fact import Fact

__all__ = ["METHODS", "ContextType", "Extraction", "Fact", "FactCache", "FactConfig", "detect", "extract"]
