"""`qkvcomm bench ttft`: the receiver's time to first token with an injected card vs a full
re-prefill of the text, at growing context lengths, with the stages of the card path."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from qkv_core.card.framing import frames
from qkv_core.config import RuntimeConfig, StoreConfig
from qkv_core.engine.answering import Generation, timed_answer
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.model.loading import load_model
from qkv_core.model.prompt import encode
from qkv_eval.bench import long_context, machine

QUESTION = "What is the main topic of the first paragraph?"


@dataclass
class Row:
    tokens: int
    sender_prefill_s: float
    quantize_s: float
    wire_bytes: int
    dequantize_s: float
    ttft_card_s: float
    ttft_text_s: float


def _ttft(run) -> float:
    stats = Generation("")
    for _ in run(stats):
        break  # the first piece of text is all this measures
    return stats.ttft_s


def measure(sender: SenderEngine, receiver: ReceiverEngine, context: str, codec: str, repeats: int) -> Row:
    lm = sender.lm
    text_ids = encode(lm.tokenizer, sender.prompt.full(context, QUESTION))
    best: Row | None = None
    for _ in range(repeats):
        card = sender.prepare(context, codec)
        stream = list(frames(card.header, card.blobs))
        intake = receiver.intake()
        receiver.accept(stream, intake)
        row = Row(
            tokens=card.header.context_tokens, sender_prefill_s=card.prefill_s, quantize_s=card.quantize_s,
            wire_bytes=sum(f.ByteSize() for f in stream), dequantize_s=intake.dequantize_s,
            ttft_card_s=_ttft(lambda st: receiver.generate(card.header.card_id, QUESTION, 1, False, st)),
            ttft_text_s=_ttft(lambda st: timed_answer(lm, None, text_ids, 1, st)),
        )
        if best is None or row.ttft_card_s + row.ttft_text_s < best.ttft_card_s + best.ttft_text_s:
            best = row
    assert best is not None
    return best


def run_ttft_bench(cfg: RuntimeConfig, data: Path, lengths: list[int], codec: str, repeats: int) -> list[Row]:
    lm = load_model(cfg)
    sender = SenderEngine(lm)
    receiver = ReceiverEngine(lm, StoreConfig(store_bytes=1 << 34, hot_bytes=1 << 34), max_card_bytes=1 << 40)
    limit = lm.model.config.max_position_embeddings - 64  # room for the question
    rows = []
    for tokens in tqdm(lengths, desc="bench ttft", disable=None, leave=False):
        context = long_context(data, lm.tokenizer, min(tokens, limit))
        ids = sender.context_ids(context)
        while len(ids) > min(tokens, limit):  # trim whole words until the prompt fits
            context = context[: int(len(context) * min(tokens, limit) / len(ids)) - 1].rsplit(" ", 1)[0]
            ids = sender.context_ids(context)
        rows.append(measure(sender, receiver, context, codec, repeats))
    return rows


def table(rows: list[Row], model: str, codec: str, device: str) -> str:
    lines = [
        f"TTFT bench: {model} on {device}, `{codec}` cards, 1 new token; {machine()}",
        "",
        "| context tokens | sender prefill ms | quantize ms | wire MB | dequantize ms | TTFT card ms "
        "| TTFT re-prefill ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tokens} | {r.sender_prefill_s * 1e3:.0f} | {r.quantize_s * 1e3:.0f} | {r.wire_bytes / 1e6:.1f} | "
            f"{r.dequantize_s * 1e3:.0f} | {r.ttft_card_s * 1e3:.0f} | {r.ttft_text_s * 1e3:.0f} | "
            f"{r.ttft_text_s / r.ttft_card_s:.1f}x |"
        )
    return "\n".join(lines)


def to_json(rows: list[Row], model: str, codec: str, device: str) -> str:
    """The rows as JSON for `qkvcomm report`, which charts TTFT against context length."""
    return json.dumps({"bench": "ttft", "model": model, "codec": codec, "device": device, "machine": machine(),
                       "rows": [asdict(r) for r in rows]}, indent=1)
