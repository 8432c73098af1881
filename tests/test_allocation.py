import math

import pytest
import torch
from conftest import card_round_trip, synthetic_profile, tiny_model

from qkv_core import bundled
from qkv_core.codec import allocation
from qkv_core.codec.quant import encoded_size
from qkv_core.codec.registry import Adaptive, adaptive, codec_files, resolve, save_layers
from qkv_core.codec.tensor_codec import FP16_BITS
from qkv_core.engine import calibration
from qkv_core.engine.sender import SenderEngine
from qkv_core.model.kv import prefill
from qkv_core.model.prompt import PromptFormat, encode

SAMPLES = bundled.samples()[:2]


@pytest.fixture(scope="module")
def profile(tiny):
    return calibration.calibrate(tiny, SAMPLES, max_tokens=96)


@pytest.fixture(scope="module")
def wide_profile():
    return synthetic_profile()


def _kind(target: float) -> Adaptive:
    return adaptive(f"budget-{target:g}")


def _bits(layers, shapes):
    total = sum(encoded_size(c, *s) for layer, s in zip(layers, shapes) for c in (layer.key, layer.value))
    return 8 * total / (2 * sum(math.prod(s) for s in shapes))


def test_profile_errors_fall_with_width_and_round_trip_through_json(tiny, profile, tmp_path):
    for family in allocation.FAMILIES:
        for kind in allocation.KINDS:
            errs = [sum(profile.error(family, kind, b)) for b in allocation.BITS]
            assert all(a > b for a, b in zip(errs, errs[1:])), (family, kind, errs)
    for kind in allocation.KINDS:  # the next-token KL falls too, from clearly positive to about 0
        kl = [sum(profile.sensitivity[kind][str(b)]) for b in allocation.BITS]
        assert kl[0] > 10 * kl[-1] and min(kl) >= -1e-6, (kind, kl)
    # per-channel/per-token beats per-tensor at the same width on every layer's keys
    assert all(k < t for k, t in zip(profile.error("kivi", "key", 4), profile.error("tensor", "key", 4)))
    path = tmp_path / "p.json"
    profile.save(path)
    assert allocation.Profile.load(path, tiny.fingerprint) == profile
    with pytest.raises(ValueError, match="calibrated on"):
        allocation.Profile.load(path, tiny_model(seed=1).fingerprint)


def test_seed_adaptive_gives_the_most_sensitive_layers_the_most_bits(profile):
    layers = allocation.seed_adaptive(profile)
    sensitivity = [k + v for k, v in zip(profile.error("tensor", "key", 4), profile.error("tensor", "value", 4))]
    bits = [layer.key.bits for layer in layers]
    assert sorted(bits) == sorted([8, 6, 4])  # 3 layers: 30/40/30 rounds to one each
    assert bits[max(range(3), key=sensitivity.__getitem__)] == 8
    assert bits[min(range(3), key=sensitivity.__getitem__)] == 4


@pytest.mark.parametrize("tokens", [40, 300, 1024])
@pytest.mark.parametrize("target", [2.6, 3.0, 3.5, 4.25, 6.0, 7.5])
def test_budget_meets_its_target_within_005_bits(wide_profile, target, tokens):
    shapes = [(3, tokens, 64)] * 30
    try:
        layers = allocation.budget([wide_profile], _kind(target), shapes).layers
    except ValueError as e:  # only when even all-2-bit does not fit (short contexts pay for scales)
        assert "below the smallest allocation" in str(e)
        assert _bits([resolve("kivi-2", 1)[0]] * 30, shapes) > target
        return
    got = _bits(layers, shapes)
    assert target - 0.05 <= got <= target


def test_budget_buys_error_where_it_is_cheapest(profile):
    shapes = [(2, 300, 16)] * 3
    err = {}
    for target in (3.5, 4.5, 6.0):
        layers = allocation.budget([profile], _kind(target), shapes).layers
        assert _bits(layers, shapes) <= target
        err[target] = sum(
            0.0 if c.bits == FP16_BITS else profile.sensitivity[kind][str(c.bits)][i]
            for i, layer in enumerate(layers) for kind, c in (("key", layer.key), ("value", layer.value))
        )
        # never worse than the widest uniform KIVI width that fits the same budget
        width = max(b for b in allocation.BITS if _bits(resolve(f"kivi-{b}", 3), shapes) <= target)
        uniform_err = sum(profile.sensitivity[k][str(width)][i] for i in range(3) for k in allocation.KINDS)
        assert err[target] <= uniform_err + 1e-12
    assert err[3.5] > err[4.5] > err[6.0]


