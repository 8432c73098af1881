"""budget-B beyond plain widths: a profile measured with codec tools (+rot, +prerope), dropped
layers competing with coded ones, and the card's header and framing inside the budget."""
import argparse
import dataclasses
import math

import pytest
import torch
from conftest import synthetic_profile, tiny_model

from qkv_core import bundled
from qkv_core.card.convert import codec_from_pb
from qkv_core.card.framing import frames, overhead_bound
from qkv_core.codec import allocation
from qkv_core.codec.allocation import CardTarget
from qkv_core.codec.encoding import encode_tensors, reconstructed, rope_removed
from qkv_core.codec.levels import LLOYD
from qkv_core.codec.quant import encoded_size
from qkv_core.codec.registry import KIVI, adaptive, codec_files, resolve, tooled
from qkv_core.codec.tools import ZSTD
from qkv_core.engine import calibration
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.selection import keep_prefix
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import RequestError
from qkv_core.model.kv import next_logits, prefill
from qkv_core.model.prompt import encode
from qkvcomm_cli.commands import calibrate as calibrate_cli

SAMPLES = bundled.samples()[:2]
CONTEXT = bundled.samples()[0][0]
TOOLS = "+rot+prerope"


@pytest.fixture(scope="module")
def lm():
    return tiny_model(layers=6, head_dim=64)


@pytest.fixture(scope="module")
def profiles(lm):
    return {tools: calibration.calibrate(lm, SAMPLES, max_tokens=96, tools=tools) for tools in ("", TOOLS)}


def _payload_bits(layers, shapes, kept=None):
    kept = range(len(shapes)) if kept is None else kept
    total = sum(encoded_size(c, *shapes[i]) for i in kept for c in (layers[i].key, layers[i].value))
    return 8 * total / (2 * sum(math.prod(s) for s in shapes))


def test_a_profile_measured_with_tools_allocates_codecs_with_them(lm, profiles):
    plain, tooled = profiles[""], profiles[TOOLS]
    assert (plain.tools, tooled.tools) == ("", TOOLS)
    for kind in ("key", "value"):  # K is rotated and pre-RoPE, V rotated: both measure differently
        assert tooled.sensitivity[kind]["2"] != plain.sensitivity[kind]["2"]
    shapes = [(lm.fingerprint.num_kv_heads, 300, lm.fingerprint.head_dim)] * 6
    kind = adaptive(f"budget-3{TOOLS}")
    layers = allocation.budget([tooled], kind, shapes).layers
    coded = [(c, k) for layer in layers for c, k in ((layer.key, "key"), (layer.value, "value")) if not c.is_float]
    assert coded and all(c.rotation and c.pre_rope == (k == "key") for c, k in coded)
    assert 2.9 <= _payload_bits(layers, shapes) <= 3.0  # the tools cost no bytes
    with pytest.raises(ValueError, match="calibrated with"):
        allocation.budget([plain], kind, shapes)


def test_the_sender_reads_the_profile_of_its_tools_and_the_receiver_reads_its_card(lm, profiles, tmp_path):
    path = tmp_path / "codec.json"
    profiles[""].save(path)
    profiles[TOOLS].save(tmp_path / f"codec{TOOLS}.json")  # beside the plain one, where the sender looks
    sender = SenderEngine(lm, profile_path=path)
    card = sender.prepare(CONTEXT, f"budget-4{TOOLS}+zstd")
    assert sender.profile(TOOLS) == profiles[TOOLS] and sender.profile() == profiles[""]
    key = card.header.layers[0].key
    assert key.pre_rope and key.rotation_seed and card.header.codec == f"budget-4{TOOLS}+zstd"
    stored = ReceiverEngine(lm).accept(frames(card.header, card.blobs)).kv
    ids = sender.context_ids(CONTEXT)
    kv, _ = prefill(lm, ids)
    for i, spec in enumerate(card.header.layers):  # what the codecs give back, RoPE restored at the context's positions
        for kind, tensors, got in (("key", kv.keys, stored.keys), ("value", kv.values, stored.values)):
            codec = codec_from_pb(getattr(spec, kind))
            expected = reconstructed([tensors[i]], [codec], lm.fingerprint, len(ids))[0]
            assert torch.allclose(got[i].float(), expected.float(), atol=1e-5), (i, kind)


