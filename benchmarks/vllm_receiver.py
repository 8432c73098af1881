#!/usr/bin/env python3
"""The Hugging Face receiver against the vLLM receiver under concurrent Asks (`make bench-vllm`).

One sender (the project's environment) in front of each receiver in turn: the HF receiver
(`--engine hf`, this environment) and the vLLM receiver (`--engine vllm`, .venv-vllm; prefix caching
off, so every Ask loads its card through the connector instead of finding the prompt cached). A
warm-up pass asks about every row once, one at a time: the sender prefills each context and sends
its card, which the receiver keeps. Then, at each concurrency C, C clients (one channel each) ask
at once, ROUNDS questions each, every Ask about another row: the sender finds the card held (one
HasCard) and the receiver answers (greedy, max_new_tokens new tokens). So the numbers are the
receivers': TTFT is the client's time from the call to the first piece of the answer; throughput
is answers (and generated tokens) per second of the pass's wall time. Both receivers' answers are
compared row by row (greedy: they should agree, up to the two engines' kernels).

    .venv/bin/python benchmarks/vllm_receiver.py [--clients 8,16] [--rounds 2] [--codec fp16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qkvcomm_client import SenderClient  # noqa: E402

from qkv_core.config import qa_file  # noqa: E402
from qkv_eval.bench import machine  # noqa: E402
from qkv_eval.evaluate import load_rows  # noqa: E402
from qkvcomm_cli.launch import spawn  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_ARGS = {"max_model_len": 4096, "enable_prefix_caching": False, "enforce_eager": True, "seed": 0}
RUNTIME = ("--device", "cpu", "--dtype", "float32")


def ask_all(sender: str, rows: list[dict], clients: int, rounds: int, codec: str, max_new: int) -> dict:
    """`clients` threads at once, `rounds` Asks each (row k, k + clients, ...): per-Ask TTFT and tokens."""
    ttft, tokens, answers, errors = [], [], {}, []
    lock, go = threading.Lock(), threading.Barrier(clients)

    def client(k: int) -> None:
        with SenderClient(sender, timeout_s=600) as user:
            user.info()  # the channel is up before the clock starts
            go.wait()
            for r in range(rounds):
                i = (k + r * clients) % len(rows)
                start = time.perf_counter()
                stream, first = user.ask_stream(rows[i]["context"], rows[i]["question"], codec=codec,
                                                max_new_tokens=max_new), None
                try:
                    for _ in stream:
                        first = first or time.perf_counter() - start
                    answer = stream.answer
                except Exception as e:  # noqa: BLE001 - counted and shown
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    ttft.append(first or time.perf_counter() - start)
                    tokens.append(answer.stats.generated_tokens)
                    answers[i] = answer.text

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "asks": len(ttft), "errors": errors, "wall_s": wall, "ttft_s": ttft,
            "tokens": sum(tokens), "answers": answers}


def run_receiver(engine: str, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    print(f"{engine}: starting the receiver and a sender", flush=True)
    with tempfile.TemporaryDirectory() as store:
        extra = ("--engine", "vllm", "--store-dir", store, "--vllm-args",
                 json.dumps(VLLM_ARGS)) if engine == "vllm" else ()
        receiver = spawn("receiver", *RUNTIME, "--performance-tokens", "0", *extra, timeout_s=900,
                         python=str(VLLM_PYTHON) if engine == "vllm" else sys.executable)
        try:
            sender = spawn("sender", "--receiver", receiver.address, *RUNTIME, timeout_s=900)
            try:
                warm = ask_all(sender.address, rows, 1, len(rows), args.codec, args.max_new_tokens)
                print(f"{engine}: warm-up, {len(rows)} cards sent in {warm['wall_s']:.0f} s", flush=True)
                passes = []
                for c in args.clients:
                    result = ask_all(sender.address, rows, c, args.rounds, args.codec, args.max_new_tokens)
                    passes.append({"engine": engine, **result})
                    print(f"{engine}: {c} clients, {result['asks']} asks in {result['wall_s']:.1f} s", flush=True)
                return passes
            finally:
                sender.stop()
        finally:
            receiver.stop()


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def table(passes: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{len(args.rows_used)} SQuAD rows, {args.codec} cards, {args.max_new_tokens} new tokens (greedy), "
             f"{args.rounds} Asks per client; vLLM: {json.dumps(VLLM_ARGS)}", "",
             "| clients | receiver | Asks | errors | answers/s | tokens/s | TTFT p50 (s) | TTFT p95 (s) "
             "| vLLM / HF answers/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(p["engine"], p["clients"]): p for p in passes}
    for c in args.clients:
        for engine in ("hf", "vllm"):
            p = by.get((engine, c))
            if p is None or not p["ttft_s"]:
                continue
            rate = p["asks"] / p["wall_s"]
            hf = by.get(("hf", c))
            ratio = f"{rate / (hf['asks'] / hf['wall_s']):.2f}" if engine == "vllm" and hf and hf["asks"] else ""
            lines.append(f"| {c} | {engine} | {p['asks']} | {len(p['errors'])} | {rate:.2f} "
                         f"| {p['tokens'] / p['wall_s']:.1f} | {pct(p['ttft_s'], 50):.2f} "
                         f"| {pct(p['ttft_s'], 95):.2f} | {ratio} |")
    agree = [(by[("hf", c)]["answers"], by[("vllm", c)]["answers"]) for c in args.clients
             if ("hf", c) in by and ("vllm", c) in by]
    same = sum(a[i] == b[i] for a, b in agree for i in a if i in b)
    total = sum(1 for a, b in agree for i in a if i in b)
    lines += ["", f"Answers equal between the two receivers: {same} of {total} (greedy, fp32 on both)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "bench_vllm_receiver.json")
    args = ap.parse_args()
    if "vllm" in args.engines and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make test-vllm` builds the vLLM environment")
    n = max(args.clients) * args.rounds
    args.rows_used = rows = list(load_rows(qa_file("squad.jsonl"), 4 * n))[::4][:n]  # distinct paragraphs
    print(f"machine: {machine()}", flush=True)
    passes = [p for engine in args.engines.split(",") for p in run_receiver(engine, rows, args)]
    print()
    print(f"`benchmarks/vllm_receiver.py --clients {','.join(map(str, args.clients))} --rounds {args.rounds}`, "
          f"machine: {machine()}\n")
    print(table(passes, args))
    args.json.write_text(json.dumps(passes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
