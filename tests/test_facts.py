"""Fact extraction on hand-made texts: each pattern, each method, odd inputs."""
import pytest

from qkv_core.facts import METHODS, FactCache, FactConfig, extract, patterns

API = ("The Orders API accepts JSON at https://api.example.com/v2/orders. Create an order with POST /v2/orders; "
       "GET /v2/orders/{id} returns it. The rate limit is 600 requests per minute per key, and version 2.4.1 added "
       "idempotency keys. Write to support@example.com with questions.")
SPEC = ("The Aurora X2 purifier covers 45 square meters, draws 38 watts and weighs 4.2 kg. It costs $199 "
        "and captures 99.97 percent of particles. The warranty lasts two years; filters cost 39 dollars.")
NEWS = ("City officials said on Tuesday that the tram line will open on 14 March 2027, six months late. "
        "Transport director Elena Ruiz blamed flooding near the river. Trams run every 6 minutes from 05:30 UTC.")
STORY = ("Mara had kept the lighthouse on Gull Island for eleven winters. She climbed the tower each evening "
         "and watched the water. One night a light answered hers: three long flashes. She thought of her father.")


def _by_type(text):
    return {(f.type, f.text) for f in patterns.find(text)}


@pytest.mark.parametrize(("text", "expected"), [
    (API, {("url", "https://api.example.com/v2/orders"), ("endpoint", "POST /v2/orders"),
           ("endpoint", "GET /v2/orders/{id}"), ("rate_limit", "600 requests per minute"),
           ("version", "version 2.4.1"), ("email", "support@example.com")}),
    (SPEC, {("quantity", "45 square meters"), ("quantity", "38 watts"), ("quantity", "4.2 kg"), ("money", "$199"),
            ("percent", "99.97 percent"), ("money", "39 dollars")}),
    (NEWS, {("date", "14 March 2027"), ("time", "05:30 UTC"), ("quantity", "6 minutes")}),
    ("Moved to /v4/exports in 1998; it rose 12% to €4.5 million by 2024-06-30 at 6 pm.",
     {("endpoint", "/v4/exports"), ("year", "1998"), ("percent", "12%"), ("money", "€4.5 million"),
      ("date", "2024-06-30"), ("time", "6 pm")}),
])
def test_patterns_find_the_exact_strings(text, expected):
    found = _by_type(text)
    assert expected <= found, expected - found


def test_overlapping_matches_keep_the_most_specific():
    found = _by_type("The limit is 600 requests per minute.")
    assert ("rate_limit", "600 requests per minute") in found
    assert ("number", "600") not in found and not any(t == "quantity" for t, _ in found)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_exact_facts_within_budget(method):
    result = extract(API, FactConfig(method=method, budget_bytes=200))
    assert len(result.summary.encode()) <= 200 and result.facts
    assert "600 requests per minute" in result.summary and "POST /v2/orders" in result.summary
    assert [f.start for f in result.facts] == sorted(f.start for f in result.facts)  # text order
    for f in result.facts:
        assert API[f.start : f.end].strip() == f.text and 0 < f.confidence <= 1
    texts = [f.text.lower() for f in result.facts]
    assert len(texts) == len(set(texts))  # deduplicated


def test_methods_add_their_extractors():
    facts = {m: extract(NEWS + " " + STORY, FactConfig(method=m, budget_bytes=4000)).facts for m in METHODS}
    types = {m: {f.type.split(":")[0] for f in found} for m, found in facts.items()}
    assert "keyphrase" in types["yake"] and "keyphrase" in types["hybrid"] and "keyphrase" not in types["simple"]
    assert "entity" in types["spacy"] and "entity" in types["hybrid"] and "entity" not in types["yake"]
    assert "Elena Ruiz" in extract(NEWS, FactConfig(method="spacy")).summary


@pytest.mark.parametrize("text", [
    "", "   \n\t", "no facts here at all", "Der Zug fährt um 14:30 Uhr ab, Gleis 7. 東京は日本の首都です。",
    bytes(range(256)).decode("latin-1"), "\x00\x01 garbage \ufffd\ufffd", API * 400,
])
def test_odd_inputs_never_crash_and_stay_in_budget(text):
    result = extract(text, FactConfig(method="hybrid", budget_bytes=300))
    assert len(result.summary.encode()) <= 300
    assert all(0 <= f.start <= f.end <= len(text) for f in result.facts)
    if not text.strip():
        assert result.facts == [] and result.summary == ""


def test_german_time_and_platform_survive():
    assert "14:30" in extract("Der Zug fährt um 14:30 Uhr ab.", FactConfig(method="simple")).summary


def test_cache_returns_the_same_extraction_and_evicts_least_recent():
    cache = FactCache(entries=2)
    cfg = FactConfig(method="simple")
    first = cache.get(API, cfg)
    assert cache.get(API, cfg) is first and cache.hits == 1
    assert cache.get(API, FactConfig(method="simple", budget_bytes=50)) is not first  # config is part of the key
    cache.get(SPEC, cfg)  # a third entry: the least recently used one (API with cfg) goes
    assert cache.get(API, cfg) is not first and cache.hits == 1 and cache.misses == 4


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown fact method"):
        FactConfig(method="magic")


def test_the_card_carries_the_facts_and_the_receiver_reads_the_summary_first(tiny):
    from qkv_core.card.framing import frames
    from qkv_core.engine.answering import Generation
    from qkv_core.engine.receiver import ReceiverEngine
    from qkv_core.engine.sender import SenderEngine
    from qkv_core.model.kv import generate, prefill
    from qkv_core.model.prompt import encode

    sender, receiver = SenderEngine(tiny), ReceiverEngine(tiny)
    card = sender.prepare(API, "fp32", FactConfig(method="simple"))
    header = card.header
    assert [f.text for f in header.facts] == header.fact_summary.split("; ")
    assert "600 requests per minute" in header.fact_summary
    receiver.accept(frames(header, card.blobs))
    got = "".join(receiver.generate(header.card_id, "What is the limit?", 8, True, Generation("")))
    # the same tokens as decoding after "Facts: <summary>\nQuestion: ..." on the sender's own cache
    kv, _ = prefill(tiny, sender.context_ids(API))
    ids = encode(tiny.tokenizer, sender.prompt.query_part("What is the limit?", header.fact_summary))
    assert got == tiny.tokenizer.decode(list(generate(tiny, kv, ids, 8)), skip_special_tokens=True)
    plain = sender.prepare(API, "fp32")
    assert not plain.header.facts and plain.header.card_id != header.card_id