def test_with_lloyd_each_tensor_takes_the_levels_its_profiles_favour():
    """budget-B+lloyd reads the profile with and the one without Lloyd-Max levels and offers both
    to every tensor. Here (as on SmolLM2 at 2-3 bits) the levels halve V's KL and double K's."""
    uniform = dataclasses.replace(synthetic_profile(), tools="+rot")
    scaled = {kind: {b: [e * (2.0 if kind == "key" else 0.5) for e in errs] for b, errs in by_bits.items()}
              for kind, by_bits in uniform.sensitivity.items()}
    lloyd = dataclasses.replace(uniform, tools="+rot+lloyd", sensitivity=scaled)
    kind = adaptive("budget-2.5+rot+lloyd")
    assert kind.profile_sets == ("+rot", "+rot+lloyd")
    layers = allocation.budget([uniform, lloyd], kind, [(3, 400, 64)] * 30).layers
    assert all(layer.key.levels == () and layer.key.rotation for layer in layers)
    assert all(layer.value.levels == LLOYD[layer.value.bits] for layer in layers if layer.value.bits in LLOYD)
    with pytest.raises(ValueError, match="needs profiles calibrated with"):
        allocation.budget([lloyd], kind, [(3, 400, 64)] * 30)


def test_a_lloyd_profile_fits_each_layers_levels_and_the_allocator_takes_them(lm, profiles, tmp_path):
    """Calibrating with +lloyd fits every layer's K and V levels on the contexts (keys above 1 bit
    with their ends exact), measures with them and stores them; budget-B+lloyd gives each tensor its own
    layer's levels, on the card too."""
    lloyd = calibration.calibrate(lm, SAMPLES, max_tokens=96, tools=TOOLS + "+lloyd")
    assert set(lloyd.levels) == {"key", "value"}
    for kind, by_bits in lloyd.levels.items():
        assert set(by_bits) == {str(b) for b in LLOYD}
        for bits, per_layer in by_bits.items():
            assert len(per_layer) == lm.num_layers
            assert all(len(x) == 1 << int(bits) and all(a < b for a, b in zip(x, x[1:])) for x in per_layer)
            if kind == "key" and bits != "1":
                assert all(x[0] == 0.0 and x[-1] == 1.0 for x in per_layer)
        assert len({tuple(x) for x in by_bits["3"]}) > 1  # layers differ
    assert lloyd.sensitivity != profiles[TOOLS].sensitivity  # measured with the levels
    codecs = lloyd.codecs("value", 2)
    assert [c.levels for c in codecs] == [tuple(x) for x in lloyd.levels["value"]["2"]]
    assert all(c.rotation for c in codecs) and lloyd.codecs("value", 5)[0].levels == ()

    kind = adaptive("budget-2.5+rot+prerope+lloyd+zstd")
    sender = SenderEngine(lm)
    ids = encode(lm.tokenizer, sender.prompt.context_part(CONTEXT))[:200]
    kv, _ = prefill(lm, ids)
    picked = allocation.allocate(kind, [profiles[TOOLS], lloyd], kv, card=CardTarget(lm.fingerprint)).layers
    own = [(i, kind_, getattr(layer, kind_)) for i, layer in enumerate(picked) for kind_ in ("key", "value")
           if getattr(layer, kind_).levels]
    assert own, "no tensor took levels"
    assert all(c.levels == tuple(lloyd.levels[k][str(c.bits)][i]) for i, k, c in own)
    lloyd.save(tmp_path / "lloyd.json")
    assert allocation.Profile.load(tmp_path / "lloyd.json", lm.fingerprint).codecs("key", 2) == lloyd.codecs("key", 2)


def test_a_lloyd_profile_without_levels_keeps_the_tables():
    """A profile made before per-layer levels was measured with the LLOYD tables: it still offers them."""
    old = dataclasses.replace(synthetic_profile(layers=4), tools="+rot+lloyd")
    assert old.levels == {} and all(c.levels == LLOYD[2] for c in old.codecs("key", 2))


