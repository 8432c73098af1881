"""The bundled calibration data: five short texts (an API doc, a product sheet, a story, news,
a support chat) and one question with its answer about each."""
from __future__ import annotations

import json
from importlib import resources

Sample = tuple[str, str, str]  # (context, question, answer)


def texts() -> list[str]:
    text = resources.files("qkv_core").joinpath("data/calibration.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def samples() -> list[Sample]:
    contexts = texts()
    rows = resources.files("qkv_core").joinpath("data/calibration_qa.jsonl").read_text().splitlines()
    return [(contexts[r["context_index"]], r["question"], r["answers"][0]) for r in map(json.loads, rows)]


def gold_answers(row: dict) -> list[str]:
    """A QA row's gold answers: `answers` (a list), or the single `answer` (GSM8K's shape)."""
    return row.get("answers") or [row.get("answer", "")]


def from_rows(rows: list[dict], context_field: str = "context") -> list[Sample]:
    """Samples from QA rows (any JSONL the evaluation reads)."""
    return [(r[context_field], r["question"], gold_answers(r)[0]) for r in rows if r.get(context_field)]
