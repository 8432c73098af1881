"""Answer metrics: SQuAD-normalized exact match, token F1 (max over gold answers), contains-answer."""
from __future__ import annotations

from collections import Counter

from qkv_core.facts.text import normalize


def exact_match(prediction: str, golds: list[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(g) for g in golds))


def f1(prediction: str, golds: list[str]) -> float:
    p = normalize(prediction).split()

    def one(gold: str) -> float:
        g = normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max((one(g) for g in golds), default=0.0)


def contains(prediction: str, golds: list[str]) -> float:
    """1 if some normalized gold answer appears in the normalized prediction."""
    p = f" {normalize(prediction)} "
    return float(any(normalize(g) and f" {normalize(g)} " in p for g in golds))


# The seed paper's answer metrics, with the exact definitions used here (its text does not
# give formulas, so these are ours, named after its columns):

def completeness(prediction: str, golds: list[str]) -> float:
    """Answer completeness: the largest share of a gold answer's normalized tokens (with
    multiplicity) that the prediction contains: token recall, max over gold answers."""
    p = Counter(normalize(prediction).split())

    def one(gold: str) -> float:
        g = Counter(normalize(gold).split())
        return sum((p & g).values()) / sum(g.values()) if g else 0.0

    return max((one(g) for g in golds), default=0.0)


def coherence(prediction: str) -> float:
    """Coherence: distinct word trigrams / word trigrams of the prediction (1 = no repeated
    phrase; degenerate loops score near 0). Under three words: 1 if non-empty, else 0."""
    words = prediction.lower().split()
    if len(words) < 3:
        return float(bool(words))
    grams = list(zip(words, words[1:], words[2:]))
    return len(set(grams)) / len(grams)