def test_calibrate_codec_writes_a_tool_profile_and_its_allocation(lm, tmp_path):
    args = argparse.Namespace(max_tokens=96, out=tmp_path / "p.json", tools="", allocate=f"budget-3{TOOLS}", tokens=256,
                              codec_out=tmp_path / "codec.json", reuse=False)
    assert calibrate_cli._calibrate_codec(args, lm, SAMPLES) == 0
    assert allocation.Profile.load(args.out, lm.fingerprint).tools == TOOLS
    layers = resolve(str(args.codec_out), 6, codec_files([str(args.codec_out)]))
    assert all(layer.key.rotation and layer.key.pre_rope for layer in layers if not layer.key.is_float)
    with pytest.raises(SystemExit, match="\\+zstd"):
        calibrate_cli._calibrate_codec(argparse.Namespace(**{**vars(args), "allocate": "budget-3+zstd"}), lm, SAMPLES)


def test_layers_are_dropped_below_the_all_2_bit_card_cheapest_to_lose_first():
    shapes = [(3, 400, 64)] * 30
    harm = [0.01 * (i + 1) for i in range(30)]  # layer 0 is the cheapest to lose
    may_drop = CardTarget(may_drop=True)
    got = allocation.budget([synthetic_profile(dropped=harm)], adaptive("budget-1"), shapes, may_drop)
    assert got.selected is not None and 0 < len(got.selected) < 30
    assert got.selected == list(range(30 - len(got.selected), 30))
    assert 0.95 <= _payload_bits(got.layers, shapes, got.selected) <= 1.0
    with pytest.raises(RequestError, match="below the smallest allocation"):
        allocation.budget([synthetic_profile(dropped=harm)], adaptive("budget-1"), shapes)  # the card may not drop
    assert allocation.budget([synthetic_profile(dropped=harm)], adaptive("budget-3"), shapes, may_drop).selected is None
    # what a drop costs decides how many go: the cheaper, the more, and the kept ones coded wider
    cheap = allocation.budget([synthetic_profile(dropped=[1e-6] * 30)], adaptive("budget-1"), shapes, may_drop)
    dear = allocation.budget([synthetic_profile(dropped=[1e3] * 30)], adaptive("budget-1"), shapes, may_drop)
    assert len(cheap.selected) < len(dear.selected)
    width = lambda a: sum(a.layers[i].key.bits + a.layers[i].value.bits for i in a.selected) / len(a.selected)  # noqa: E731
    assert width(cheap) > width(dear)


def test_the_budget_pays_for_the_header():
    shapes = [(3, 400, 64)] * 30
    limit = 3 * 2 * sum(math.prod(s) for s in shapes) / 8
    step = 3 * 400 * 64 / 8  # one tensor one bit wider
    for overhead in (0, 20_000):
        layers = allocation.budget([synthetic_profile()], adaptive("budget-3"), shapes,
                                   CardTarget(overhead_bytes=overhead)).layers
        payload = sum(encoded_size(c, *s) for layer, s in zip(layers, shapes) for c in (layer.key, layer.value))
        assert limit - overhead - step <= payload <= limit - overhead


def test_a_card_with_dropped_layers_fits_its_budget_with_every_byte(lm, profiles, tmp_path):
    """budget-B where the all-2-bit card does not fit: the card drops layers, its frames (header
    and framing included) fit B bits per element, and the receiver fills the dropped layers with
    its own header KV, as it does for a --layers card."""
    path = tmp_path / "codec.json"
    profiles[""].save(path)
    assert len(profiles[""].dropped) == 6
    sender, receiver = SenderEngine(lm, profile_path=path), ReceiverEngine(lm)
    ids = sender.context_ids(CONTEXT)
    elements = 2 * 6 * lm.fingerprint.num_kv_heads * len(ids) * lm.fingerprint.head_dim
    card = sender.prepare(CONTEXT, "budget-1.5")
    sent = [spec.receiver_layer for spec in card.header.layers]
    wire = sum(f.ByteSize() for f in frames(card.header, card.blobs))
    assert 0 < len(sent) < 6 and card.header.layer_selection == "budget-1.5"
    assert 8 * wire / elements <= 1.5
    prefix = card.header.shared_prefix_tokens
    stored = receiver.accept(frames(card.header, card.blobs)).kv
    assert [k.shape[1] for k in stored.keys] == [len(ids) if i in sent else prefix for i in range(6)]
    kv, _ = prefill(lm, ids)
    q = encode(lm.tokenizer, sender.prompt.query_part("What does the text say?"))
    dropped_only = next_logits(lm, keep_prefix(kv, set(sent), prefix), q)
    assert (next_logits(lm, stored, q) - dropped_only).abs().max() < (dropped_only.abs().max() * 0.5)
    cross = sender.prepare(CONTEXT, "budget-1.5", receiver_layers=4)  # takes every layer its map reads: no drops
    assert cross.header.layer_selection == "" and len(cross.header.layers) == len(set(cross.header.layer_sources))


