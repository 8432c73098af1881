"""`qkvcomm bench dialogue`: dialogues through the services, whole cards against delta cards.

A dialogue is one document (the opening of a long-context SQuAD row that holds its answer, ~1,000
tokens by default; no two documents open alike, so no dialogue finds another's prefix) and then
`turns - 1` follow-up turns of ~150 tokens (the opening sentences of other SQuAD rows), each a
Share in one session. Two sender/receiver pairs run side by side, turn by turn: one sends delta
cards (the default), the other is set never to (`--delta-min-tokens 0`), so every turn re-encodes
and re-sends the whole transcript. Both senders keep their context cache, so neither prefills a
turn's earlier tokens again: the difference is the card alone. After the last turn the document's
own question is asked in both sessions: the answers are compared (greedy decoding) and scored (F1
against the gold answers; the document is cut to its opening, so some golds are not in it).

Reported per codec and mode: the wire bytes of all turns, of the last turn, the handoff time of a
follow-up turn (the Share call as the client saw it: prefill of the new tokens, encoding, transfer
and decoding at the receiver, on loopback; mean over the follow-up turns), and what the bytes would
take on a 1 Gbit/s link (computed).

Then the multi-hop relay's drift (`--drift-rows`, in this process): how far the context's cache is
from agent 1's after 1-5 hops, each hop re-encoding the whole cache or sending a delta of its note
(qkv_eval.multihop.context_drift), on SQuAD rows.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from qkvcomm_client import SenderClient

from qkv_core.bundled import gold_answers
from qkv_core.config import qa_file
from qkv_eval.bench import machine
from qkv_eval.evaluate import load_rows
from qkv_eval.qa_metrics import f1
from qkvcomm_cli.launch import Child, spawn

GBIT = 125e6  # bytes per second of a 1 Gbit/s link
TURN_CHARS = 600  # ~150 tokens of English


@dataclass
class Turn:
    wire_bytes: int
    seconds: float
    prefill_s: float  # the sender's own prefill of the turn's new tokens (the same in both modes)
    context_tokens: int
    reused_tokens: int


@dataclass
class Dialogue:
    codec: str
    mode: str  # "deltas" or "whole cards"
    turns: list[Turn] = field(default_factory=list)
    answer: str = ""
    f1: float = 0.0


def dialogue_texts(data: Path, longctx: Path, dialogues: int, turns: int, doc_chars: int,
                   ) -> list[tuple[list[str], str, list[str]]]:
    """Each dialogue's turns (a document, then follow-ups), the document's question and its gold answers."""
    docs, openings = [], set()  # the openings and questions taken
    for row in load_rows(qa_file(longctx)):
        opening = _opening(row["context"], doc_chars)
        if not {opening[:300], row["question"]} & openings and any(a in opening for a in gold_answers(row)):
            openings |= {opening[:300], row["question"]}
            docs.append(row)
        if len(docs) == dialogues:
            break
    others = list(load_rows(qa_file(data), dialogues * turns * 3))[::3]  # every third row: other paragraphs
    out = []
    for i, doc in enumerate(docs):
        follow = [_opening(row["context"], TURN_CHARS) for row in others[i * turns : (i + 1) * turns - 1]]
        out.append(([_opening(doc["context"], doc_chars), *follow], doc["question"], gold_answers(doc)))
    return out


def _opening(text: str, chars: int) -> str:
    """The sentences of `text` that fit in `chars` characters (at least one)."""
    taken = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        if taken and len(taken) + len(sentence) > chars:
            break
        taken = f"{taken} {sentence}".strip()
    return taken


def share_turn(sender: SenderClient, text: str, codec: str, session: str, record: Dialogue) -> None:
    start = time.perf_counter()
    stats = sender.share(text, codec=codec, session=session)
    record.turns.append(Turn(stats.wire_bytes, time.perf_counter() - start, stats.prefill_s, stats.context_tokens,
                             stats.reused_tokens))


def _pair(delta_min_tokens: int, runtime: list[str]) -> tuple[Child, Child]:
    receiver = spawn("receiver", "--performance-tokens", "0", *runtime)
    try:
        return receiver, spawn("sender", "--receiver", receiver.address, "--delta-min-tokens", str(delta_min_tokens),
                               *runtime)
    except BaseException:
        receiver.stop()
        raise


def run(args: argparse.Namespace) -> str:
    """The dialogue table (unless --dialogues 0), then the relay drift (unless --drift-rows 0)."""
    out = dialogues(args) if args.dialogues else f"machine: {machine()}"
    return out + (drift_table(args) if args.drift_rows else "")


def dialogues(args: argparse.Namespace) -> str:
    runtime = [f"--model={args.model}", "--device=cpu"]
    codecs = args.codecs.split(",") if args.codecs else ["fp16", "kivi-4"]
    texts = dialogue_texts(args.data, args.longctx, args.dialogues * len(codecs), args.turns, args.doc_chars)
    pairs = {"deltas": _pair(64, runtime), "whole cards": _pair(0, runtime)}
    records: list[Dialogue] = []
    try:
        clients = {mode: SenderClient(sender.address, timeout_s=600) for mode, (_, sender) in pairs.items()}
        for c, codec in enumerate(codecs):
            for d in range(args.dialogues):  # each codec its own documents: no card of one is the other's prefix
                turns, question, golds = texts[c * args.dialogues + d]
                runs = {mode: Dialogue(codec, mode) for mode in pairs}
                for t, text in enumerate(turns):  # turn by turn, the two modes side by side
                    for mode, client in clients.items():
                        share_turn(client, text, codec, f"{codec}-{d}", runs[mode])
                    print(f"{codec} dialogue {d + 1} turn {t + 1}: " + ", ".join(
                        f"{m} {r.turns[-1].wire_bytes / 1e6:.2f} MB" for m, r in runs.items()), flush=True)
                for mode, client in clients.items():
                    runs[mode].answer = client.ask("", question, codec=codec, session=f"{codec}-{d}").text.strip()
                    runs[mode].f1 = 100 * f1(runs[mode].answer, golds)
                records += runs.values()
    finally:
        for receiver, sender in pairs.values():
            sender.stop()
            receiver.stop()
    return table(records, args)


DRIFT_HOPS = (1, 2, 3, 5)


def drift_table(args: argparse.Namespace, codecs: tuple[str, ...] = ("kivi-4", "kivi-2")) -> str:
    """Mean relative error of the context's cache after each hop count, re-encoding against deltas."""
    from qkv_core.config import RuntimeConfig  # noqa: PLC0415 - the model only for this part
    from qkv_core.engine.receiver import ReceiverEngine  # noqa: PLC0415
    from qkv_core.engine.sender import SenderEngine  # noqa: PLC0415
    from qkv_core.model.loading import load_model  # noqa: PLC0415
    from qkv_eval.multihop import context_drift  # noqa: PLC0415

    lm = load_model(RuntimeConfig(model=args.model, device="cpu", dtype="float32"))
    contexts = [row["context"] for row in load_rows(qa_file(args.data), args.drift_rows)]
    lines = ["", f"Relay drift: mean relative error of the context's KV after N hops against agent 1's, "
             f"{len(contexts)} SQuAD rows, {args.model}", "",
             "| codec | relay | " + " | ".join(f"{h} hop{'s' * (h > 1)}" for h in DRIFT_HOPS) + " |",
             "|---|---|" + "---|" * len(DRIFT_HOPS)]
    for codec in codecs:
        for deltas in (False, True):
            cells = []
            for hops in DRIFT_HOPS:
                sender, receiver = SenderEngine(lm), ReceiverEngine(lm)
                cells.append(statistics.mean(context_drift(sender, receiver, c, codec, hops, deltas) for c in contexts))
            row = " | ".join(f"{d:.4f}" for d in cells)
            lines.append(f"| {codec} | {'deltas' if deltas else 're-encode'} | {row} |")
    return "\n".join(lines)


