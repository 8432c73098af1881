"""Evaluate handoff modes on any QA JSONL file: the receiver's answers against gold answers.

A row needs `question` and `answers` (a list) or `answer` (a string); `context` is optional
(GSM8K has none); `history` (a list of [question, answer] turns, as in CoQA) goes into the
receiver's query; `--context-field` picks another context column (e.g. HotpotQA `context_gold`).

Modes, all through the real engines in one process (the gRPC path adds only transport):
    baseline  the receiver gets the question only
    skyline   context and question as text in the receiver's prompt
    facts     the fact summary alone (no cache) before the question: what the facts carry
    text      the context travels as text and the receiver prefills it into its store (what
              the `text` handoff over gRPC does); answers equal the skyline's, bytes and
              timings differ
    kv        the sender's card (any codec) is pushed through the CardReader into the receiver,
              whose prompt holds the query only; with hops > 1 the cache is relayed along a
              chain of agents first (qkv_eval.multihop); with `facts` the card carries the
              fact summary and the receiver puts it before the question

Per row: SQuAD exact match, token F1, contains-answer, and the seed paper's metrics as
defined in qa_metrics (completeness, coherence) and here: contextual relevance = cosine
similarity of the MiniLM embeddings of the prediction and the context (of the question when
there is no context).
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from tqdm import tqdm

from qkv_core.bundled import gold_answers
from qkv_core.card.framing import frames
from qkv_core.codec.registry import codec_files
from qkv_core.config import StoreConfig, qa_file
from qkv_core.engine.answering import Generation, timed_answer
from qkv_core.engine.crossmodel import METHODS, Alignment, default_path
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.selection import SelectionConfig
from qkv_core.engine.sender import SenderEngine
from qkv_core.facts import FactConfig
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.prompt import encode
from qkv_core.wire import pb
from qkv_eval.embedding import similarity
from qkv_eval.multihop import run_chain
from qkv_eval.qa_metrics import coherence, completeness, contains, exact_match, f1
from qkv_eval.run_config import EvalConfig


@dataclass
class Example:
    id: str
    question: str
    answers: list[str]
    prediction: str
    em: float
    f1: float
    contains: float
    completeness: float
    coherence: float
    relevance: float | None  # None: not computed in this run (see EvalConfig.relevance)
    context_tokens: int = 0
    wire_bytes: int = 0
    kv_fp16_bytes: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Report:
    config: dict
    model: str
    examples: list[Example] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.examples)
        mean = lambda key: sum(getattr(e, key) for e in self.examples) / n if n else 0.0  # noqa: E731
        wire = sum(e.wire_bytes for e in self.examples)
        fp16 = sum(e.kv_fp16_bytes for e in self.examples)
        return {
            "rows": n, "em": 100 * mean("em"), "f1": 100 * mean("f1"), "contains": 100 * mean("contains"),
            "completeness": 100 * mean("completeness"), "coherence": 100 * mean("coherence"),
            "relevance": mean("relevance") if all(e.relevance is not None for e in self.examples) else None,
            "wire_bytes_mean": wire / n if n else 0, "compression_ratio": fp16 / wire if wire else None,
            "bandwidth_saved": 1 - wire / fp16 if fp16 else None,  # vs shipping the fp16 KV of all layers
            "f1_per_kb": 100 * mean("f1") / (wire / n / 1e3) if wire else None,
            "prefill_s_mean": mean("prefill_s"), "ttft_s_mean": mean("ttft_s"), "total_s_mean": mean("total_s"),
        }

    def to_json(self) -> str:
        return json.dumps({"config": self.config, "model": self.model, "summary": self.summary(),
                           "examples": [asdict(e) for e in self.examples]}, indent=1, default=str)


def load_rows(path: Path, limit: int = 0) -> Iterator[dict]:
    with open(path) as f:
        for i, line in enumerate(f):
            if limit and i >= limit:
                return
            row = json.loads(line)
            answers = gold_answers(row)
            if "question" not in row or not any(answers):
                raise ValueError(f"{path}:{i + 1}: a row needs `question` and `answers` (or `answer`)")
            yield row


def query_of(row: dict) -> str:
    """The receiver's question, with earlier conversation turns when the row has them."""
    turns = "".join(f"Q: {q}\nA: {a}\n" for q, a in row.get("history") or [])
    return f"{turns}Q: {row['question']}" if turns else row["question"]


