"""`qkvcomm bench codec|ttft|facts|fuzz|load|tls|store|policy|dialogue`: benchmarks, not tests (qkv_eval holds them)."""
from __future__ import annotations

import argparse
from pathlib import Path

from qkv_core.config import RuntimeConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (not tests): `bench codec`, `bench ttft`, `bench facts`, "
                       "`bench fuzz`, `bench load`, `bench tls`, `bench store`, `bench policy --simulate`, "
                       "`bench dialogue`, `bench transport`, `bench gpu`")
    p.add_argument("what", choices=["codec", "ttft", "facts", "fuzz", "load", "tls", "store", "policy", "dialogue",
                                    "transport", "gpu"])
    p.add_argument("--shape", default="llama-3.1-8b", help="gpu: the random-weight model's shape (llama-3.1-8b, "
                   "tiny)")
    p.add_argument("--cards", type=int, default=200, help="store: distinct cards pushed into a small budget")
    p.add_argument("--budget-mb", type=int, default=32, help="store: store_bytes and hot_bytes of that run, in MiB")
    p.add_argument("--cases", type=int, default=100_000, help="fuzz: mutated PushCard streams")
    p.add_argument("--seed", type=int, default=0, help="fuzz: mutation seed")
    p.add_argument("--clients", type=int, default=16, help="load: concurrent clients")
    p.add_argument("--minutes", type=float, default=10.0, help="load: how long the clients run")
    p.add_argument("--datasets", default="squad.jsonl,narrativeqa.jsonl", help="facts: files beside --data")
    p.add_argument("--limit", type=int, default=100, help="facts: rows per file; tls: rows; store: cards timed")
    p.add_argument("--budget", type=int, default=400, help="facts: summary budget in bytes")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="ttft: context lengths in tokens")
    p.add_argument("--codec", default="fp16", help="ttft, gpu: codec of the cards")
    p.add_argument("--device", default="cpu", help="ttft, gpu: cpu or cuda")
    p.add_argument("--json", type=Path, help="ttft: also write the rows here, for `qkvcomm report`'s TTFT chart; "
                   "gpu: the whole run")
    p.add_argument("--simulate", action="store_true", help="policy: codec auto's model on paper (the measured run "
                   "is `make bench-auto`)")
    p.add_argument("--measured", type=Path, help="policy: take the model shape and speeds from a `bench gpu --json` "
                   "file instead of --preset")
    p.add_argument("--preset", default="h100-8b", help="policy: h100-8b or h100-135m (model shape and speeds)")
    p.add_argument("--context-tokens", type=int, default=8192, help="policy: context length")
    p.add_argument("--links", default="1,10,100", help="policy: link speeds in Gbit/s")
    p.add_argument("--rtt-ms", type=float, default=0.2, help="policy: round trip")
    p.add_argument("--codec-gbps", type=float, default=0.0, help="policy: what-if codec speed at both ends, GB/s "
                   "(default: the preset's measured speeds)")
    p.add_argument("--dialogues", type=int, default=3, help="dialogue: dialogues per codec")
    p.add_argument("--turns", type=int, default=10, help="dialogue: turns per dialogue (a document, then follow-ups)")
    p.add_argument("--doc-chars", type=int, default=4000, help="dialogue: the document's length in characters")
    p.add_argument("--drift-rows", type=int, default=10, help="dialogue: SQuAD rows of the relay drift part (0: skip)")
    p.add_argument("--longctx", type=Path, default=Path("squad_longctx.jsonl"),
                   help="dialogue: the documents' QA JSONL (default squad_longctx.jsonl)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("squad.jsonl"),
                   help="QA JSONL: a path, or a file name in QKVCOMM_DATA_DIR (default squad.jsonl)")
    p.add_argument("--tokens", type=int, help="codec: the cache's tokens (default 1024); transport: the fp16 card's "
                   "(default 14000, ~322 MB); gpu: the codec rows' cache (default 8192)")
    p.add_argument("--link", default="", help="transport: the receiving side in a network namespace behind a veth "
                   "pair shaped to this rate (tc syntax: 1gbit, 5gbit; root); plaintext paths only")
    p.add_argument("--paths", default="", help="transport: socket,socket+tls,grpc-bytes,pushcard,pushcard+tls,"
                   "bulk,bulk+tls (default: all)")
    p.add_argument("--codecs", default="", help="codec: the codecs to measure (default: every family); "
                   "tls: int8,kivi-4,fp16; dialogue: fp16,kivi-4")
    p.add_argument("--repeats", type=int, help="timings are the best of this many runs (codec: 10, ttft: 3); "
                   "transport: the median of this many rounds (3)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.what in ("fuzz", "load"):
        from qkv_eval import bench_service  # noqa: PLC0415

        return bench_service.main(args)
    if args.what == "facts":
        from qkv_eval import bench_facts  # noqa: PLC0415

        paths = [args.data.parent / name for name in args.datasets.split(",")]
        print(bench_facts.table(bench_facts.run_facts_bench(paths, args.limit, args.budget), args.budget))
        return 0
    if args.what == "ttft":
        from qkv_eval import bench_ttft  # noqa: PLC0415

        runtime = RuntimeConfig(model=args.model, device=args.device)
        rows = bench_ttft.run_ttft_bench(runtime, args.data, [int(n) for n in args.lengths.split(",")], args.codec,
                                         args.repeats or 3)
        print(bench_ttft.table(rows, args.model, args.codec, args.device))
        if args.json:
            args.json.write_text(bench_ttft.to_json(rows, args.model, args.codec, args.device))
        return 0
    if args.what == "policy":
        if not args.simulate:
            raise SystemExit("bench policy: --simulate is the paper model; the measured run is `make bench-auto` "
                             "(root)")
        from qkv_eval import bench_policy  # noqa: PLC0415

        print(bench_policy.run(args))
        return 0
    if args.what == "dialogue":
        from qkv_eval import bench_dialogue  # noqa: PLC0415

        print(bench_dialogue.run(args))
        return 0
    if args.what == "gpu":
        from qkv_eval import bench_gpu  # noqa: PLC0415

        args.tokens, args.repeats = args.tokens or 8192, args.repeats or 3
        print(bench_gpu.run(args))
        return 0
    if args.what == "transport":
        from qkv_eval import bench_transport  # noqa: PLC0415

        args.tokens, args.repeats = args.tokens or 14000, args.repeats or 3
        print(bench_transport.run(args))
        return 0
    if args.what in ("tls", "store"):
        from qkv_eval import bench_store, bench_tls  # noqa: PLC0415

        print((bench_tls if args.what == "tls" else bench_store).run(args))
        return 0
    from qkv_eval.bench import CODECS, run_codec_bench, table  # noqa: PLC0415

    codecs = args.codecs.split(",") if args.codecs else list(CODECS)
    tokens = args.tokens or 1024
    rows = run_codec_bench(args.model, args.data, tokens, codecs, args.repeats or 10)
    print(table(rows, tokens, args.model))
    return 0