def test_tokenmix_fits_the_budget_and_favours_attended_tokens():
    shapes = [(3, 200, 64)] * 30
    importance = torch.rand(200, generator=torch.Generator().manual_seed(0))
    layers, salient = allocation.tokenmix(3.0, shapes, importance)
    assert salient == sorted(salient) and salient
    assert all(p >= allocation.TOKENMIX_SINK for p in salient)
    ranked = importance[allocation.TOKENMIX_SINK :].argsort(descending=True)
    top = set(ranked[: len(salient)].add(allocation.TOKENMIX_SINK).tolist())
    assert set(salient) == top
    count = len(salient) - sum(1 for p in salient if p < allocation.TOKENMIX_SINK)
    total = sum(encoded_size(c, *s, count) for s in shapes for c in (layers[0].key, layers[0].value))
    assert 3.0 - 0.05 <= 8 * total / (2 * sum(math.prod(s) for s in shapes)) <= 3.0


def test_adaptive_cards_round_trip_through_the_receiver(tmp_path):
    tiny = tiny_model(head_dim=64)  # head_dim 16 spends 2 bits per value on per-token scales
    fmt = PromptFormat.for_tokenizer(tiny.tokenizer)
    ids = encode(tiny.tokenizer, fmt.context_part(" ".join(c for c, _, _ in SAMPLES)))[:200]
    kv, _ = prefill(tiny, ids)
    sender = SenderEngine(tiny, profile_path=tmp_path / "profile.json")
    importance = torch.linspace(0, 1, len(ids))  # the latest tokens matter most
    for name in ("seed-adaptive", "budget-3", "tokenmix-3"):
        got = card_round_trip(tiny, kv, ids, name, sender, importance)
        for a, b in zip(kv.keys + kv.values, got.keys + got.values):
            assert a.shape == b.shape
            assert (a - b).norm() / a.norm() < 0.5, name
    assert (tmp_path / "profile.json").exists()  # calibrated once, saved, reused
    # tokenmix: the 8-bit salient tokens come back far closer than the 3-bit ones
    got = card_round_trip(tiny, kv, ids, "tokenmix-3", sender, importance)
    layers, salient = allocation.tokenmix(3.0, [tuple(k.shape) for k in kv.keys], importance)
    ordinary = [p for p in range(allocation.TOKENMIX_SINK, len(ids)) if p not in set(salient)]
    err = lambda pos: (kv.values[0][:, pos] - got.values[0][:, pos]).norm() / kv.values[0][:, pos].norm()  # noqa: E731
    assert err(salient) < err(ordinary) / 4
    sink = list(range(allocation.TOKENMIX_SINK))
    assert torch.allclose(got.values[0][:, sink], kv.values[0][:, sink].half().float())


def test_codec_files_carry_an_allocation(profile, tmp_path):
    layers = allocation.budget([profile], _kind(3.5), [(2, 300, 16)] * 3).layers
    path = tmp_path / "alloc.json"
    save_layers(path, layers, note="budget-3.5")
    files = codec_files([str(path)])
    assert resolve(str(path), 3, files) == layers
    with pytest.raises(ValueError, match="has 3 layers"):
        resolve(str(path), 4, files)


def test_one_bit_tensors_are_a_last_resort(wide_profile):
    """At 40 tokens the all-2-bit card takes 2.65 bits per element (scales weigh most on short
    contexts): a budget below it spends 1-bit tensors to fit, one above it never does."""
    shapes = [(3, 40, 64)] * 30
    assert 2.6 < _bits([resolve("kivi-2", 1)[0]] * 30, shapes) < 2.7
    tight = allocation.budget([wide_profile], _kind(2.3), shapes).layers
    assert 2.25 <= _bits(tight, shapes) <= 2.3
    assert any(c.bits == 1 for layer in tight for c in (layer.key, layer.value))
    roomy = allocation.budget([wide_profile], _kind(3.0), shapes).layers
    assert min(c.bits for layer in roomy for c in (layer.key, layer.value)) >= 2
    with pytest.raises(ValueError, match="below the smallest allocation"):
        allocation.budget([wide_profile], _kind(1.5), shapes)  # every tensor at 1 bit is the floor