def run(lm: LoadedModel, cfg: EvalConfig, progress: bool = True, sender_lm: LoadedModel | None = None) -> Report:
    """Evaluate `lm` as the receiver (and the sender, unless `sender_lm` is another model)."""
    alignments = [_alignment(sender_lm, lm, cfg.alignment)] if sender_lm is not None else []
    sender = SenderEngine(sender_lm or lm, codec_files=codec_files([cfg.codec]))  # the user's own file
    receiver = ReceiverEngine(lm, StoreConfig(store_bytes=1 << 34, hot_bytes=1 << 34), max_card_bytes=1 << 40,
                              alignments=alignments)
    report = Report(config=cfg.to_json(), model=lm.fingerprint.name)
    report.config.update(date=str(date.today()), machine=f"{platform.machine()} {os.cpu_count()} cores",
                         device=str(lm.device), dtype=str(lm.dtype))
    rows = list(load_rows(cfg.data, cfg.limit))
    label = (cfg.mode + (f"/{cfg.codec}" if cfg.mode == "kv" else "") + (f"/{cfg.hops} hops" if cfg.hops > 1 else "")
             + ("/deltas" if cfg.deltas else ""))
    label += f"/layers {cfg.layer_method}@{cfg.layers:g}" if cfg.layers < 1 else ""
    facts = FactConfig(method=cfg.facts) if cfg.facts else None
    layers = SelectionConfig(cfg.layers, cfg.layer_method)
    for row in tqdm(rows, desc=label, disable=not progress):
        context, question = row.get(cfg.context_field, ""), query_of(row)
        answers = gold_answers(row)
        stats, extra = Generation(""), {}
        if cfg.mode == "baseline" or (cfg.mode in ("skyline", "text") and not context):
            ids = encode(lm.tokenizer, sender.prompt.baseline(question))
            text = "".join(timed_answer(lm, None, ids, cfg.max_new_tokens, stats))
        elif cfg.mode == "facts":
            summary = sender.facts.get(context, facts).summary
            ids = encode(lm.tokenizer, sender.prompt.baseline(question, summary))
            text = "".join(timed_answer(lm, None, ids, cfg.max_new_tokens, stats))
            extra = {"wire_bytes": len(summary.encode())}
        elif cfg.mode == "skyline":
            ids = encode(lm.tokenizer, sender.prompt.full(context, question))
            text = "".join(timed_answer(lm, None, ids, cfg.max_new_tokens, stats))
            extra = {"context_tokens": len(sender.context_ids(context))}
        elif cfg.mode == "text":
            wire = pb.PushTextRequest(context=context).ByteSize()
            card, prefill_s = receiver.accept_text(context)
            text = "".join(receiver.generate(card.header.card_id, question, cfg.max_new_tokens, False, stats))
            tokens = card.header.context_tokens
            extra = {"context_tokens": tokens, "wire_bytes": wire, "kv_fp16_bytes": lm.fingerprint.kv_bytes(tokens),
                     "prefill_s": prefill_s}
        elif cfg.hops > 1:
            chain = run_chain(sender, receiver, context, cfg.codec, cfg.hops, cfg.deltas)
            text = "".join(receiver.generate(chain.card_id, question, cfg.max_new_tokens, False, stats))
            # the bytes that carry the last cache: its last card, or with deltas every hop's own part
            wire = sum(chain.wire_bytes) if cfg.deltas else chain.wire_bytes[-1]
            extra = {"context_tokens": len(chain.ids), "wire_bytes": wire,
                     "kv_fp16_bytes": chain.kv.nbytes(2)}
        else:
            card = sender.prepare(context, cfg.codec, facts, layers, lm.num_layers if sender_lm is not None else 0)
            stream = list(frames(card.header, card.blobs))
            wire = sum(frame.ByteSize() for frame in stream)
            receiver.accept(stream)
            text = "".join(receiver.generate(card.header.card_id, question, cfg.max_new_tokens, bool(facts), stats))
            extra = {"context_tokens": card.header.context_tokens, "wire_bytes": wire,
                     "kv_fp16_bytes": card.kv_fp16_bytes, "prefill_s": card.prefill_s}
        report.examples.append(Example(
            id=str(row.get("id", len(report.examples))), question=question, answers=answers, prediction=text.strip(),
            **score(text, answers, context or question,
                    cfg.relevance), ttft_s=stats.ttft_s, total_s=stats.total_s, **extra,
        ))
    return report


def _alignment(sender: LoadedModel, receiver: LoadedModel, name: str) -> Alignment:
    path = Path(name) if name not in METHODS else default_path(sender.fingerprint, receiver.fingerprint, name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `qkvcomm calibrate pair "
                                f"--sender-model {sender.fingerprint.name} "
                                f"--receiver-model {receiver.fingerprint.name}` first")
    return Alignment.load(path)


def score(prediction: str, answers: list[str], context: str, relevance: bool = True) -> dict[str, float | None]:
    """Every answer metric of one prediction (see the module doc for the definitions)."""
    p = prediction.strip()
    return {
        "em": exact_match(p, answers), "f1": f1(p, answers), "contains": contains(p, answers),
        "completeness": completeness(p, answers), "coherence": coherence(p),
        "relevance": (similarity(p, context) if p else 0.0) if relevance else None,
    }


def rescore(result: dict) -> dict:
    """A saved `--json` result with every metric recomputed from its predictions and the rows
    of its data file (for results saved before a metric existed)."""
    cfg = EvalConfig.from_json(result["config"])
    rows = {str(r.get("id", i)): r for i, r in enumerate(load_rows(qa_file(cfg.data), cfg.limit))}
    report = Report(config=result["config"], model=result["model"])
    for e in result["examples"]:
        row = rows[e["id"]]
        e.update(score(e["prediction"], e["answers"], row.get(cfg.context_field) or query_of(row)))
        report.examples.append(Example(**e))
    return json.loads(report.to_json())
