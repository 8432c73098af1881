#!/usr/bin/env python3
"""Cards for the vLLM connector test, made in the project's own environment (it holds the sender;
the vLLM environment does not): fp16 cards of the embedded model for N SQuAD rows, written where a
receiver's disk tier keeps them, plus one card of a 3-layer random Llama (another model's shape).
Writes OUT/rows.json: per row the card id, the prompt token ids (card context + query, as the
receiver builds them) and the gold answers.

    .venv/bin/python integrations/vllm/make_cards.py OUT [--rows 10]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import qa_rows, tiny_model  # noqa: PLC0415

    from qkv_core.config import RuntimeConfig  # noqa: PLC0415
    from qkv_core.engine.sender import SenderEngine  # noqa: PLC0415
    from qkv_core.model.loading import load_model, model_source  # noqa: PLC0415
    from qkv_core.model.prompt import encode  # noqa: PLC0415
    from qkv_core.store.cardfile import to_bytes  # noqa: PLC0415
    from qkv_core.store.disk import card_path, namespace  # noqa: PLC0415
    from qkv_core.store.records import DEFAULT_TENANT, CardRecord  # noqa: PLC0415

    lm = load_model(RuntimeConfig(device="cpu", dtype="float32"))

    def write(engine: SenderEngine, context: str) -> tuple[str, list[int]]:
        card = engine.prepare(context, "fp16")
        key = (DEFAULT_TENANT, card.header.card_id)
        record = CardRecord(card.header, card.blobs)
        path = card_path(args.out / "store", namespace(lm.fingerprint), key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_bytes(record, namespace(lm.fingerprint), key, None))
        return card.header.card_id, engine.context_ids(context)

    sender, out = SenderEngine(lm), []
    for row in qa_rows("squad.jsonl", args.rows * 3)[::3]:  # distinct paragraphs
        card_id, ids = write(sender, row["context"])
        query = encode(lm.tokenizer, sender.prompt.query_part(row["question"]))
        out.append({"card_id": card_id, "prompt": ids + query, "context_tokens": len(ids), "answers": row["answers"],
                    "context": row["context"], "question": row["question"]})
    foreign, _ = write(SenderEngine(tiny_model()), "The rate limit is 600 requests per minute.")
    (args.out / "rows.json").write_text(json.dumps({"model": lm.fingerprint.name,
                                                    "namespace": namespace(lm.fingerprint),
                                                    "model_dir": str(model_source(lm.fingerprint.name)),
                                                    "rows": out, "foreign_card": foreign}))
    print(f"{len(out)} cards and one foreign card under {args.out / 'store'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
