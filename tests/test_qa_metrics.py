import pytest

from qkv_core.facts.text import normalize
from qkv_eval.qa_metrics import contains, exact_match, f1


def test_normalize_is_squads():
    assert normalize("The  Denver Broncos!") == "denver broncos"
    assert normalize("an apple, a pear") == "apple pear"
    assert normalize("Levi's Stadium") == "levis stadium"


def test_exact_match_takes_any_gold():
    assert exact_match("the Carolina Panthers.", ["Panthers", "Carolina Panthers"]) == 1.0
    assert exact_match("Carolina", ["Carolina Panthers"]) == 0.0


def test_f1_is_token_overlap_max_over_golds():
    # prediction "denver broncos won" vs gold "denver broncos": P = 2/3, R = 1 -> F1 = 0.8
    assert f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    assert f1("Denver Broncos won", ["Broncos", "Denver Broncos"]) == pytest.approx(0.8)
    assert f1("nothing in common", ["Denver"]) == 0.0
    assert f1("", ["Denver"]) == 0.0


def test_contains_matches_whole_words_only():
    assert contains("They played at Levi's Stadium in 2016.", ["Levi's Stadium"]) == 1.0
    assert contains("The answer is 600 requests.", ["600"]) == 1.0
    assert contains("The answer is 6000 requests.", ["600"]) == 0.0
    assert contains("anything", [""]) == 0.0


def test_seed_paper_metrics_on_hand_made_cases():
    from qkv_eval.qa_metrics import coherence, completeness

    assert completeness("It was founded in Paris in 1889.", ["Paris, 1889"]) == 1.0
    assert completeness("In Paris.", ["Paris 1889", "the city of Lyon"]) == 0.5
    assert completeness("", ["Paris"]) == 0.0
    assert coherence("the cat sat on the mat") == 1.0
    assert coherence("the the the the the") == 1 / 3  # one distinct trigram out of three
    assert coherence("") == 0.0 and coherence("Paris") == 1.0


def test_contextual_relevance_embeddings_rank_related_text_higher():
    from qkv_eval.embedding import similarity

    context = "The Eiffel Tower in Paris was completed in 1889 for the World's Fair."
    assert similarity(context, context) == pytest.approx(1.0, abs=1e-5)
    unrelated = similarity("Bananas are rich in potassium.", context)
    assert similarity("It was finished in 1889 in Paris.", context) > unrelated + 0.2
