"""`qkvcomm eval`, `rescore` and `report`: answer quality on QA JSONL, recomputed metrics, RESULTS.md."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qkv_core.config import LAYER_METHOD
from qkvcomm_cli.commands.common import runtime, runtime_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="answer quality of a mode on a QA JSONL file")
    p.add_argument("--data", type=Path, required=True,
                   help="JSONL rows with question, answers (or answer), context: a path, or a file name in "
                        "QKVCOMM_DATA_DIR")
    p.add_argument("--mode", default="kv", help="baseline, skyline, text, kv or facts (the fact summary alone)")
    p.add_argument("--hops", type=int, default=1, help="kv: relay the cache along this many agents (multi-hop)")
    p.add_argument("--deltas", action="store_true",
                   help="with --hops: each later hop sends only its own turn (a delta card) instead of re-encoding "
                        "the cache")
    p.add_argument("--layers", type=float, default=1.0, help="kv: share of layers the card carries")
    p.add_argument("--layer-method", default=LAYER_METHOD,
                   help="kv: loo, combined, attention, prior, random, contiguous")
    p.add_argument("--facts", nargs="?", const="hybrid", default="",
                   help="kv: send facts with the card (method: simple, yake, spacy, hybrid; default hybrid); facts "
                        "mode: the method")
    p.add_argument("--codec", default="fp16")
    p.add_argument("--limit", type=int, default=0, help="first N rows (0: all)")
    p.add_argument("--context-field", default="context", help="e.g. context_gold for HotpotQA's gold paragraphs")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, help="write every example and the summary here")
    p.add_argument("--sender-model", default="",
                   help="kv: a different sender model (cross-model handoff; needs --alignment)")
    p.add_argument("--alignment", default="",
                   help="cross-model: stats, ridge (the pair's `calibrate pair` file) or a file")
    p.add_argument("--no-relevance", dest="relevance", action="store_false",
                   help="skip the MiniLM relevance metric (faster; `qkvcomm rescore` fills it in later)")
    runtime_flags(p)
    p.set_defaults(run=run_eval)

    p = sub.add_parser("rescore", help="recompute every metric of saved `eval --json` results, in place")
    p.add_argument("results", nargs="+", type=Path)
    p.set_defaults(run=run_rescore)

    p = sub.add_parser("report", help="a markdown table of `eval --json` results; --out writes RESULTS.md + charts")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="write this markdown file and its PNG charts beside it")
    p.set_defaults(run=run_report)


def run_eval(args: argparse.Namespace) -> int:
    from qkv_core.model.loading import load_model  # noqa: PLC0415
    from qkv_eval.evaluate import run  # noqa: PLC0415
    from qkv_eval.run_config import EvalConfig  # noqa: PLC0415

    cfg = EvalConfig(args.data, args.mode, args.codec, args.limit, args.max_new_tokens, args.context_field, args.hops,
                     args.deltas, args.facts, args.layers, args.layer_method, args.relevance, args.sender_model,
                     args.alignment)
    lm = load_model(runtime(args))
    sender_lm = load_model(runtime(args, args.sender_model)) if args.sender_model else None
    report = run(lm, cfg, sender_lm=sender_lm)
    if args.json:
        args.json.write_text(report.to_json())
    s = report.summary()
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "-"
    print(f"{args.data.name} {cfg.mode}{'/' + cfg.codec if cfg.mode == 'kv' else ''}: {s['rows']} rows  "
          f"EM {s['em']:.1f}  F1 {s['f1']:.1f}  contains {s['contains']:.1f}  ratio vs fp16 {ratio}  "
          f"TTFT {s['ttft_s_mean'] * 1e3:.0f} ms")
    return 0


def run_report(args: argparse.Namespace) -> int:
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


def run_rescore(args: argparse.Namespace) -> int:
    from qkv_eval.evaluate import rescore  # noqa: PLC0415

    for path in args.results:
        result = json.loads(path.read_text())
        if "bench" in result:  # `bench ttft --json` files share results/ with eval results
            print(f"skipped {path}: a benchmark, not an eval result")
            continue
        path.write_text(json.dumps(rescore(result), indent=1) + "\n")
        print(f"rescored {path}")
    return 0
