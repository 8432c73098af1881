"""codec auto: the decision on synthetic inputs (crossovers where the arithmetic puts them, the
quality floor), the estimates, and the candidates' bytes and predicted quality."""
from __future__ import annotations

import dataclasses
import math

import pytest

from qkv_core.codec import allocation
from qkv_core.codec.registry import TEXT, parse
from qkv_core.codec.registry import wire_bytes as registry_wire_bytes
from qkv_core.errors import RequestError
from qkv_core.policy.auto import AutoPolicy, parse_candidates
from qkv_core.policy.decide import Link, Option, Receiver, Request, decide, predict
from qkv_core.policy.estimates import MIN_TRANSFER_BYTES, LinkEstimate
from qkv_core.policy.quality import candidate_layers, quality_loss
from qkv_core.types import Fingerprint

RECEIVER = Receiver(prefill_tokens_per_s=600.0, first_token_s=0.05, dequantize_bytes_per_s=1e9)
REQUEST = Request(tokens=2000, layers=30, fp16_bytes=2000 * 23040)
TEXT_OPTION = Option(TEXT, 8_000)
KIVI4 = Option("kivi-4", 12_500_000, quality_loss=0.1, quantize_bytes_per_s=5e8)


def _crossover() -> float:
    """The throughput (bytes/s) where kivi-4 and text take equal time, solved from the formulas by
    hand: text = rtt + 8e3/T + 2000/600 + ft; card = 46.08e6/5e8 + rtt + 12.5e6/T + 46.08e6/1e9/30 + ft."""
    fixed_text = 2000 / 600
    fixed_card = REQUEST.fp16_bytes / 5e8 + REQUEST.fp16_bytes / 1e9 / 30
    return (12_500_000 - 8_000) / (fixed_text - fixed_card)


@pytest.mark.parametrize("rtt", [0.0005, 0.05])
def test_text_wins_below_the_crossover_and_the_card_above_it(rtt):
    t_star = _crossover()
    assert 3e6 < t_star < 5e6  # ~ 30 Mbit/s with these numbers
    below = decide([TEXT_OPTION, KIVI4], REQUEST, Link(t_star * 0.9, rtt), RECEIVER, max_quality_loss=1.0)
    above = decide([TEXT_OPTION, KIVI4], REQUEST, Link(t_star * 1.1, rtt), RECEIVER, max_quality_loss=1.0)
    assert below.chosen.option.name == TEXT and above.chosen.option.name == "kivi-4"
    at = [predict(o, REQUEST, Link(t_star, rtt), RECEIVER) for o in (TEXT_OPTION, KIVI4)]
    assert at[0] == pytest.approx(at[1], rel=1e-9)


def test_a_fast_receiver_makes_text_win_at_any_link_speed():
    gpu = Receiver(prefill_tokens_per_s=300_000.0, first_token_s=0.01, dequantize_bytes_per_s=2e10)
    for throughput in (1.25e6, 1.25e8, 1.25e10):  # 10 Mbit/s .. 100 Gbit/s
        choice = decide([TEXT_OPTION, KIVI4], REQUEST, Link(throughput, 0.001), gpu, max_quality_loss=1.0)
        assert choice.chosen.option.name == TEXT


def test_decoding_slower_than_the_link_bounds_the_card():
    slow = Receiver(600.0, 0.05, dequantize_bytes_per_s=1e7)  # 4.6 s to decode the card
    fast_link = Link(1e10, 0.0)
    assert predict(KIVI4, REQUEST, fast_link, slow) == pytest.approx(
        REQUEST.fp16_bytes / 5e8 + REQUEST.fp16_bytes / 1e7 * (1 + 1 / 30) + 0.05)


def test_the_quality_floor_is_never_crossed():
    link = Link(1.25e7, 0.0001)  # 100 Mbit/s: kivi-2 (0.5 s) < kivi-4 (1.1 s) < text (3.4 s) < fp16 (3.8 s)
    options = [TEXT_OPTION, Option("fp16", REQUEST.fp16_bytes, 0.0, 5e9), KIVI4, Option("kivi-2", 6e6, 2.0, 5e8)]
    for floor, best in ((5.0, "kivi-2"), (0.5, "kivi-4"), (0.05, TEXT), (0.0, TEXT)):
        choice = decide(options, REQUEST, link, RECEIVER, max_quality_loss=floor)
        assert choice.chosen.option.name == best and choice.chosen.option.quality_loss <= floor
        assert [s.eligible for s in choice.scored] == [o.quality_loss <= floor for o in options]
    with pytest.raises(ValueError, match="quality floor"):
        decide([KIVI4], REQUEST, link, RECEIVER, max_quality_loss=0.01)


