"""Injection through the Cache API on the tiny model: the cache really carries the context."""
import torch
from conftest import card_round_trip

from qkv_core.model.kv import generate, next_logits, prefill
from qkv_core.model.prompt import PromptFormat, encode

CONTEXT = "Bulk exports moved to the /v4/exports endpoint."
QUESTION = "Where did bulk exports move?"


def _split(lm):
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    c, q = encode(lm.tokenizer, fmt.context_part(CONTEXT)), encode(lm.tokenizer, fmt.query_part(QUESTION))
    assert c + q == encode(lm.tokenizer, fmt.full(CONTEXT, QUESTION))
    return c, q


def test_injected_cache_reproduces_full_prompt(tiny):
    c, q = _split(tiny)
    full = next_logits(tiny, None, c + q)
    kv, _ = prefill(tiny, c)
    assert torch.allclose(next_logits(tiny, kv, q), full, atol=1e-5)
    assert torch.allclose(next_logits(tiny, card_round_trip(tiny, kv, c, "fp32"), q), full, atol=1e-5)
    # Withheld: the query alone gives other logits, so the cache is what carried the context.
    assert (next_logits(tiny, None, q) - full).abs().max() > 1e-2
    # A cache of a different context gives other logits too.
    other, _ = prefill(tiny, encode(tiny.tokenizer, PromptFormat.for_tokenizer(tiny.tokenizer).context_part("x y z")))
    assert (next_logits(tiny, other, q) - full).abs().max() > 1e-2


def test_decoding_leaves_the_stored_cache_untouched(tiny):
    c, q = _split(tiny)
    kv, _ = prefill(tiny, c)
    before = [k.clone() for k in kv.keys]
    list(generate(tiny, kv, q, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, kv.keys))
    assert kv.tokens == len(c)
