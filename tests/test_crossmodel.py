"""Cross-model handoff: layer map, RoPE handling, the two alignments and the receiver's refusal."""
from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, tiny_model

from qkv_core.card.framing import frames
from qkv_core.codec import rope
from qkv_core.engine.crossmodel import Alignment, aligned_positions, fit, inv_freqs, layer_sources
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import CardError, ErrorKind
from qkv_core.model.kv import generate, prefill
from qkv_core.model.prompt import encode

TEXTS = CORPUS * 2


def test_layer_sources_by_relative_depth():
    assert layer_sources(5, 5) == [0, 1, 2, 3, 4]
    down = layer_sources(30, 18)
    assert len(down) == 18 and down[0] == 0 and down[-1] == 29 and down == sorted(set(down))
    up = layer_sources(18, 30)
    assert len(up) == 30 and up[0] == 0 and up[-1] == 17 and up == sorted(up) and set(up) == set(range(18))


def test_aligned_positions_follow_character_offsets():
    sender = [(0, 3), (3, 8), (8, 9), (9, 15)]  # "The" " rate" " " "limits"
    receiver = [(0, 2), (2, 3), (3, 9), (9, 12), (12, 15)]
    assert aligned_positions(sender, receiver) == [0, 0, 2, 3, 3]


def test_rope_is_undone_exactly():
    """Layer 0's key of a token depends on the token alone once RoPE is undone: the same token
    at two positions gives the same de-rotated key (and rotating back restores the cache)."""
    lm = tiny_model(seed=5)
    ids = encode(lm.tokenizer, "fox fox")
    tok = ids[0]
    ids = [tok, *ids[1:-1], tok] if len(ids) > 2 else [tok, tok]
    kv, _ = prefill(lm, ids)
    freq = inv_freqs(lm)[0]
    # the frequencies a reader derives from the fingerprint alone are the model's
    torch.testing.assert_close(rope.inv_freq(lm.fingerprint).float(), freq)
    plain = rope.apply(kv.keys[0], freq, 0, -1.0)
    torch.testing.assert_close(plain[:, 0], plain[:, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kv.keys[0][:, 0], kv.keys[0][:, -1], atol=1e-3)  # RoPE did move them
    torch.testing.assert_close(rope.apply(plain, freq, 0), kv.keys[0], rtol=1e-5, atol=1e-5)
    # positions count from `start`: the last token alone, at its position, is undone the same way
    torch.testing.assert_close(rope.apply(kv.keys[0][:, -1:], freq, len(ids) - 1, -1.0), plain[:, -1:], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("method", ["stats", "ridge"])
def test_a_model_aligned_onto_itself_is_the_identity(method, tmp_path):
    lm = tiny_model(seed=6)
    alignment = fit(lm, lm, TEXTS, method)
    assert alignment.sources == list(range(lm.fingerprint.num_layers))
    kv, _ = prefill(lm, encode(lm.tokenizer, CORPUS[2]))
    tol = 1e-4 if method == "stats" else 2e-2
    saved = tmp_path / f"a{'.json' if method == 'stats' else '.safetensors'}"
    for a in (alignment, Alignment.load(alignment.save(saved))):
        out = a.apply(kv, lm.device, lm.dtype)
        for got, want in zip(out.keys + out.values, kv.keys + kv.values):
            assert (got - want).norm() / want.norm() < tol


@pytest.mark.parametrize("method", ["stats", "ridge"])
def test_receiver_takes_another_models_card_only_with_an_alignment(method):
    sender_lm = tiny_model(seed=7, layers=3, head_dim=16)
    receiver_lm = tiny_model(seed=8, layers=5, head_dim=8)
    card = SenderEngine(sender_lm).prepare(CORPUS[0], "kivi-4")
    stream = list(frames(card.header, card.blobs))

    with pytest.raises(CardError) as refused:
        ReceiverEngine(receiver_lm).accept(stream)
    assert refused.value.kind == ErrorKind.PRECONDITION and "calibrate pair" in str(refused.value)

    alignment = fit(sender_lm, receiver_lm, TEXTS, method)
    stored = ReceiverEngine(receiver_lm, alignments=[alignment]).accept(stream)
    mapped = SenderEngine(sender_lm).prepare(CORPUS[0], "kivi-4", receiver_layers=receiver_lm.num_layers)
    assert list(mapped.header.layer_sources) == alignment.sources
    assert [spec.sender_layer for spec in mapped.header.layers] == sorted(set(alignment.sources))
    via_map = ReceiverEngine(receiver_lm, alignments=[alignment]).accept(frames(mapped.header, mapped.blobs))
    for a, b in zip(via_map.kv.keys + via_map.kv.values, stored.kv.keys + stored.kv.values):
        assert torch.equal(a, b)
    fp = receiver_lm.fingerprint
    assert stored.kv.num_layers == fp.num_layers
    assert all(k.shape == (fp.num_kv_heads, card.header.context_tokens, fp.head_dim) for k in stored.kv.keys)
    assert len(list(generate(receiver_lm, stored.kv, encode(receiver_lm.tokenizer, " Q:"), 3))) == 3

    with pytest.raises(ValueError, match="another receiver"):
        ReceiverEngine(sender_lm, alignments=[alignment])
    with pytest.raises(CardError, match="mapped for a receiver"):  # a mapped card reaching its own model
        ReceiverEngine(sender_lm).accept(frames(mapped.header, mapped.blobs))


def test_a_card_for_a_shallower_receiver_carries_only_the_layers_it_reads():
    sender = SenderEngine(tiny_model(seed=9, layers=5))
    full = sender.prepare(CORPUS[1], "kivi-4")
    mapped = sender.prepare(CORPUS[1], "kivi-4", receiver_layers=3)
    assert list(mapped.header.layer_sources) == [0, 2, 4]
    assert [spec.sender_layer for spec in mapped.header.layers] == [0, 2, 4]
    assert mapped.header.payload_bytes * 5 == full.header.payload_bytes * 3
    assert mapped.header.card_id != full.header.card_id