@pytest.mark.parametrize("codec", ["fp16", "kivi-2+zstd", "budget-3"])
def test_the_overhead_bound_holds(lm, profiles, tmp_path, codec):
    path = tmp_path / "codec.json"
    profiles[""].save(path)
    sender = SenderEngine(lm, profile_path=path)
    card = sender.prepare(CONTEXT, codec)
    wire = sum(f.ByteSize() for f in frames(card.header, card.blobs))
    ids = sender.context_ids(CONTEXT)
    kv, _ = prefill(lm, ids)
    bound = overhead_bound(lm.fingerprint, ids, kv, codec)
    # slack: room for levels
    assert wire - card.header.payload_bytes <= bound <= wire - card.header.payload_bytes + 250 * 6


SHIPPED_TOOLS = ("", "+rot+prerope", "+rot+prerope+s8", "+rot+prerope+lloyd")  # Makefile: PROFILE_TOOLS


@pytest.mark.integration
def test_the_embedded_model_ships_its_profiles(embedded, monkeypatch, tmp_path):
    """With an empty cache, the budget presets' profiles and the layer profile of the embedded
    model load from the package, and `calibrate --reuse` keeps them: nothing is calibrated or
    written."""
    from qkv_core.engine import selection  # noqa: PLC0415

    monkeypatch.setenv("QKVCOMM_CACHE_DIR", str(tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated although a profile is shipped")

    monkeypatch.setattr(calibration, "calibrate", refuse)
    monkeypatch.setattr(selection, "calibrate", refuse)
    for tools in SHIPPED_TOOLS:
        profile = calibration.load_or_calibrate(embedded, tools=tools)
        assert profile.tools == tools and profile.num_layers == embedded.num_layers and profile.dropped
        assert bool(profile.levels) == tools.endswith("+lloyd")
    assert len(selection.load_or_calibrate(embedded).loo) == embedded.num_layers
    reuse = argparse.Namespace(max_tokens=512, out=None, tools="+rot+prerope", allocate=None, reuse=True)
    assert calibrate_cli._calibrate_codec(reuse, embedded, []) == 0  # what the image's build runs
    assert calibrate_cli._calibrate_layers(reuse, embedded, []) == 0
    assert not any(tmp_path.iterdir())


def test_a_model_without_shipped_profiles_calibrates_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("QKVCOMM_CACHE_DIR", str(tmp_path))
    lm = tiny_model(layers=2)
    profile = calibration.load_or_calibrate(lm, tools="+rot")
    saved = tmp_path / "profiles" / allocation.Profile.path_for(lm.fingerprint, None, "+rot").name
    assert profile.tools == "+rot" and saved.exists()


def test_coded_sizes_equal_the_coded_tensors_with_every_tool(lm):
    """The sizer codes rotated, pre-RoPE tensors made once per tool set without those two tools:
    the bytes equal coding each tensor with every tool, as the card does."""
    ids = encode(lm.tokenizer, SenderEngine(lm).prompt.context_part(CONTEXT))[:150]
    kv, _ = prefill(lm, ids)
    sizes = allocation.coded_sizer(kv, CardTarget(lm.fingerprint))
    for bits in (1, 2, 3):
        for kind, tensors in (("key", kv.keys), ("value", kv.values)):
            tooled_codec = tooled(getattr(KIVI(bits), kind), kind, ("+rot", "+prerope", "+s8"))
            codecs = [ZSTD.apply(tooled_codec, 0)] * len(tensors)
            coded = encode_tensors([rope_removed(t, c, lm.fingerprint, len(ids)) for t, c in zip(tensors, codecs)],
                                   codecs)
            assert sizes(kind, codecs) == [b.numel() for b in coded]
