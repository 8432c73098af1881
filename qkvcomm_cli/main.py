"""qkvcomm: serve-receiver, serve-sender, ask, demo."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from qkv_core import allocator
from qkv_core.config import DEFAULT_CODEC, DEFAULT_MODEL, RuntimeConfig, ServiceConfig, qa_file

DEMO_CONTEXT = (
    "Release notes for the Atlas API, version 4.2. The rate limit is 600 requests per minute per key. "
    "Bulk exports moved to the /v4/exports endpoint. The maintenance window is every Sunday at 02:00 UTC."
)
DEMO_QUESTION = "What is the rate limit?"


def _runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="smollm2-135m (default), gemma3-270m, a Hugging Face id (org/model), "
                   "a Hugging Face directory or a .gguf file")
    p.add_argument("--revision", help="Hugging Face id: the commit, branch or tag to load (default main)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="auto (default: bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


def _service_flags(p: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help=f"gRPC port (default {port}; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help=f"/metrics port (default {metrics_port}; 0 free, -1 off)")
    p.add_argument("--max-new-tokens", type=int, help="default answer length limit")
    _runtime_flags(p)
    p.set_defaults(default_port=port, default_metrics_port=metrics_port)


def _runtime(args: argparse.Namespace, model: str | None = None) -> RuntimeConfig:
    """The runtime flags of a one-shot command (eval, calibrate); `model` overrides --model."""
    given = {k: v for k in ("model", "revision", "device", "dtype") if (v := getattr(args, k, None))}
    return RuntimeConfig(**{**given, **({"model": model} if model else {})})


def _config(args: argparse.Namespace, **extra: object) -> ServiceConfig:
    """Flags over QKVCOMM_* environment variables over defaults; each service has its own default ports."""
    flags = {k: getattr(args, k) for k in ("host", "port", "metrics_port", "max_new_tokens", "model", "revision", "device", "dtype")}
    if "QKVCOMM_PORT" not in os.environ:
        flags["port"] = args.port if args.port is not None else args.default_port
    if "QKVCOMM_METRICS_PORT" not in os.environ:
        flags["metrics_port"] = args.metrics_port if args.metrics_port is not None else args.default_metrics_port
    return ServiceConfig.from_env(**flags, **extra)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qkvcomm", description="Hand compressed KV caches between LLM agents over gRPC.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve-receiver", help="run the Receiver service")
    _service_flags(p, 50061, 9461)
    p.add_argument("--store-bytes", type=int, help="memory budget of the card store")
    p.add_argument("--max-card-bytes", type=int, help="largest card accepted")
    p.add_argument("--alignment", action="append", default=[],
                   help="take cards from another model through this `calibrate pair` file (repeatable)")

    p = sub.add_parser("serve-sender", help="run the Sender service")
    _service_flags(p, 50062, 9462)
    p.add_argument("--codec-profile", type=Path, help="calibrated codec profile (default: the model's, made on first use)")
    p.add_argument("--layer-profile", type=Path, help="layer-selection profile (default: the model's, made on first use)")
    p.add_argument("--layers", type=float, help="share of layers every card carries (default 1.0)")
    p.add_argument("--layer-method", help="layer selection: combined (default), attention, prior, random, contiguous, loo")
    p.add_argument("--receiver", help="HOST:PORT of the receiver (or QKVCOMM_RECEIVER)")
    p.add_argument("--codec", help=f"default codec (default {DEFAULT_CODEC})")

    p = sub.add_parser("ask", help="ask a question about a context through a sender")
    p.add_argument("--sender", required=True, help="HOST:PORT of the sender")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--context", help="the context text")
    src.add_argument("--context-file", type=Path, help="a file holding the context")
    p.add_argument("--question", required=True)
    p.add_argument("--codec", default="", help="fp32, fp16, int8, seed-B, kivi-B or a spec (default: the sender's)")
    p.add_argument("--facts", action="store_true", help="extract facts into the card; the receiver reads their summary first")
    p.add_argument("--layers", type=float, default=0.0, help="share of layers to send, (0, 1] (default: the sender's)")
    p.add_argument("--layer-method", default="", help="combined, attention, prior, random, contiguous or loo")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    p = sub.add_parser("health", help="exit 0 when a service answers gRPC health checks with SERVING")
    p.add_argument("--address", default=f"127.0.0.1:{os.environ.get('QKVCOMM_PORT', '50061')}", help="HOST:PORT")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")

    p = sub.add_parser("bench", help="benchmarks (not tests): `bench codec`, `bench ttft`, `bench facts`, "
                       "`bench fuzz`, `bench load`")
    p.add_argument("what", choices=["codec", "ttft", "facts", "fuzz", "load"])
    p.add_argument("--cases", type=int, default=100_000, help="fuzz: mutated PushCard streams")
    p.add_argument("--seed", type=int, default=0, help="fuzz: mutation seed")
    p.add_argument("--clients", type=int, default=16, help="load: concurrent clients")
    p.add_argument("--minutes", type=float, default=10.0, help="load: how long the clients run")
    p.add_argument("--datasets", default="squad.jsonl,narrativeqa.jsonl", help="facts: files beside --data")
    p.add_argument("--limit", type=int, default=100, help="facts: rows per file")
    p.add_argument("--budget", type=int, default=400, help="facts: summary budget in bytes")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="ttft: context lengths in tokens")
    p.add_argument("--codec", default="fp16", help="ttft: codec of the cards")
    p.add_argument("--device", default="cpu", help="ttft: cpu or cuda")
    p.add_argument("--json", type=Path, help="ttft: also write the rows here, for `qkvcomm report`'s TTFT chart")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("squad.jsonl"),
                   help="QA JSONL: a path, or a file name in QKVCOMM_DATA_DIR (default squad.jsonl)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--codecs", default=",".join([
        "fp16", "int8", "seed-8", "seed-6", "seed-4", "seed-adaptive", "kivi-4", "kivi-3", "kivi-2",
        "budget-4", "budget-3", "budget-2.5", "tokenmix-4", "tokenmix-3",
    ]))
    p.add_argument("--repeats", type=int, help="timings are the best of this many runs (codec: 10, ttft: 3)")

    p = sub.add_parser("calibrate", help="calibrate a codec profile (`codec`), a layer-selection profile (`layers`) "
                       "or a cross-model alignment (`pair`, implied by --sender-model)")
    p.add_argument("what", nargs="?", choices=["codec", "layers", "pair"])
    p.add_argument("--sender-model", help="pair: the model whose cards the receiver model will take")
    p.add_argument("--receiver-model", help="pair: the receiver's model (default smollm2-135m)")
    p.add_argument("--method", default="stats,ridge", help="pair: alignments to fit, of stats and ridge")
    p.add_argument("--data", type=Path, help="JSONL of calibration rows (context; for layers also question, answers); default: bundled")
    p.add_argument("--context-field", default="context")
    p.add_argument("--limit", type=int, default=8, help="calibration rows taken from --data")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per calibration text")
    p.add_argument("--out", type=Path, help="profile file (default: the model's profile in the cache, used by the sender)")
    p.add_argument("--allocate", help="also write this adaptive codec's allocation, e.g. budget-3 or seed-adaptive")
    p.add_argument("--tokens", type=int, default=1024, help="context length the --allocate budget is met at")
    p.add_argument("--codec-out", type=Path, default=Path("codec.json"), help="where --allocate writes (usable as --codec)")
    _runtime_flags(p)

    p = sub.add_parser("eval", help="answer quality of a mode on a QA JSONL file")
    p.add_argument("--data", type=Path, required=True,
                   help="JSONL rows with question, answers (or answer), context: a path, or a file name in QKVCOMM_DATA_DIR")
    p.add_argument("--mode", default="kv", help="baseline, skyline, text, kv or facts (the fact summary alone)")
    p.add_argument("--hops", type=int, default=1, help="kv: relay the cache along this many agents (multi-hop)")
    p.add_argument("--layers", type=float, default=1.0, help="kv: share of layers the card carries")
    p.add_argument("--layer-method", default="combined", help="kv: combined, attention, prior, random, contiguous, loo")
    p.add_argument("--facts", nargs="?", const="hybrid", default="",
                   help="kv: send facts with the card (method: simple, yake, spacy, hybrid; default hybrid); facts mode: the method")
    p.add_argument("--codec", default="fp16")
    p.add_argument("--limit", type=int, default=0, help="first N rows (0: all)")
    p.add_argument("--context-field", default="context", help="e.g. context_gold for HotpotQA's gold paragraphs")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, help="write every example and the summary here")
    p.add_argument("--sender-model", default="", help="kv: a different sender model (cross-model handoff; needs --alignment)")
    p.add_argument("--alignment", default="", help="cross-model: stats, ridge (the pair's `calibrate pair` file) or a file")
    p.add_argument("--no-relevance", dest="relevance", action="store_false",
                   help="skip the MiniLM relevance metric (faster; `qkvcomm rescore` fills it in later)")
    _runtime_flags(p)

    p = sub.add_parser("rescore", help="recompute every metric of saved `eval --json` results, in place")
    p.add_argument("results", nargs="+", type=Path)

    p = sub.add_parser("report", help="a markdown table of `eval --json` results; --out writes RESULTS.md + charts")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="write this markdown file and its PNG charts beside it")

    p = sub.add_parser("demo", help="start both services on loopback, hand off one context, stop them")
    p.add_argument("--context", default=DEMO_CONTEXT)
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--codec", default=DEFAULT_CODEC)
    _runtime_flags(p)
    return ap


def _print_stats(answer: "object") -> None:
    s = answer.stats  # type: ignore[attr-defined]
    print(
        f"\n--\ncard {s.card_id[:12]}  codec {s.codec}  context {s.context_tokens} tokens\n"
        f"wire {s.wire_bytes:,} B  vs fp16 KV {s.kv_fp16_bytes:,} B  -> {s.compression_ratio:.2f}x "
        f"(vs fp32: {s.compression_ratio_fp32:.2f}x){'  [card reused]' if s.card_reused else ''}\n"
        f"prefill {s.prefill_s * 1e3:.0f} ms  quantize {s.quantize_s * 1e3:.0f} ms  transfer {s.transfer_s * 1e3:.0f} ms  "
        f"dequantize {s.dequantize_s * 1e3:.0f} ms  ttft {s.ttft_s * 1e3:.0f} ms  total {s.total_s * 1e3:.0f} ms",
        file=sys.stderr,
    )


def _ask(args: argparse.Namespace) -> int:
    from qkvcomm_cli.client import ask  # noqa: PLC0415 - keep `qkvcomm --help` fast

    context = args.context if args.context is not None else args.context_file.read_text()
    on_text = None if args.json else (lambda t: print(t, end="", flush=True))
    answer = ask(args.sender, context, args.question, args.codec, args.facts, args.max_new_tokens, on_text,
                 layer_ratio=args.layers, layer_method=args.layer_method)
    if args.json:
        print(answer.to_json())
    else:
        print()
        _print_stats(answer)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qkv_core.model.loading import load_model  # noqa: PLC0415
    from qkv_eval.evaluate import EvalConfig, run  # noqa: PLC0415

    cfg = EvalConfig(args.data, args.mode, args.codec, args.limit, args.max_new_tokens, args.context_field, args.hops,
                     args.facts, args.layers, args.layer_method, args.relevance, args.sender_model, args.alignment)
    lm = load_model(_runtime(args))
    sender_lm = load_model(_runtime(args, args.sender_model)) if args.sender_model else None
    report = run(lm, cfg, sender_lm=sender_lm)
    if args.json:
        args.json.write_text(report.to_json())
    s = report.summary()
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "-"
    print(f"{args.data.name} {cfg.mode}{'/' + cfg.codec if cfg.mode == 'kv' else ''}: {s['rows']} rows  "
          f"EM {s['em']:.1f}  F1 {s['f1']:.1f}  contains {s['contains']:.1f}  ratio vs fp16 {ratio}  "
          f"TTFT {s['ttft_s_mean'] * 1e3:.0f} ms")
    return 0


def _report(args: argparse.Namespace) -> int:
    from qkv_eval.report import (
        f1_vs_bits_chart,
        f1_vs_layers_chart,
        load,
        results_md,
        table,
        ttft_chart,
    )  # noqa: PLC0415

    loaded = load(args.results)
    results, ttft = [r for r in loaded if "bench" not in r], [r for r in loaded if r.get("bench") == "ttft"]
    if not args.out:
        print(table(results))
        return 0
    charts = []
    for name, draw, runs in (("f1_vs_bits.png", f1_vs_bits_chart, results),
                             ("f1_vs_layers.png", f1_vs_layers_chart, results),
                             ("ttft_vs_context.png", ttft_chart, ttft)):
        if draw(runs, args.out.parent / name):
            charts.append(args.out.parent / name)
    command = "qkvcomm report " + " ".join(str(p) for p in args.results) + f" --out {args.out}"
    args.out.write_text(results_md(results, command, charts))
    print(f"wrote {args.out} and {', '.join(str(c) for c in charts)}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from qkv_core import calibration_data  # noqa: PLC0415
    from qkv_core.model.loading import load_model  # noqa: PLC0415
    from qkv_eval.evaluate import load_rows  # noqa: PLC0415

    what = args.what or ("pair" if args.sender_model else None)
    if what is None:
        raise SystemExit("calibrate what? codec, layers, or pair (--sender-model A --receiver-model B)")
    if args.data:
        samples = calibration_data.from_rows(list(load_rows(args.data, args.limit)), args.context_field)
    else:
        samples = calibration_data.samples()
    if what == "pair":
        return _calibrate_pair(args, [context for context, _, _ in samples])
    lm = load_model(_runtime(args))
    return (_calibrate_layers if what == "layers" else _calibrate_codec)(args, lm, samples)


def _calibrate_pair(args: argparse.Namespace, texts: list[str]) -> int:
    from qkv_core.engine import crossmodel  # noqa: PLC0415
    from qkv_core.model.loading import load_model  # noqa: PLC0415

    if not args.sender_model:
        raise SystemExit("calibrate pair needs --sender-model (and --receiver-model, default smollm2-135m)")
    sender = load_model(_runtime(args, args.sender_model))
    receiver = load_model(_runtime(args, args.receiver_model or DEFAULT_MODEL))
    print(f"{sender.fingerprint.name} ({sender.num_layers} layers, {sender.fingerprint.num_kv_heads}x{sender.fingerprint.head_dim}) -> "
          f"{receiver.fingerprint.name} ({receiver.num_layers} layers, {receiver.fingerprint.num_kv_heads}x{receiver.fingerprint.head_dim}) "
          f"on {len(texts)} texts")
    for method in args.method.split(","):
        alignment = crossmodel.fit(sender, receiver, texts, method, args.max_tokens)
        out = alignment.save(args.out if args.out and "," not in args.method else alignment.default_path())
        print(f"{method}: receiver layer <- sender layer {alignment.sources} -> {out}")
    return 0


def _calibrate_codec(args: argparse.Namespace, lm, samples) -> int:  # noqa: ANN001
    from qkv_core.codec import allocation  # noqa: PLC0415
    from qkv_core.codec.registry import adaptive, save_layers  # noqa: PLC0415
    from qkv_core.engine import calibration  # noqa: PLC0415

    profile = calibration.calibrate(lm, samples, args.max_tokens)
    out = args.out or allocation.Profile.default_path(lm.fingerprint)
    profile.save(out)
    print(f"profile of {lm.fingerprint.name} on {profile.texts} samples ({profile.tokens} tokens) -> {out}")
    print("| layer | " + " | ".join(f"K{b}/V{b}" for b in allocation.BITS) + " |  (KIVI: next-token KL, nats, one tensor quantized)")
    print("|---|" + "---|" * len(allocation.BITS))
    for i in range(profile.num_layers):
        kl = profile.sensitivity
        print(f"| {i} | " + " | ".join(f"{kl['key'][str(b)][i]:.4f}/{kl['value'][str(b)][i]:.4f}" for b in allocation.BITS) + " |")
    if args.allocate:
        kind = adaptive(args.allocate)
        if kind is None or kind[0] == "tokenmix":
            raise SystemExit("--allocate takes seed-adaptive or budget-B (tokenmix depends on each context's attention)")
        shape = (lm.fingerprint.num_kv_heads, args.tokens, lm.fingerprint.head_dim)
        layers = (
            allocation.seed_adaptive(profile) if kind[0] == "seed-adaptive"
            else allocation.budget(profile, kind[1], [shape] * lm.num_layers)
        )
        save_layers(args.codec_out, layers, note=f"{args.allocate} for {lm.fingerprint.name} at {args.tokens} tokens")
        print(f"{args.allocate} at {args.tokens} tokens -> {args.codec_out} (use it as --codec {args.codec_out})")
    return 0


def _calibrate_layers(args: argparse.Namespace, lm, samples) -> int:  # noqa: ANN001
    from qkv_core.engine import selection  # noqa: PLC0415

    profile = selection.calibrate(lm, samples)
    out = args.out or selection.LayerProfile.default_path(lm.fingerprint)
    profile.save(out)
    print(f"layer profile of {lm.fingerprint.name} on {profile.samples} samples -> {out}")
    print("| layer | attention mass | leave-one-out (nats) |\n|---|---|---|")
    for i, (a, d) in enumerate(zip(profile.attention, profile.loo)):
        print(f"| {i} | {a:.4f} | {d:.3f} |")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from qkvcomm_cli.client import ask  # noqa: PLC0415
    from qkvcomm_cli.launch import spawn  # noqa: PLC0415

    runtime = [f"--{k}={v}" for k in ("model", "revision", "device", "dtype") if (v := getattr(args, k))]
    print("starting receiver and sender on loopback (loading the model)...", file=sys.stderr)
    receiver = spawn("receiver", *runtime)
    try:
        sender = spawn("sender", "--receiver", receiver.address, *runtime)
        try:
            print(f"receiver {receiver.address} (metrics :{receiver.metrics_port}), "
                  f"sender {sender.address} (metrics :{sender.metrics_port})", file=sys.stderr)
            print(f"context: {args.context}\nquestion: {args.question}\nanswer: ", end="", flush=True)
            answer = ask(sender.address, args.context, args.question, args.codec,
                         on_text=lambda t: print(t, end="", flush=True))
            print()
            _print_stats(answer)
        finally:
            sender.stop()
    finally:
        receiver.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    allocator.tune()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    if getattr(args, "data", None) is not None:
        try:
            args.data = qa_file(args.data)
        except FileNotFoundError as e:
            raise SystemExit(f"qkvcomm {args.command}: {e}") from None
    if args.command == "ask":
        return _ask(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "report":
        return _report(args)
    if args.command == "rescore":
        from qkv_eval.evaluate import rescore  # noqa: PLC0415

        for path in args.results:
            result = json.loads(path.read_text())
            if "bench" in result:  # `bench ttft --json` files share results/ with eval results
                print(f"skipped {path}: a benchmark, not an eval result")
                continue
            path.write_text(json.dumps(rescore(result), indent=1) + "\n")
            print(f"rescored {path}")
        return 0
    if args.command == "health":
        from qkvcomm_cli.client import healthy  # noqa: PLC0415

        ok = healthy(args.address, args.service)
        print("SERVING" if ok else "NOT SERVING", file=sys.stderr)
        return 0 if ok else 1
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "bench" and args.what in ("fuzz", "load"):
        from qkv_eval import bench_service  # noqa: PLC0415

        return bench_service.main(args)
    if args.command == "bench" and args.what == "facts":
        from qkv_eval import bench_facts  # noqa: PLC0415

        paths = [args.data.parent / name for name in args.datasets.split(",")]
        print(bench_facts.table(bench_facts.run_facts_bench(paths, args.limit, args.budget), args.budget))
        return 0
    if args.command == "bench" and args.what == "ttft":
        from qkv_eval import bench_ttft  # noqa: PLC0415

        runtime = RuntimeConfig(model=args.model, device=args.device)
        rows = bench_ttft.run_ttft_bench(runtime, args.data, [int(n) for n in args.lengths.split(",")], args.codec, args.repeats or 3)
        print(bench_ttft.table(rows, args.model, args.codec, args.device))
        if args.json:
            args.json.write_text(bench_ttft.to_json(rows, args.model, args.codec, args.device))
        return 0
    if args.command == "bench":
        from qkv_eval.bench import run_codec_bench, table  # noqa: PLC0415

        rows = run_codec_bench(args.model, args.data, args.tokens, args.codecs.split(","), args.repeats or 10)
        print(table(rows, args.tokens, args.model))
        return 0
    if args.command == "serve-receiver":
        from receiver_service.server import main as serve  # noqa: PLC0415

        cfg = _config(args, store_bytes=args.store_bytes, max_card_bytes=args.max_card_bytes,
                      alignments=",".join(args.alignment) or None)
    else:
        from sender_service.server import main as serve  # noqa: PLC0415

        cfg = _config(
            args, receiver=args.receiver, codec=args.codec, layer_ratio=args.layers, layer_method=args.layer_method,
            codec_profile=str(args.codec_profile) if args.codec_profile else None,
            layer_profile=str(args.layer_profile) if args.layer_profile else None,
        )
    asyncio.run(serve(cfg))
    return 0
