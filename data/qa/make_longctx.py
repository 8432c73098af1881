#!/usr/bin/env python3
"""Build squad_longctx.jsonl (the needle-in-a-haystack set) from squad.jsonl beside this file.

Each row hides one SQuAD paragraph (the needle, which answers the row's question) among
paragraphs of *other* articles, filled up to about `target_chars` characters, with the needle
at relative depth 0, 0.5 or 1. 40 needles x 3 lengths x 3 depths = 360 rows. Seeded, so the
same squad.jsonl gives the same file; stdlib only. The set shipped in the first round was made
the same way; this script rebuilds a file of that shape (not byte for byte that file).

    python3 data/qa/make_longctx.py [--out squad_longctx.jsonl]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = (4000, 8000, 16000)
DEPTHS = (0.0, 0.5, 1.0)
NEEDLES = 40
SEED = 0


def build(rows: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    paragraphs: dict[str, str] = {}  # context -> title; one entry per distinct paragraph
    for r in rows:
        paragraphs.setdefault(r["context"], r["title"])
    pool = sorted(paragraphs.items())
    needles = rng.sample(rows, NEEDLES)
    out = []
    for row in needles:
        others = [p for p, title in pool if title != row["title"]]
        for target in LENGTHS:
            fill: list[str] = []
            size = len(row["context"])
            for p in rng.sample(others, len(others)):
                if size + len(p) <= target:  # paragraphs that would overshoot are skipped
                    fill.append(p)
                    size += len(p)
            for depth in DEPTHS:
                at = round(depth * len(fill))
                parts = fill[:at] + [row["context"]] + fill[at:]
                out.append({
                    "id": f"{row['id']}-{target}-{depth}", "context": "\n\n".join(parts), "question": row["question"],
                    "answers": row["answers"], "needle_depth": depth, "target_chars": target,
                    "source": "SQuAD v1.1 dev paragraphs (needle among distractors)",
                })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squad", type=Path, default=HERE / "squad.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "squad_longctx.jsonl")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.squad.read_text().splitlines() if line.strip()]
    built = build(rows)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in built))
    print(f"wrote {len(built)} rows to {args.out}")


if __name__ == "__main__":
    main()
