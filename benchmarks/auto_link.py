#!/usr/bin/env python3
"""codec auto on a real shaped link (root; `make bench-auto`, a short version `make bench-auto-short`).

Sender and receiver run in two network namespaces joined by a veth pair (benchmarks/netns.py);
the sender-to-receiver direction is shaped with `tc ... tbf` to each rate in turn (and left
unshaped). At each rate, every option hands over the same contexts of QA text (SQuAD paragraphs,
distinct per context, lengths log-spaced between --min-tokens and --max-tokens) and asks one
question with one new token. The receiver is restarted before each option, so no option finds a
card another one left; the sender keeps its contexts' KV (context cache) across options. With
--repeats N every rate runs N rounds, the options in a rotated order each round; a context's time
is its median over the rounds, and the spread of auto / best across rounds is printed beside it.

Time to first token here is the handoff's, as codec auto predicts it: the client's time from the
call to the first piece of the answer, less the sender's own prefill of the context (an agent has
read its context before it hands it on; text handoffs do not prefill at the sender). Prints one
markdown table per rate, the summary (auto against the best fixed option: total time over the
contexts), writes the rows as JSON and the chart (time to first token against link speed).

    sudo .venv/bin/python benchmarks/auto_link.py [--rates 10mbit,100mbit,1gbit,none] [--contexts 20]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from netns import RCV, RCV_IP, SND, serve, setup, sh, shape, stop, teardown

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the first paragraph about?"
FIXED = ("text", "fp16", "kivi-4", "budget-3")

# Runs inside the sender's namespace: one option over every context, one JSON line per Ask.
CLIENT = r"""
import json, sys, time
from qkvcomm_client import SenderClient
option, contexts = sys.argv[1], json.load(open(sys.argv[2]))
with SenderClient("127.0.0.1:50062", timeout_s=900) as sender:
    for i, context in enumerate(contexts):
        start, first = time.perf_counter(), []
        answer = sender.ask(context, sys.argv[3], codec=option, max_new_tokens=1,
                            on_text=lambda _: first or first.append(time.perf_counter()))
        s = answer.stats
        waited = (first[0] if first else time.perf_counter()) - start
        row = {"option": option, "context": i, "tokens": s.context_tokens, "codec": s.codec, "wire_bytes": s.wire_bytes,
               "client_s": waited, "sender_prefill_s": s.prefill_s if s.codec != "text" else 0.0,
               "ttft_s": waited - (s.prefill_s if s.codec != "text" else 0.0), "reused": s.card_reused}
        if s.HasField("auto"):
            a = s.auto
            row["auto"] = {"predicted_s": a.predicted_s, "measured_s": a.measured_s,
                           "throughput": a.throughput_bytes_per_s,
                           "rtt_s": a.rtt_s, "floor": a.max_quality_loss, "decide_s": a.decide_s, "probe_s": a.probe_s,
                           "loss": next(o.quality_loss for o in a.options if o.codec == s.codec)}
        print(json.dumps(row), flush=True)
