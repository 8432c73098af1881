"""Ragged caches: layers holding different numbers of tokens attend correctly."""
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from qkv_core.model.kv import generate, next_logits, prefill
from qkv_core.model.prompt import PromptFormat, encode
from qkv_core.types import KVCache

CONTEXT = "The rate limit is 600 requests per minute. Bulk exports moved to the /v4/exports endpoint."


def _setup(lm):
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    c = encode(lm.tokenizer, fmt.context_part(CONTEXT))
    q = encode(lm.tokenizer, fmt.query_part("What is the rate limit?"))
    full, _ = prefill(lm, c)
    return c, q, full


def _ragged(full: KVCache, keep: set[int], prefix: int) -> KVCache:
    cut = lambda i, t: t if i in keep else t[:, :prefix]  # noqa: E731
    return KVCache([cut(i, k) for i, k in enumerate(full.keys)], [cut(i, v) for i, v in enumerate(full.values)])


def test_all_layers_selected_equals_plain_injection_exactly(tiny):
    c, q, full = _setup(tiny)
    plain = next_logits(tiny, full, q)
    assert torch.equal(next_logits(tiny, _ragged(full, {0, 1, 2}, 5), q), plain)


@pytest.mark.parametrize("keep", [{1}, {0, 2}, {2}])
def test_ragged_attention_matches_a_masked_reference(tiny, keep):
    """Reference: every layer keeps the whole cache, and the unselected layers' attention to
    the dropped context positions is masked out by hand (a different path to the same math)."""
    c, q, full = _setup(tiny)
    prefix = 6

    def masked_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        q_len, k_len = query.shape[-2], key.shape[-2]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
        if module.layer_idx not in keep:
            allowed[:, prefix : len(c)] = False
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        scores = (query @ key.transpose(-1, -2)) * scaling
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (weights @ value).transpose(1, 2), None

    AttentionInterface.register("test_masked_reference", masked_reference)
    AttentionMaskInterface.register("test_masked_reference", lambda *a, **k: None)
    previous = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("test_masked_reference")
    try:
        reference = next_logits(tiny, full, q)
    finally:
        tiny.model.set_attn_implementation(previous)
    got = next_logits(tiny, _ragged(full, keep, prefix), q)
    assert torch.allclose(got, reference, atol=1e-5)
    assert (got - next_logits(tiny, full, q)).abs().max() > 1e-3  # and dropping layers did change something


def test_decoding_on_a_ragged_cache_uses_true_positions(tiny):
    c, q, full = _setup(tiny)
    ragged = _ragged(full, {1, 2}, 6)  # layer 0, the one transformers reads lengths from, is short
    tokens = list(generate(tiny, ragged, q, 6))
    # the same greedy tokens, decoded one step at a time by hand with explicit growth of the cache
    kv, step = ragged, q
    expected = []
    for _ in range(len(tokens)):
        kv, logits = prefill(tiny, step, past=kv)
        expected.append(int(logits.argmax()))
        step = expected[-1:]
    assert tokens == expected
