"""`qkvcomm bench fuzz` and `qkvcomm bench load`: the services as real processes, under hostile
input and under load. Both start their own receiver (and sender) on loopback and print markdown
tables with the configuration and the machine.

load: N clients, each asking questions about QA rows through the sender for T minutes, a mix of
full int8 cards and half-layer (`prior@0.5`) kivi-4 cards. Reported: requests, errors by status,
p50/p95/p99 of the client's latency and of each handoff stage, and the RSS of both services
sampled every 5 s. Greedy decoding is deterministic, so every answer is checked against the first
answer seen for its own (context, question, codec): a different one means answers crossed
between requests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from qkvcomm_client import SenderClient

from qkv_eval import fuzz
from qkv_eval.bench import machine
from qkv_eval.evaluate import load_rows
from qkvcomm_cli.launch import Child, spawn

MIXES = (("int8", 1.0), ("kivi-4", 0.5))  # (codec, layer ratio): full cards and layer-selected ones
STAGES = ("client", "prefill_s", "quantize_s", "transfer_s", "dequantize_s", "ttft_s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@dataclass
class LoadReport:
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    crossed: int = 0
    answers: dict[tuple, str] = field(default_factory=dict)
    rss: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def table(self) -> str:
        n = sum(self.statuses.values())
        ok = self.statuses.get("OK", 0)

        def pct(values: list[float], q: float) -> str:
            if len(values) < 2:
                return "-"
            return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1e3:,.0f}"

        lines = [
            f"{self.clients} clients x {self.seconds / 60:.1f} min; mix {', '.join(f'{c}@{r:g}' for c, r in MIXES)}",
            "",
            "| requests | OK | errors by status | answers crossed | throughput (req/s) |",
            "|---|---|---|---|---|",
            f"| {n} | {ok} | {', '.join(f'{k} {v}' for k, v in sorted(self.statuses.items()) if k != 'OK') or 'none'} "
            f"| {self.crossed} | {ok / self.seconds:.2f} |",
            "",
            "| stage (ms) | p50 | p95 | p99 |",
            "|---|---|---|---|",
        ]
        for stage in STAGES:
            v = self.latencies[stage]
            lines.append(f"| {stage.removesuffix('_s')} | {pct(v, 50)} | {pct(v, 95)} | {pct(v, 99)} |")
        lines += ["", "| process | RSS start (MB) | RSS end (MB) | RSS max (MB) |", "|---|---|---|---|"]
        for name, trace in self.rss.items():
            lines.append(f"| {name} | {trace[0] / 1e6:,.0f} | {trace[-1] / 1e6:,.0f} | {max(trace) / 1e6:,.0f} |")
        return "\n".join(lines)


def run_load(sender: str, rows: list[dict], clients: int, seconds: float, processes: dict[str, int]) -> LoadReport:
    report = LoadReport(clients, seconds)
    end = time.monotonic() + seconds
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, pid in processes.items():
                report.rss[name].append(rss_bytes(pid))
            stop.wait(5)

    def client(k: int) -> None:
        i = k
        with SenderClient(sender, timeout_s=300) as user:  # one channel per client, as agents hold them
            while time.monotonic() < end:
                row = rows[i % len(rows)]
                codec, ratio = MIXES[i % len(MIXES)]
                i += clients
                start = time.perf_counter()
                try:
                    answer = user.ask(row["context"], row["question"], codec=codec, layer_ratio=ratio,
                                      layer_method="prior", max_new_tokens=16)
                except grpc.RpcError as e:
                    with report.lock:
                        report.statuses[e.code().name] += 1
                    continue
                elapsed = time.perf_counter() - start
                key = (row["id"], codec, ratio)
                with report.lock:
                    report.statuses["OK"] += 1
                    report.latencies["client"].append(elapsed)
                    for stage in STAGES[1:]:
                        report.latencies[stage].append(getattr(answer.stats, stage))
                    first = report.answers.setdefault(key, answer.text)
                    report.crossed += first != answer.text

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    for name, pid in processes.items():
        report.rss[name].append(rss_bytes(pid))
    return report


def _services(args: argparse.Namespace) -> tuple[Child, Child]:
    runtime = [f"--{k}={v}" for k in ("model", "device") if (v := getattr(args, k, None))]
    receiver = spawn("receiver", *runtime)
    try:
        return receiver, spawn("sender", "--receiver", receiver.address, *runtime)
    except BaseException:
        receiver.stop()
        raise


def main(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}", flush=True)
    if args.what == "fuzz":
        from qkv_core.config import RuntimeConfig  # noqa: PLC0415
        from qkv_core.engine.sender import SenderEngine  # noqa: PLC0415
        from qkv_core.model.loading import load_model  # noqa: PLC0415

        lm = load_model(RuntimeConfig(model=args.model, device="cpu", dtype="float32"))
        cards = fuzz.base_cards(SenderEngine(lm))
        receiver = spawn("receiver", f"--model={args.model}", "--device=cpu")
        try:
            report = fuzz.run(receiver.address, cards, args.cases, seed=args.seed, progress=True)
            print(f"receiver RSS after the run: {rss_bytes(receiver.process.pid) / 1e6:,.0f} MB")
        finally:
            receiver.stop()
        print(f"`qkvcomm bench fuzz --cases {args.cases} --seed {args.seed}`, base codecs "
              f"{', '.join(fuzz.BASE_CODECS)} + int8 prior@0.5\n")
        print(report.table())
        return 0 if report.ok else 1
    rows = list(load_rows(args.data, 40))
    receiver, sender = _services(args)
    try:
        report = run_load(sender.address, rows, args.clients, args.minutes * 60,
                          {"receiver": receiver.process.pid, "sender": sender.process.pid})
    finally:
        sender.stop()
        receiver.stop()
    print(f"`qkvcomm bench load --clients {args.clients} --minutes {args.minutes:g}`, {len(rows)} rows of "
          f"{args.data.name}\n")
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps({"statuses": report.statuses, "crossed": report.crossed,
                                         "latencies": report.latencies, "rss": report.rss}, indent=1))
    return 0 if report.crossed == 0 and set(report.statuses) == {"OK"} else 1
