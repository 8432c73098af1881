"""A small end-to-end evaluation on real rows: kv with a lossless card answers exactly like the skyline."""
import json

import pytest
from conftest import QA_DIR

from qkv_core.evaluate import EvalConfig, load_rows, query_of, run

pytestmark = pytest.mark.integration


def test_three_rows_every_mode(embedded):
    data = QA_DIR / "squad.jsonl"
    reports = {m: run(embedded, EvalConfig(data, m, "fp32", limit=3, max_new_tokens=16), progress=False)
               for m in ("baseline", "skyline", "kv")}
    sky, kv, base = (reports[m].examples for m in ("skyline", "kv", "baseline"))
    assert len(kv) == 3 and [e.id for e in kv] == [e.id for e in sky]
    assert [e.prediction for e in kv] == [e.prediction for e in sky]  # same computation, context never in prompt
    assert [e.prediction for e in base] != [e.prediction for e in sky]
    for e in kv:
        assert e.wire_bytes > 2 * e.kv_fp16_bytes - 1 and e.context_tokens > 0  # fp32 card: twice fp16
    summary = reports["kv"].summary()
    assert 0 <= summary["f1"] <= 100 and summary["rows"] == 3
    assert json.loads(reports["kv"].to_json())["summary"]["rows"] == 3


def test_rows_of_any_shape(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "2+2?", "answer": "4"},
        {"question": "Who?", "answers": ["Ann"], "context": "Ann came.", "history": [["Where?", "Rome"]]},
    ]))
    rows = list(load_rows(path))
    assert query_of(rows[1]) == "Q: Where?\nA: Rome\nQ: Who?"
    path.write_text(json.dumps({"question": "no answers"}))
    with pytest.raises(ValueError, match="needs `question` and `answers`"):
        list(load_rows(path))
