"""Layer selection: scores, methods, and selective injection end to end on the tiny model."""
import pytest
import torch
from conftest import tiny_model

from qkv_core import bundled
from qkv_core.card.framing import frames
from qkv_core.engine import selection
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.selection import LayerProfile, SelectionConfig
from qkv_core.engine.sender import SenderEngine
from qkv_core.model.kv import next_logits, prefill
from qkv_core.model.prompt import encode

CONTEXT = "The rate limit is 600 requests per minute. Bulk exports moved to the /v4/exports endpoint."


@pytest.fixture(scope="module")
def lm():
    return tiny_model(layers=6)


@pytest.fixture(scope="module")
def profile(lm):
    return selection.calibrate(lm, bundled.samples()[:2])


def test_calibration_measures_every_layer_and_round_trips(lm, profile, tmp_path):
    assert len(profile.attention) == len(profile.loo) == 6 and profile.samples == 2
    assert all(0 <= a <= 1 for a in profile.attention)  # a share of the attention mass
    assert len(set(profile.loo)) > 1  # dropping different layers changes the answer differently
    path = tmp_path / "layers.json"
    profile.save(path)
    assert LayerProfile.load(path, lm.fingerprint) == profile


def test_methods_pick_what_they_promise():
    profile = LayerProfile("m", "0" * 64, 1, attention=[0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0],
                           loo=[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    pick = lambda method, **kw: selection.select(SelectionConfig(ratio=0.2, method=method, **kw), 10, profile)  # noqa: E731
    assert pick("attention") == [1, 3]
    assert pick("prior", gamma_mu=0.5, gamma_sigma=0.1) == [4, 5]  # the Gaussian's peak at 0.5 * L
    assert pick("loo") == [0, 9]
    block = selection.select(SelectionConfig(ratio=0.4, method="contiguous", alpha=1.0), 10, profile)
    assert block == [1, 2, 3, 4]  # the best run of four consecutive layers by attention (sum 2.2)
    assert pick("random", seed=1) == pick("random", seed=1) and len(pick("random", seed=2)) == 2
    assert selection.select(SelectionConfig(ratio=1.0), 10) == list(range(10))
    assert selection.select(SelectionConfig(ratio=0.2, method="prior"), 10) == pick("prior")  # no profile needed
    with pytest.raises(ValueError, match="needs a calibrated profile"):
        selection.select(SelectionConfig(ratio=0.2, method="loo"), 10)
    with pytest.raises(ValueError):
        SelectionConfig(ratio=0)
    with pytest.raises(ValueError, match="unknown layer selection"):
        SelectionConfig(method="best")


def _engines(lm, tmp_path, profile):
    sender = SenderEngine(lm, layer_profile_path=tmp_path / "layers.json")
    profile.save(tmp_path / "layers.json")
    return sender, ReceiverEngine(lm)


def test_unselected_layers_cost_nothing_and_get_the_shared_prefix(lm, profile, tmp_path):
    sender, receiver = _engines(lm, tmp_path, profile)
    full = sender.prepare(CONTEXT, "fp32")
    half = sender.prepare(CONTEXT, "fp32", layers=SelectionConfig(ratio=0.5))
    chosen = [spec.receiver_layer for spec in half.header.layers]
    assert chosen == selection.select(SelectionConfig(ratio=0.5), 6, profile) and len(chosen) == 3
    per_layer = full.header.payload_bytes // 6
    assert half.header.payload_bytes == 3 * per_layer and len(half.blobs) == 3
    wire = lambda card: sum(f.ByteSize() for f in frames(card.header, card.blobs))  # noqa: E731
    assert wire(half) < 0.55 * wire(full)
    prefix = half.header.shared_prefix_tokens
    assert prefix > 0 and half.header.layer_selection == "loo@0.5"  # the default method
    stored = receiver.accept(frames(half.header, half.blobs)).kv
    ids = sender.context_ids(CONTEXT)
    assert [k.shape[1] for k in stored.keys] == [len(ids) if i in chosen else prefix for i in range(6)]
    # the receiver's answer logits equal the sender's own cache cut the same way
    kv, _ = prefill(lm, ids)
    q = sender.prompt.query_part("What is the rate limit?")
    q_ids = encode(lm.tokenizer, q)
    expected = next_logits(lm, selection.keep_prefix(kv, set(chosen), prefix), q_ids)
    assert torch.allclose(next_logits(lm, stored, q_ids), expected, atol=1e-5)


def test_ratio_one_is_plain_injection(lm, profile, tmp_path):
    sender, receiver = _engines(lm, tmp_path, profile)
    card = sender.prepare(CONTEXT, "fp32", layers=SelectionConfig(ratio=1.0))
    assert len(card.header.layers) == 6 and card.header.shared_prefix_tokens == 0
    assert not receiver.accept(frames(card.header, card.blobs)).kv.is_ragged