def test_the_link_estimate_takes_out_the_round_trip_and_skips_small_transfers():
    link = LinkEstimate()
    assert not link.known
    link.observe_rtt(0.1)
    link.observe_transfer(10_000, 0.2)  # small: says little about throughput
    assert link.throughput.value is None and not link.known
    link.observe_transfer(10_000, 0.2, force=True)  # a probe
    assert link.throughput.value == pytest.approx(10_000 / 0.1)
    link.observe_transfer(MIN_TRANSFER_BYTES * 4, 1.1)
    expected = 0.3 * (MIN_TRANSFER_BYTES * 4 / 1.0) + 0.7 * 1e5
    assert link.known and link.throughput.value == pytest.approx(expected)


@pytest.fixture(scope="module")
def profile():
    """A 4-layer profile whose KL falls x4 per bit, layers scaled 1, 2, 3, 4."""
    sensitivity = {k: {str(b): [(layer + 1) * 4.0 ** -b for layer in range(4)] for b in allocation.BITS}
                   for k in allocation.KINDS}
    errors = {f: sensitivity for f in allocation.FAMILIES}
    return allocation.Profile("synthetic", "0" * 64, 1, 1, errors, sensitivity)


def wire_bytes(layers, fp: Fingerprint, tokens: int) -> int:
    return registry_wire_bytes(layers, fp.num_kv_heads, tokens, fp.head_dim)


FP = Fingerprint("synthetic", "llama", 4, 2, 64, "{}", "0" * 64, "0" * 64)


def test_candidates_cost_what_the_profile_and_the_codec_say(profile):
    tokens = 512
    for bits in (2, 4, 8):
        layers = candidate_layers(parse(f"kivi-{bits}", FP.num_layers), [profile], FP, tokens)
        assert quality_loss(layers, [profile]) == pytest.approx(2 * sum((i + 1) * 4.0 ** -bits for i in range(4)))
        assert bits < 8 * wire_bytes(layers, FP, tokens) / (2 * 4 * 2 * tokens * 64) < bits + 0.6
    fp16 = candidate_layers(parse("fp16", FP.num_layers), [profile], FP, tokens)
    assert quality_loss(fp16, [profile]) == 0 and wire_bytes(fp16, FP, tokens) == FP.kv_bytes(tokens, 2)
    budget = candidate_layers(parse("budget-3", FP.num_layers), [profile], FP, tokens)
    assert 8 * wire_bytes(budget, FP, tokens) / (2 * 4 * 2 * tokens * 64) <= 3
    kivi2 = candidate_layers(parse("kivi-2", FP.num_layers), [profile], FP, tokens)
    assert quality_loss(budget, [profile]) < quality_loss(kivi2, [profile])
    with pytest.raises(RequestError, match="no quality prediction"):
        quality_loss(candidate_layers(parse("int8", FP.num_layers), [profile], FP, tokens), [profile])


def test_the_policy_lists_what_applies_and_times_its_own_quantization(profile):
    policy = AutoPolicy(FP, lambda tools: profile, [TEXT, "fp16", "kivi-4", "budget-2"], max_quality_loss=1.0)
    options = {o.name: o for o in policy.options("a context " * 10, tokens=16)}
    assert "budget-2" not in options  # 16 tokens: scales alone cost more than 2 bits per element
    assert options[TEXT].wire_bytes == len("a context " * 10)
    assert options["kivi-4"].quantize_bytes_per_s > 0 and math.isfinite(options["kivi-4"].quantize_bytes_per_s)
    policy.link.observe_rtt(0.001)
    policy.link.observe_transfer(1 << 20, 0.011, force=True)
    decision = policy.choose("a context " * 10, 16, RECEIVER)
    eligible = [s for s in decision.scored if s.eligible]
    assert decision.chosen == min(eligible, key=lambda s: s.predicted_s)


