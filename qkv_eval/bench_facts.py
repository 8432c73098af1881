"""`qkvcomm bench facts`: how often the extracted facts hold the gold answer, per method, and
how long extraction takes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from qkv_core.bundled import gold_answers
from qkv_core.facts import METHODS, FactConfig, extract
from qkv_eval.bench import machine
from qkv_eval.evaluate import load_rows
from qkv_eval.qa_metrics import contains

UNLIMITED = 1 << 30


@dataclass
class Row:
    data: str
    method: str
    rows: int
    recall: float  # % of rows whose budgeted summary contains a gold answer
    recall_unlimited: float  # the same before the budget cut
    facts: float  # mean facts kept
    summary_bytes: float
    ms_per_1k_chars: float


def measure(path: Path, method: str, limit: int, budget: int) -> Row:
    rows = [r for r in load_rows(path, limit) if r.get("context")]
    hits = hits_all = kept = size = 0
    chars, seconds = 0, 0.0
    for r in rows:
        answers = gold_answers(r)
        start = time.perf_counter()
        result = extract(r["context"], FactConfig(method=method, budget_bytes=budget))
        seconds += time.perf_counter() - start
        chars += len(r["context"])
        everything = extract(r["context"], FactConfig(method=method, budget_bytes=UNLIMITED))
        hits += contains(result.summary, answers)
        hits_all += contains(everything.summary, answers)
        kept += len(result.facts)
        size += len(result.summary.encode())
    n = max(1, len(rows))
    return Row(path.name, method, len(rows), 100 * hits / n, 100 * hits_all / n, kept / n, size / n,
               1e6 * seconds / max(1, chars))


def run_facts_bench(paths: list[Path], limit: int, budget: int) -> list[Row]:
    for method in METHODS:  # load spaCy and YAKE before anything is timed
        extract("Warm-up: Paris, 14 March 2025, 600 requests per minute.", FactConfig(method=method))
    return [measure(p, m, limit, budget) for p in paths for m in METHODS]


def table(rows: list[Row], budget: int) -> str:
    lines = [
        f"facts bench: gold answer in the fact summary ({budget}-byte budget / unlimited); {machine()}",
        "",
        "| data | method | rows | recall % | recall % (no budget) | facts kept | summary B | ms per 1,000 chars |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.data} | {r.method} | {r.rows} | {r.recall:.1f} | {r.recall_unlimited:.1f} | {r.facts:.1f} | "
            f"{r.summary_bytes:.0f} | {r.ms_per_1k_chars:.1f} |"
        )
    return "\n".join(lines)