def table(records: list[Dialogue], args: argparse.Namespace) -> str:
    lines = [f"machine: {machine()}",
             f"`qkvcomm bench dialogue --dialogues {args.dialogues} --turns {args.turns} "
             f"--doc-chars {args.doc_chars}`: {args.model}, documents from {args.longctx}, follow-up turns of "
             f"~{TURN_CHARS} characters from {args.data}, Share per turn in one session, loopback", "",
             "| codec | mode | dialogues | tokens at the end | wire MB, all turns | wire MB, last turn | "
             "follow-up turn: handoff ms (mean) | of which the sender's prefill "
             "| at 1 Gbit/s: wire ms per follow-up turn | "
             "final answer F1 | final answers equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r.codec, r.mode): [x for x in records if (x.codec, x.mode) == (r.codec, r.mode)] for r in records}
    for (codec, mode), runs in by.items():
        other = by[(codec, "whole cards" if mode == "deltas" else "deltas")]
        equal = sum(a.answer == b.answer for a, b in zip(runs, other))
        follow = [t for r in runs for t in r.turns[1:]]
        lines.append(
            f"| {codec} | {mode} | {len(runs)} | {statistics.mean(r.turns[-1].context_tokens for r in runs):,.0f} | "
            f"{statistics.mean(sum(t.wire_bytes for t in r.turns) for r in runs) / 1e6:,.1f} | "
            f"{statistics.mean(r.turns[-1].wire_bytes for r in runs) / 1e6:,.2f} | "
            f"{statistics.mean(t.seconds for t in follow) * 1e3:,.0f} | "
            f"{statistics.mean(t.prefill_s for t in follow) * 1e3:,.0f} | "
            f"{statistics.mean(t.wire_bytes for t in follow) / GBIT * 1e3:,.0f} | "
            f"{statistics.mean(r.f1 for r in runs):.1f} | {equal}/{len(runs)} |")
    lines += ["", "Per turn (first dialogue of each codec): wire MB, deltas / whole cards", "",
              "| codec | " + " | ".join(f"turn {i + 1}" for i in range(args.turns)) + " |",
              "|---|" + "---|" * args.turns]
    for codec in dict.fromkeys(r.codec for r in records):
        delta, whole = by[(codec, "deltas")][0], by[(codec, "whole cards")][0]
        lines.append(f"| {codec} | " + " | ".join(f"{a.wire_bytes / 1e6:.2f} / {b.wire_bytes / 1e6:.2f}"
                                                  for a, b in zip(delta.turns, whole.turns)) + " |")
    return "\n".join(lines)