def test_a_card_is_predicted_as_the_delta_it_would_be_over_a_held_prefix(profile):
    """With 496 of 512 tokens held, kivi-4 is predicted as a 16-token delta (bytes, encoding and
    decoding of those alone), while budget-2 cannot be built at 16 tokens and is no option."""
    policy = AutoPolicy(FP, lambda tools: profile, [TEXT, "fp16", "kivi-4", "budget-2"], max_quality_loss=1.0)
    policy.link.observe_rtt(0.001)
    policy.link.observe_transfer(1 << 20, 0.011, force=True)
    whole = {o.name: o for o in policy.options("a context " * 200, tokens=512)}
    delta = {o.name: o for o in policy.options("a context " * 200, tokens=512, reused={"kivi-4": 496, "budget-2": 496})}
    assert whole["kivi-4"].reused_tokens == 0 and delta["kivi-4"].reused_tokens == 496
    assert delta["kivi-4"].fp16_bytes == FP.kv_bytes(16, 2)
    assert delta["kivi-4"].wire_bytes < whole["kivi-4"].wire_bytes / 20
    assert "budget-2" in whole and "budget-2" not in delta  # never predicted where it cannot be built
    assert delta["fp16"] == whole["fp16"] and delta[TEXT] == whole[TEXT]  # nothing held for them
    request = Request(512, FP.num_layers, FP.kv_bytes(512, 2))
    link = Link(1e9 / 8, 0.001)
    assert predict(delta["kivi-4"], request, link, RECEIVER) < predict(whole["kivi-4"], request, link, RECEIVER)
    chosen = policy.choose("a context " * 200, 512, RECEIVER, reused={"kivi-4": 496}).chosen.option
    assert chosen.name == "kivi-4" and chosen.reused_tokens == 496


def test_a_budget_with_tools_is_predicted_by_the_profile_of_its_tools(profile):
    """budget-2.5+rot+zstd reads the +rot profile: here it measures a quarter of the plain KL, so at
    the same bytes the candidate is predicted to lose a quarter; +zstd is predicted at its uncoded
    size, B bits per element at most."""
    tooled = dataclasses.replace(profile, tools="+rot", sensitivity={
        k: {b: [e / 4 for e in errs] for b, errs in by_bits.items()} for k, by_bits in profile.sensitivity.items()})
    profiles = {"": profile, "+rot": tooled}
    policy = AutoPolicy(FP, profiles.__getitem__, [TEXT, "budget-2.5", "budget-2.5+rot+zstd"], max_quality_loss=1.0)
    options = {o.name: o for o in policy.options("a context " * 10, tokens=512)}
    plain, tools = options["budget-2.5"], options["budget-2.5+rot+zstd"]
    assert tools.quality_loss == pytest.approx(plain.quality_loss / 4)
    assert tools.wire_bytes == plain.wire_bytes <= 2.5 * 2 * 4 * 2 * 512 * 64 / 8
    layers = candidate_layers(parse("budget-2.5+rot", FP.num_layers), [tooled], FP, 512)
    with pytest.raises(RequestError, match="no quality prediction"):
        quality_loss(layers, [profile])  # rotated codecs: the plain profile did not measure them


def test_only_predictable_candidates_and_a_lossless_one_are_accepted():
    accepted = ["text", "kivi-4", "kivi-3+zstd", "budget-2.5", "budget-2+rot+prerope+s8+zstd"]
    parsed = parse_candidates(accepted, FP.num_layers)
    assert list(parsed) == accepted and parsed["text"] is None and parsed["kivi-4"].layers[0].key.bits == 4
    for bad in (["text", "int8"], ["text", "tokenmix-3"], ["kivi-4", "kivi-2"], ["text", "kivi-9"], ["auto"],
                ["text", "kivi-2+rot"]):
        with pytest.raises((ValueError, RequestError)):
            parse_candidates(bad, FP.num_layers)


def _synthetic_profile(path, fp: Fingerprint):
    """A codec profile for the embedded model with made-up KL (x4 per bit): the plumbing under
    test does not depend on the numbers, and calibrating the real one takes minutes."""
    sensitivity = {k: {str(b): [0.01 * 4.0 ** (4 - b) / fp.num_layers] * fp.num_layers for b in allocation.BITS}
                   for k in allocation.KINDS}
    allocation.Profile(fp.name, fp.weights_sha256, 1, 1, {f: sensitivity for f in allocation.FAMILIES},
                       sensitivity).save(path)
    return str(path)


