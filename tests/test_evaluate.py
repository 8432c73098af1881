"""A small end-to-end evaluation on real rows: kv with a lossless card answers exactly like the skyline."""
import json
from pathlib import Path

import pytest
from conftest import QA_DIR

from qkv_eval.evaluate import load_rows, query_of, run
from qkv_eval.run_config import EvalConfig

pytestmark = pytest.mark.integration


def test_three_rows_every_mode(embedded):
    data = QA_DIR / "squad.jsonl"
    reports = {m: run(embedded, EvalConfig(data, m, "fp32", limit=3, max_new_tokens=16), progress=False)
               for m in ("baseline", "skyline", "text", "kv")}
    sky, kv, base, text = (reports[m].examples for m in ("skyline", "kv", "baseline", "text"))
    assert len(kv) == 3 and [e.id for e in kv] == [e.id for e in sky]
    assert [e.prediction for e in kv] == [e.prediction for e in sky]  # same computation, context never in prompt
    assert [e.prediction for e in text] == [e.prediction for e in sky]
    for t, k in zip(text, kv):  # text is tiny on the wire next to any KV; the receiver paid the prefill
        assert t.wire_bytes < k.wire_bytes / 100 and t.prefill_s > 0 and t.kv_fp16_bytes == k.kv_fp16_bytes
    for e in sky:  # the paper's metrics are in range
        assert 0 <= e.completeness <= 1 and 0 < e.coherence <= 1 and -1 <= e.relevance <= 1
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


