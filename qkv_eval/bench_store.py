"""`qkvcomm bench store`: what the tiered card store holds and how fast it serves a cold card.

1. Memory per card: the decoded cache the old store kept (the receiver's dtype; fp32 on CPU)
   against the card as received, which the memory tier keeps now.
2. A cold card (not in the hot tier) served from memory, from disk (a receiver restarted on the
   directory), from Redis (another receiver), against re-pushing it (the sender prefills and
   encodes again, the receiver takes it in). Medians over the cards, all in one run.
3. The budget under many distinct cards: RSS of this process before and after pushing them into a
   store of a small budget, next to what the tiers hold and what the old store would have held.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from qkv_core.card.framing import frames
from qkv_core.config import RuntimeConfig, StoreConfig
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import PreparedCard, SenderEngine
from qkv_core.model.loading import load_model
from qkv_eval import redis_server
from qkv_eval.bench import machine
from qkv_eval.bench_service import rss_bytes
from qkv_eval.evaluate import load_rows

CODECS = ("fp16", "kivi-4")


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:,.1f}"


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    assert fn() is not None
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> str:
    lm = load_model(RuntimeConfig(model=args.model, device="cpu"))
    sender = SenderEngine(lm)
    contexts = list(dict.fromkeys(row["context"] for row in load_rows(args.data, None)))
    timed = contexts[: args.limit]
    lines = [f"`qkvcomm bench store --data {args.data.name} --limit {args.limit} --cards {args.cards}` "
             f"(model {args.model}, {lm.dtype}; {machine()})", ""]
    lines += budget_run(lm, sender, contexts, args)
    lines += ["| codec | mean tokens | old store: decoded per card | memory tier: card as received | smaller by |",
              "|---|---|---|---|---|"]
    cold = ["",
            "| codec | memory | disk (restarted) | Redis (another receiver) | re-push (prefill + encode + accept) |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        server = redis_server.RedisServer(Path(tmp)) if redis_server.available() else None
        if server:
            server.start()
        try:
            for codec in CODECS:
                cards: list[PreparedCard] = []
                repush, sizes = [], []
                first = ReceiverEngine(lm, StoreConfig(store_dir=str(Path(tmp) / codec),
                                                       store_redis=server.url if server else ""))
                for context in tqdm(timed, desc=f"bench store {codec}", unit="card"):
                    start = time.perf_counter()
                    card = sender.prepare(context, codec)
                    sizes.append(first.accept(frames(card.header, card.blobs)).nbytes)
                    repush.append(time.perf_counter() - start)
                    cards.append(card)
                decoded = statistics.mean(sizes)
                compact = statistics.mean(c.header.ByteSize() + sum(map(len, c.blobs)) for c in cards)
                tokens = statistics.mean(c.header.context_tokens for c in cards)
                lines.append(f"| {codec} | {tokens:,.0f} | {decoded / 1e6:,.2f} MB | {compact / 1e6:,.2f} MB | "
                             f"{decoded / compact:.1f}x |")
                # cold reads: a hot tier that keeps one card, the last one used; read in push order,
                # every card but the last is cold
                tiny_hot = dict(hot_bytes=int(max(sizes) * 1.5))
                memory = ReceiverEngine(lm, StoreConfig(**tiny_hot))
                for c in cards:
                    memory.accept(frames(c.header, c.blobs))
                cards = cards[:-1]
                from_memory = [_timed(lambda c=c: memory.store.get(c.header.card_id)) for c in cards]
                disk = ReceiverEngine(lm, StoreConfig(store_dir=str(Path(tmp) / codec), **tiny_hot))
                from_disk = [_timed(lambda c=c: disk.store.get(c.header.card_id)) for c in cards]
                cell = "(no redis-server)"
                if server:
                    other = ReceiverEngine(lm, StoreConfig(store_redis=server.url, **tiny_hot))
                    cell = _ms([_timed(lambda c=c: other.store.get(c.header.card_id)) for c in cards])
                cold.append(f"| {codec} | {_ms(from_memory)} ms | {_ms(from_disk)} ms | {cell} ms | {_ms(repush)} ms |")
        finally:
            if server:
                server.stop()
    lines += cold
    return "\n".join(lines)


def budget_run(lm, sender: SenderEngine, contexts: list[str], args: argparse.Namespace) -> list[str]:
    """Many distinct cards into a small store, first thing in the process (after a warm-up card), so
    that RSS growth is the store's doing."""
    budget = StoreConfig(store_bytes=args.budget_mb << 20, hot_bytes=args.budget_mb << 20)
    receiver = ReceiverEngine(lm, budget)
    warm = sender.prepare(contexts[-1], "kivi-4")
    receiver.accept(frames(warm.header, warm.blobs))
    gc.collect()
    before = rss_bytes(os.getpid())
    decoded_total = 0
    rows = ["| cards pushed | cards held | memory tier | hot tier | RSS growth "
            "| those cards decoded (the old store's form) |",
            "|---|---|---|---|---|---|"]
    step = max(1, args.cards // 4)
    for n, context in enumerate(tqdm(contexts[: args.cards], desc="bench store budget", unit="card"), 1):
        card = sender.prepare(context, "kivi-4")
        decoded_total += receiver.accept(frames(card.header, card.blobs)).nbytes
        if n % step == 0 or n == args.cards:
            gc.collect()
            s = receiver.store
            rows.append(f"| {n} | {len(s)} | {s.memory.nbytes / 2**20:,.1f} MiB | {s.hot.nbytes / 2**20:,.1f} MiB | "
                        f"{(rss_bytes(os.getpid()) - before) / 2**20:,.1f} MiB | {decoded_total / 2**20:,.1f} MiB |")
    return [f"Distinct kivi-4 cards into a store of store_bytes = hot_bytes = {args.budget_mb} MiB "
            "(RSS of this process, measured before the other parts):", "", *rows, ""]