@pytest.mark.integration
@pytest.mark.e2e
def test_auto_over_live_services_reports_its_choice_and_answers(embedded, services, tmp_path):
    import dataclasses
    import urllib.request

    import grpc
    from conftest import TEST_CONFIG, ask, serve_pair

    sender_cfg = dataclasses.replace(TEST_CONFIG,
                                     codec_profile=_synthetic_profile(tmp_path / "p.json", embedded.fingerprint))
    context = ("The Atlas API allows 600 requests per minute per key. Exports use the /v4/exports endpoint. "
               "Support answers within two business days.")
    question = "How many requests per minute does the Atlas API allow?"
    with serve_pair(embedded, dataclasses.replace(TEST_CONFIG, performance_tokens=128), sender_cfg) as pair:
        answers = [ask(pair.sender, context + f" Note {i}.", question, codec="auto") for i in range(2)]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{pair.sender_metrics}/metrics", timeout=5).read().decode()
    for answer in answers:
        s, a = answer.stats, answer.stats.auto
        every = ["text", "fp16", "kivi-8", "kivi-4", "kivi-3", "budget-3", "kivi-2"]
        listed = [o.codec for o in a.options]  # a budget too small for a short delta is no option
        assert listed == [c for c in every if c in listed] and set(every) - set(listed) <= {"budget-3"}
        chosen = min((o for o in a.options if o.eligible), key=lambda o: o.predicted_s)
        assert s.codec == chosen.codec and a.predicted_s == chosen.predicted_s
        loss = {o.codec: o.quality_loss for o in a.options}
        assert loss["kivi-4"] == pytest.approx(0.02) and loss["kivi-2"] == pytest.approx(0.32) and loss["fp16"] == 0
        assert all(o.eligible == (o.quality_loss <= 0.1) for o in a.options) and a.max_quality_loss == 0.1
        assert a.measured_s > 0 and a.throughput_bytes_per_s > 0 and a.rtt_s > 0 and a.receiver_prefill_tokens_per_s > 0
        assert "600" in answer.text
    # the second context extends what the first left at the receiver: a card over it is predicted as a delta
    first, second = answers[0].stats.codec, {o.codec: o for o in answers[1].stats.auto.options}
    held = [second[first]] if first != "text" else [o for c, o in second.items() if c != "text"]
    assert held and all(o.reused_tokens >= 16 for o in held) and second["text"].reused_tokens == 0
    assert f'qkvcomm_auto_choices_total{{codec="{answers[0].stats.codec}"}}' in metrics
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("qkvcomm_link_", "qkvcomm_receiver_prefill"))}
    assert set(gauges) == {"qkvcomm_link_throughput_bytes_per_second", "qkvcomm_link_rtt_seconds",
                           "qkvcomm_receiver_prefill_tokens_per_second"} and all(v > 0 for v in gauges.values())
    with pytest.raises(grpc.RpcError) as err:  # the session's receiver measured nothing
        ask(services.sender, context, question, codec="auto")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "performance_tokens" in err.value.details()


def test_the_paper_model_picks_text_below_each_crossover_and_a_card_above():
    import argparse

    from qkv_eval import bench_policy

    hw = bench_policy.PRESETS["h100-8b"]
    request = Request(8192, hw.layers, 2 * hw.layers * hw.kv_heads * 8192 * hw.head_dim * 2)
    fast = Receiver(hw.prefill_tokens_per_s, hw.first_token_s, 100e9)
    opts = [bench_policy.options(hw, 8192)[0], Option("kivi-4", 277_000_000, 0.02, 100e9)]
    at = bench_policy.crossover(opts[1], opts[0], request, fast, 2e-4)
    assert at is not None
    assert decide(opts, request, Link(at * 0.95, 2e-4), fast, 0.1).chosen.option.name == TEXT
    assert decide(opts, request, Link(at * 1.05, 2e-4), fast, 0.1).chosen.option.name == "kivi-4"
    measured = Receiver(hw.prefill_tokens_per_s, hw.first_token_s, hw.dequantize_gbps * 1e9)
    assert bench_policy.crossover(opts[1], opts[0], request, measured, 2e-4) is None  # decoding alone > the prefill
    args = argparse.Namespace(preset="h100-8b", context_tokens=8192, rtt_ms=0.2, links="1,100", codec_gbps=100.0,
                              measured=None)
    out = bench_policy.run(args)
    assert "| 1 | " in out and "| kivi-4 | 277.0 |" in out and "never" not in out