def test_report_table_and_chart(tmp_path):
    from qkv_eval.report import f1_vs_bits_chart, pareto, provenance
    from qkvcomm_cli.main import main

    def result(mode, codec, f1, ratio, predictions):
        return {"model": "m", "config": {"data": "x/squad.jsonl", "context_field": "context", "mode": mode,
                                         "codec": codec, "hops": "1", "date": "2026-11-22", "machine": "test",
                                         "device": "cpu", "dtype": "fp32"},
                "summary": {"rows": 3, "em": 0.0, "f1": f1, "contains": 50.0, "wire_bytes_mean": 1000.0 if ratio else 0,
                            "compression_ratio": ratio, "ttft_s_mean": 0.1},
                "examples": [{"id": str(i), "prediction": p} for i, p in enumerate(predictions)]}

    paths = []
    runs = {"sky": ("skyline", "fp16", 15.0, None, ["Paris.", "1889", "no"]),
            "k4": ("kv", "kivi-4", 14.0, 4.0, ["paris", "1890", "no"])}
    # the F1-vs-bits chart draws a frontier from 4 codecs of the same rows on
    runs |= {c: ("kv", c, f1, ratio, ["paris", "1889", "no"]) for c, f1,
             ratio in [("fp16", 15.0, 1.0), ("int8", 15.0, 1.9), ("kivi-2", 5.0, 7.0)]}
    for name, args in runs.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result(*args)))
    from qkv_eval.bench_ttft import Row, to_json

    bench = [Row(n, n / 1e3, 0.01, 2 * n, 0.002, 0.03, n / 1e3) for n in (1024, 2048)]
    paths.append(tmp_path / "ttft.json")
    paths[-1].write_text(to_json(bench, "m", "fp16", "cpu"))
    out = tmp_path / "RESULTS.md"
    assert main(["report", *map(str, paths), "--out", str(out)]) == 0
    text = out.read_text()
    # the bench file feeds the TTFT chart, not the table of eval runs
    assert "ttft_vs_context.png" in text and sum(line.startswith("| m |") for line in text.splitlines()) == 5
    assert (tmp_path / "ttft_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 of 3 answers agree with the skyline's after normalization
    row = "| squad.jsonl | context | kv | kivi-4 | 3 | 0.0 | 14.0 | 50.0 | 67 | - | - | - | 4.00 | 1.0 | 4.00 | 100 |"
    assert row in text
    assert "| skyline | - |" in text and "f1_vs_bits.png" in text
    assert (tmp_path / "f1_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f1_vs_bits_chart([result(*runs["sky"]), result(*runs["k4"])], tmp_path / "one.png") is False
    later = result(*runs["k4"])
    later["config"] |= {"date": "2026-12-02", "machine": "gpu"}
    assert provenance([result(*runs["sky"])]) == "2026-11-22; test"
    points = [(16.0, 15.0, "fp16"), (8.4, 15.0, "int8"), (4.0, 14.0, "kivi-4"), (4.0, 12.0, "seed-4"),
              (2.3, 5.0, "kivi-2"), (3.0, 4.0, "x")]
    # fp16 answers no better than int8 at more bits
    assert [p[2] for p in pareto(points)] == ["kivi-2", "kivi-4", "int8"]
    # not the first run's alone
    assert provenance([later, result(*runs["sky"])]) == "runs of 2026-11-22 to 2026-12-02; gpu, test"


def test_hops_table_lines_up_f1_by_hop_count():
    from qkv_eval.report import hops_table

    def run(codec, hops, f1, **extra):
        config = {"data": "x/squad.jsonl", "mode": "kv", "codec": codec, "hops": str(hops), **extra}
        return {"model": "m", "config": config,
                "summary": {"rows": 30, "f1": f1}}

    runs = [run("fp16", 1, 9.4), run("fp16", 5, 10.1), run("kivi-4", 1, 9.0), run("kivi-4", 3, 8.0),
            run("kivi-4", 3, 8.7, deltas=True),
            run("seed-4", 1, 5.0), run("kivi-4", 1, 1.0, facts="hybrid")]  # one hop only / with facts: not a chain
    table = hops_table(runs)
    assert "| m | squad[30] | fp16 | re-encode | 9.4 | - | 10.1 |" in table
    assert "| m | squad[30] | kivi-4 | re-encode | 9.0 | 8.0 | - |" in table
    assert "| m | squad[30] | kivi-4 | deltas | 9.0 | 8.7 | - |" in table  # one hop is the same run for both
    assert "fp16 | deltas" not in table and "seed-4" not in table and "1.0" not in table


def test_layers_table_and_chart_line_up_methods_by_ratio(tmp_path):
    from qkv_eval.report import f1_vs_layers_chart, layers_table

    def run(codec, f1, layers=1.0, method="combined", **extra):
        return {"model": "m", "config": {"data": "x/squad.jsonl", "mode": "kv", "codec": codec, "hops": "1",
                                         "layers": str(layers), "layer_method": method, **extra},
                "summary": {"rows": 100, "f1": f1}}

    full = [run("fp16", 15.5), run("kivi-4", 14.1)]
    assert layers_table(full) == "" and f1_vs_layers_chart(full, tmp_path / "none.png") is False
    runs = full + [run("fp16", 10.2, 0.5, "loo"), run("fp16", 6.9, 0.3, "loo"), run("fp16", 4.4, 0.5, "prior"),
                   # facts: not this table
                   run("kivi-4", 9.6, 0.5, "loo"), run("kivi-4", 1.0, 0.5, "loo", facts="hybrid")]
    table = layers_table(runs).splitlines()
    assert table[0] == ("| method | squad[100] fp16 @0.3 | squad[100] fp16 @0.5 | squad[100] fp16 @1 "
                        "| squad[100] kivi-4 @0.5 | squad[100] kivi-4 @1 |")
    # the all-layer run is ratio 1 of every method that ran below 1 with that codec; else '-'
    assert "| loo | 6.9 | 10.2 | 15.5 | 9.6 | 14.1 |" in table
    assert "| prior | - | 4.4 | 15.5 | - | - |" in table
    assert f1_vs_layers_chart(runs, tmp_path / "layers.png") is True
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_datasets_table_needs_every_column():
    from qkv_eval.report import datasets_table

    def run(data, mode, codec, f1):
        config = {"data": f"x/{data}.jsonl", "context_field": "context", "mode": mode, "codec": codec, "hops": "1"}
        return {"model": "m", "config": config, "summary": {"rows": 30, "f1": f1}}

    runs = [run("coqa", "baseline", "fp16", 3.0), run("coqa", "skyline", "fp16", 20.0), run("coqa", "kv", "fp16", 19.5),
            run("coqa", "kv", "kivi-4", 18.0), run("coqa", "kv", "kivi-2", 1.0),
            run("gsm8k", "baseline", "fp16", 2.0), run("gsm8k", "skyline", "fp16", 4.0)]  # no cards: left out
    table = datasets_table(runs)
    assert "| m | coqa | context | 30 | 3.0 | 20.0 | 19.5 | 18.0 |" in table
    assert "gsm8k" not in table and "1.0" not in table


def test_run_config_survives_json_typed_and_reads_old_string_configs():
    cfg = EvalConfig(Path("x/squad.jsonl"), mode="kv", codec="kivi-4", limit=100, hops=3, layers=1.0, relevance=False)
    again = EvalConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg and isinstance(cfg.to_json()["limit"], int)
    # results before typing
    old = {k: str(v) for k, v in cfg.to_json().items()} | {"date": "2026-11-22", "machine": "x"}
    assert EvalConfig.from_json(old) == cfg
