"""Injection through the Cache API on the tiny model: the cache really carries the context."""
import torch

from qkv_core import codec as codecs
from qkv_core.card import CardReader, build_header, encode_layers, frames
from qkv_core.kv import KVCache, generate, next_logits, prefill
from qkv_core.prompt import PromptFormat, encode

CONTEXT = "Bulk exports moved to the /v4/exports endpoint."
QUESTION = "Where did bulk exports move?"


def _split(lm):
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    c, q = encode(lm.tokenizer, fmt.context_part(CONTEXT)), encode(lm.tokenizer, fmt.query_part(QUESTION))
    assert c + q == encode(lm.tokenizer, fmt.full(CONTEXT, QUESTION))
    return c, q


def _through_card(lm, kv, ids, name):
    layer_codecs = codecs.resolve(name, lm.num_layers)
    reader = CardReader(lm.fingerprint, 1 << 30)
    layers = {}
    for frame in frames(build_header(lm.fingerprint, ids, kv, name, layer_codecs), encode_layers(kv, layer_codecs)):
        if (i := reader.feed(frame)) is not None:
            layers[i] = reader.decode_layer(i, lm.device, lm.dtype)
    reader.finish()
    return KVCache([layers[i][0] for i in range(lm.num_layers)], [layers[i][1] for i in range(lm.num_layers)])


def test_injected_cache_reproduces_full_prompt(tiny):
    c, q = _split(tiny)
    full = next_logits(tiny, None, c + q)
    kv, _ = prefill(tiny, c)
    assert torch.allclose(next_logits(tiny, kv, q), full, atol=1e-5)
    assert torch.allclose(next_logits(tiny, _through_card(tiny, kv, c, "fp32"), q), full, atol=1e-5)
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