"""


def contexts(count: int, low: int, high: int) -> list[str]:
    """`count` contexts of distinct SQuAD paragraphs, their lengths log-spaced in [low, high] tokens."""
    sys.path.insert(0, str(ROOT))
    from qkv_core.config import RuntimeConfig, qa_file  # noqa: PLC0415
    from qkv_core.model.loading import load_model  # noqa: PLC0415

    tokenizer = load_model(RuntimeConfig(device="cpu")).tokenizer
    lines = qa_file("squad.jsonl").read_text().splitlines()
    paragraphs = list(dict.fromkeys(json.loads(line)["context"] for line in lines))
    out, at = [], 0
    for i in range(count):
        target = low * (high / low) ** (i / max(1, count - 1))
        parts: list[str] = []
        while len(tokenizer("\n".join(parts)).input_ids) < target:
            parts.append(paragraphs[at % len(paragraphs)])
            at += 1
        out.append("\n".join(parts))
    return out


def run_rate(rate: str | None, options: list[str], path: Path, env: dict[str, str], out,
             repeats: int = 1) -> list[dict]:
    """Every option at one rate, `repeats` rounds in rotated orders; each option's rows are appended
    to `out` as soon as they are in."""
    shape(rate)
    rows = []
    sender = serve(SND, "sender", "--host", "127.0.0.1", "--port", "50062", "--metrics-port", "-1",
                   "--receiver", f"{RCV_IP}:50061", env=env)
    rounds = [(r, o) for r in range(repeats) for o in options[r % len(options):] + options[: r % len(options)]]
    try:
        for repeat, option in rounds:
            receiver = serve(RCV, "receiver", "--host", RCV_IP, "--port", "50061", "--metrics-port", "-1", env=env)
            try:
                asked = sh("ip", "netns", "exec", SND, sys.executable, "-c", CLIENT, option, str(path), QUESTION)
            finally:
                stop(receiver)
            done = [{**json.loads(line), "rate": rate or "unshaped",
                     "repeat": repeat} for line in asked.stdout.splitlines()]
            rows += done
            out.write("".join(json.dumps(r) + "\n" for r in done))
            out.flush()
            print(f"  {rate or 'unshaped'} {option}: median {statistics.median(r['ttft_s'] for r in done):.2f} s",
                  file=sys.stderr, flush=True)
    finally:
        stop(sender)
    return rows


def _totals(rows: list[dict], options: list[str]) -> dict[str, float]:
    """Each option's total over the contexts, a context's time being its median over the rounds."""
    times = defaultdict(list)
    for r in rows:
        times[r["option"], r["context"]].append(r["ttft_s"])
    return {o: sum(statistics.median(v) for (opt, _), v in times.items() if opt == o) for o in options}


def tables(rows: list[dict], options: list[str]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[r["rate"], r["option"]].append(r)
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    lines = ["| link | " + " | ".join(f"{o} (s)" for o in options) + " | auto chose | auto / best fixed | "
             "per round | auto's decision (ms) | auto below floor |",
             "|---|" + "---|" * (len(options) + 5)]
    for rate in rates:
        at_rate = [r for r in rows if r["rate"] == rate]
        total = _totals(at_rate, options)
        fixed = {o: t for o, t in total.items() if o != "auto"}
        best = min(fixed, key=fixed.get)
        chose = defaultdict(int)
        for r in by[rate, "auto"]:
            chose[r["codec"]] += 1
        below = sum(r["auto"]["loss"] > r["auto"]["floor"] for r in by[rate, "auto"])
        cells = [f"{statistics.median(r['ttft_s'] for r in by[rate, o]):.2f}" for o in options]
        ratio = total["auto"] / fixed[best] if "auto" in total else math.nan
        per_round = []
        for repeat in sorted({r.get("repeat", 0) for r in at_rate}):
            one = _totals([r for r in at_rate if r.get("repeat", 0) == repeat], options)
            per_round.append(one["auto"] / min(t for o, t in one.items() if o != "auto") if "auto" in one else math.nan)
        decide = [r["auto"].get("decide_s", math.nan) * 1e3 for r in by[rate, "auto"]]
        chosen = ", ".join(f"{c} {n}" for c, n in sorted(chose.items()))
        lines.append(f"| {rate} | " + " | ".join(cells) + f" | {chosen} "
                     f"| {ratio:.2f} (best: {best}) | {min(per_round):.2f}-{max(per_round):.2f} | "
                     f"{statistics.median(decide):.1f} (max {max(decide):.0f}) | {below} |")
    n = len({r['context'] for r in rows})
    tokens = sorted({r["tokens"] for r in rows if r["option"] == "text"})
    rounds = len({r.get("repeat", 0) for r in rows})
    return (f"Median handoff time to first token over {n} contexts of {tokens[0]}-{tokens[-1]} tokens, "
            f"{rounds} round(s); "
            "'auto / best fixed': auto's total over the contexts (each context's median over the rounds) against "
            "the fixed option with the lowest total; 'per round': the same ratio in each round alone; 'auto's "
            "decision': the time the sender took to choose (median, max), part of auto's time.\n\n"
            + "\n".join(lines))


def chart(rows: list[dict], options: list[str], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    speeds = {"10mbit": 10, "100mbit": 100, "1gbit": 1000, "unshaped": 10_000}
    rates = [r for r in dict.fromkeys(x["rate"] for x in rows) if r in speeds]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for option in options:
        ys = [statistics.mean(r["ttft_s"] for r in rows if r["rate"] == rate and r["option"] == option)
              for rate in rates]
        style = dict(lw=3, color="black", marker="o") if option == "auto" else dict(lw=1.2, marker=".")
        ax.plot([speeds[r] for r in rates], ys, label=option, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([speeds[r] for r in rates], [r for r in rates])
    ax.set_xlabel("sender to receiver link (tbf); 'unshaped' = veth")
    ax.set_ylabel("mean handoff time to first token (s)")
    ax.set_title("codec auto against fixed options, SmolLM2-135M on 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10mbit,100mbit,1gbit,none", help="tc rates; 'none' = unshaped")
    ap.add_argument("--options", default=",".join((*FIXED, "auto")))
    ap.add_argument("--contexts", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="rounds per rate, the options' order rotated each round")
    ap.add_argument("--min-tokens", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "auto_link.json")
    ap.add_argument("--chart", type=Path, default=ROOT / "auto_link.png")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("auto_link.py needs root (network namespaces, tc)")
    options = args.options.split(",")
    path = Path("/tmp/qkvnet-contexts.json")
    path.write_text(json.dumps(contexts(args.contexts, args.min_tokens, args.max_tokens)))
    # the sender keeps every context's KV; the receiver's store holds what one option sends
    env = {"QKVCOMM_CONTEXT_CACHE_BYTES": str(8 << 30), "QKVCOMM_STORE_BYTES": str(4 << 30),
           "QKVCOMM_HOT_BYTES": str(2 << 30)}
    rows: list[dict] = []
    start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup(None)
    try:
        with open(args.out, "w") as out:
            for rate in args.rates.split(","):
                rows += run_rate(None if rate == "none" else rate, options, path, env, out, args.repeats)
    finally:
        teardown()
        path.unlink(missing_ok=True)
    sys.path.insert(0, str(ROOT))
    from qkv_eval.bench import machine  # noqa: PLC0415

    print(f"codec auto over a shaped veth link: {machine()}; {time.time() - start:.0f} s\n")
    print(tables(rows, options))
    if "auto" not in options:
        return 0
    chart(rows, options, args.chart)
    below = [r for r in rows if r["option"] == "auto" and r["auto"]["loss"] > r["auto"]["floor"]]
    if below:
        print(f"auto chose an option below its quality floor {len(below)} times", file=sys.stderr)
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
