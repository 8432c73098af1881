"""`qkvcomm report`: eval JSON results -> a markdown table, RESULTS.md and PNG charts."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from qkv_core.codec.allocation import frontier
from qkv_core.facts.text import normalize
from qkv_eval.run_config import EvalConfig

COLUMNS = [
    "model", "device", "data", "context", "mode", "codec", "rows", "EM", "F1", "contains", "= skyline", "complete",
    "coherent", "relevance", "bits/elem", "wire KB/row", "ratio vs fp16", "TTFT ms",
]


def load(paths: list[Path]) -> list[dict]:
    return [json.loads(p.read_text()) for p in paths]


def bits_per_element(summary: dict) -> float | None:
    """Bits per KV element on the wire, everything in the card counted: 16 / ratio vs fp16."""
    ratio = summary.get("compression_ratio")
    return 16 / ratio if ratio else None


def config_of(r: dict) -> EvalConfig:
    """A result's run configuration, typed."""
    return EvalConfig.from_json(r["config"])


def _key(r: dict) -> tuple[str, str, str]:
    return r["model"], config_of(r).data.name, config_of(r).context_field


def model_of(r: dict) -> str:
    """The receiver's model, after the sender's when they differ (a cross-model run)."""
    c = config_of(r)
    return f"{c.sender_model} → {r['model']} ({c.alignment})" if c.sender_model else r["model"]


def _same_model_card(r: dict) -> bool:
    """A same-model card without facts, over any number of hops and any share of layers."""
    c = config_of(r)
    return c.mode == "kv" and not c.facts and not c.sender_model


def _one_card(r: dict) -> bool:
    """A single-hop _same_model_card."""
    return _same_model_card(r) and config_of(r).hops == 1


def _plain_kv(r: dict) -> bool:
    """A card of every layer as _one_card: what the codec alone does."""
    return _one_card(r) and config_of(r).layers >= 1


def agreement(result: dict, skyline: dict | None) -> float | None:
    """% of rows whose normalized prediction equals the skyline's on the same row."""
    if skyline is None:
        return None
    sky = {e["id"]: normalize(e["prediction"]) for e in skyline["examples"]}
    same = [normalize(e["prediction"]) == sky[e["id"]] for e in result["examples"] if e["id"] in sky]
    return 100 * sum(same) / len(same) if same else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(r: dict, skyline: dict | None) -> list[str]:
    c, s = config_of(r), r["summary"]
    kv = c.mode == "kv"
    codec = (c.codec + (f" x{c.hops} hops" if c.hops > 1 else "") + (" (deltas)" if c.deltas else "")) if kv else "-"
    if c.layers < 1:
        codec += f" layers {c.layer_method}@{c.layers:g}"
    if c.facts:
        codec = f"{codec} + facts ({c.facts})" if kv else f"facts ({c.facts})"
    return [
        model_of(r), r["config"].get("device", "cpu"), c.data.name, c.context_field, c.mode, codec, str(s["rows"]),
        f"{s['em']:.1f}", f"{s['f1']:.1f}", f"{s['contains']:.1f}", _fmt(agreement(r, skyline), ".0f"),
        _fmt(s.get("completeness"), ".1f"), _fmt(s.get("coherence"), ".1f"), _fmt(s.get("relevance"), ".3f"),
        _fmt(bits_per_element(s), ".2f"), f"{s['wire_bytes_mean'] / 1e3:.1f}",
        _fmt(s["compression_ratio"], ".2f"), f"{s['ttft_s_mean'] * 1e3:.0f}",
    ]


def table(results: list[dict]) -> str:
    skylines = {_key(r): r for r in results if config_of(r).mode == "skyline"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r, skylines.get(_key(r)))) + " |" for r in results]
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (only `report` needs matplotlib)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (bits, F1, codec) points that no other beats with more F1 at no more bits, fewest bits first."""
    return frontier(points, cost=lambda p: p[0], error=lambda p: -p[1])


def provenance(results: list[dict]) -> str:
    """When and where a set of runs ran: its date, or the span of its dates, and its machines."""
    dates = sorted({r["config"]["date"] for r in results})
    when = dates[0] if len(dates) == 1 else f"runs of {dates[0]} to {dates[-1]}"
    return f"{when}; {', '.join(sorted({r['config']['machine'] for r in results}))}"


def f1_vs_bits_chart(results: list[dict], out: Path, min_codecs: int = 4) -> bool:
    """One panel per (dataset, context, rows) with at least `min_codecs` kv codecs (fewer draw no
    frontier): F1 of every codec against its bits per element on the wire, with the skyline and
    baseline of the same rows as horizontal lines. The Pareto frontier (no codec answers better
    at fewer bits) is drawn and named; the other codecs are grey dots, too many to name legibly.
    False when no set of runs qualifies."""
    by_data: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in results:
        c = config_of(r)
        if r["model"] == results[0]["model"] and (_plain_kv(r) or c.mode in ("baseline", "skyline")):
            by_data[(c.data.stem, c.context_field, r["summary"]["rows"])].append(r)
    panels = sorted(((k, runs) for k, runs in by_data.items()
                     if sum(config_of(r).mode == "kv" for r in runs) >= min_codecs),
                    key=lambda p: (-p[0][2], p[0][:2]))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, ((data, context, rows), runs) in zip(axes[0], panels):
        points = [(bits_per_element(r["summary"]), r["summary"]["f1"],
                   config_of(r).codec) for r in runs if config_of(r).mode == "kv"]
        best = pareto(points)
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="lightgrey")
        ax.plot([p[0] for p in best], [p[1] for p in best], "o-", color="tab:blue", label="Pareto frontier")
        for bits, f1, codec in best:
            ax.annotate(codec, (bits, f1), textcoords="offset points", xytext=(4, -10), fontsize=8)
        for r in runs:
            if (mode := config_of(r).mode) != "kv":
                ax.axhline(r["summary"]["f1"], linestyle="--", color="tab:green" if mode == "skyline" else "tab:red",
                           label=mode)
        ax.set(xscale="log", xlabel="bits per KV element on the wire (log)", ylabel="F1",
               title=f"{data} ({context}), {rows} rows")
        ax.set_xticks([2, 3, 4, 6, 8, 16], labels=["2", "3", "4", "6", "8", "16"])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results[0]['model']}: answer F1 vs card size "
                 f"({provenance([r for _, runs in panels for r in runs])})")
    _save(plt, fig, out)
    return True


def f1_vs_layers_chart(results: list[dict], out: Path) -> bool:
    """F1 against the share of layers sent: one panel per (dataset, rows, codec), one line per
    selection method in the same colour on every panel; runs with every layer count as ratio 1 of
    each method. False when no run selected layers."""
    methods, lines = layer_lines(results)
    if not methods:
        return False
    plt = _pyplot()
    groups = sorted({k[:3] for k in lines})
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False, sharey=True)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (data, rows, codec) in zip(axes.flat, groups):
        for m in methods:
            if points := lines.get((data, rows, codec, m)):
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], marker="o", color=colors[m], label=m)
        ax.set(xlabel="share of layers sent", ylabel="F1", title=f"{data}[{rows}] {codec}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{results[0]['model']}: F1 vs share of layers sent, by selection method")
    _save(plt, fig, out)
    return True


def ttft_chart(benches: list[dict], out: Path) -> bool:
    """`bench ttft --json` runs: receiver TTFT with the card and with a re-prefill of the text
    against context length, one pair of lines per run (device), log-log. False without runs."""
    if not benches:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in benches:
        tokens = [r["tokens"] for r in b["rows"]]
        label = f"{b['model']} on {b['device']}"
        line, = ax.plot(tokens, [r["ttft_card_s"] * 1e3 for r in b["rows"]], marker="o",
                        label=f"{label}: card ({b['codec']})")
        ax.plot(tokens, [r["ttft_text_s"] * 1e3 for r in b["rows"]], marker="s", linestyle="--", color=line.get_color(),
                label=f"{label}: re-prefill")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="receiver time to first token (ms)",
           title="TTFT: injected card vs re-prefill of the text")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _save(plt, fig, out)
    return True


def layer_lines(results: list[dict]) -> tuple[list[str], dict[tuple[str, int, str, str], dict[float, float]]]:
    """The selection methods that ran below ratio 1, and F1 by layer ratio per (dataset, rows,
    codec, method) over same-model single-hop cards without facts; a full-layer run is ratio 1 of
    every method, and a line needs two ratios."""
    kv = [r for r in results if _one_card(r) and r["model"] == results[0]["model"]]
    methods = sorted({config_of(r).layer_method for r in kv if config_of(r).layers < 1})
    lines: dict[tuple[str, int, str, str], dict[float, float]] = defaultdict(dict)
    for r in kv:
        c = config_of(r)
        for method in methods if c.layers >= 1 else [c.layer_method]:
            lines[(c.data.stem, r["summary"]["rows"], c.codec, method)][c.layers] = r["summary"]["f1"]
    return methods, {k: v for k, v in lines.items() if len(v) > 1}


def layers_table(results: list[dict]) -> str:
    """Layer selection as a grid: one row per method, one column per (dataset, codec, ratio)."""
    methods, lines = layer_lines(results)
    if not lines:
        return ""
    groups = sorted({k[:3] for k in lines})
    ratios = sorted({x for v in lines.values() for x in v})
    cols = [(g, x) for g in groups for x in ratios if any(x in lines.get((*g, m), {}) for m in methods)]
    head = "| method | " + " | ".join(f"{d}[{n}] {c} @{x:g}" for (d, n, c), x in cols) + " |"
    out = [head, "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(_fmt(lines.get((*g, m), {}).get(x), ".1f") for g, x in cols) + " |")
    return "\n".join(out)


def hops_table(results: list[dict]) -> str:
    """The multi-hop relay: F1 by number of hops, one row per (dataset, rows, codec, relay): each hop
    re-encoding the whole cache, or sending only its own turn (deltas). One hop is both."""
    chains: dict[tuple[str, str, int, str, str], dict[int, float]] = defaultdict(dict)
    for r in results:
        c = config_of(r)
        if _same_model_card(r) and c.layers >= 1:
            relays = ("re-encode", "deltas") if c.hops == 1 else ("deltas" if c.deltas else "re-encode",)
            for relay in relays:
                chains[(r["model"], c.data.stem, r["summary"]["rows"], c.codec, relay)][c.hops] = r["summary"]["f1"]
    chains = {k: v for k, v in chains.items() if len(v) > 1}
    if not chains:
        return ""
    hops = sorted({h for v in chains.values() for h in v})
    out = ["| model | data | codec | relay | " + " | ".join(f"{h} hop{'s' * (h > 1)}" for h in hops) + " |",
           "|" + "---|" * (len(hops) + 4)]
    for (model, data, rows, codec, relay), f1 in sorted(chains.items()):
        cells = " | ".join(_fmt(f1.get(h), ".1f") for h in hops)
        out.append(f"| {model} | {data}[{rows}] | {codec} | {relay} | {cells} |")
    return "\n".join(out)


def datasets_table(results: list[dict], codecs: tuple[str, ...] = ("fp16", "kivi-4")) -> str:
    """F1 of baseline, skyline and cards of `codecs`, one row per (model, dataset, context, rows)."""
    cols = ["baseline", "skyline", *codecs]
    grid: dict[tuple[str, str, str, int], dict[str, float]] = defaultdict(dict)
    for r in results:
        c = config_of(r)
        col = c.mode if c.mode in ("baseline", "skyline") and not c.facts else c.codec if _plain_kv(r) else None
        if col in cols:
            grid[(r["model"], c.data.stem, c.context_field, r["summary"]["rows"])][col] = r["summary"]["f1"]
    grid = {k: v for k, v in grid.items() if len(v) == len(cols)}
    if not grid:
        return ""
    out = ["| model | data | context | rows | " + " | ".join(f"F1 {c}" for c in cols) + " |",
           "|" + "---|" * (len(cols) + 4)]
    for (model, data, context, rows), f1 in sorted(grid.items()):
        out.append(f"| {model} | {data} | {context} | {rows} | " + " | ".join(f"{f1[c]:.1f}" for c in cols) + " |")
    return "\n".join(out)


def results_md(results: list[dict], command: str, charts: list[Path]) -> str:
    machines = sorted({f"{c.get('device', 'cpu')} ({c['dtype']}) on {c['machine']}, {c['date']}"
                       for c in (r["config"] for r in results)})
    parts = [
        "# Results",
        "",
        "Runs: " + "; ".join(machines) + ".",
        f"Produced by `{command}` from the JSON files in `results/` (one per `qkvcomm eval` run;",
        "`benchmarks/grid.sh benchmarks/grids/*.txt` runs them). Bits/elem and the ratio count every byte of the card.",
        "Columns: EM, F1 (token, max over gold answers) and contains-answer as in SQuAD's evaluation;",
        "`= skyline`: % of rows answered exactly like the skyline (normalized); `complete`: gold-token",
        "recall; `coherent`: distinct/all word trigrams; `relevance`: MiniLM cosine of answer and",
        "context (definitions in `qkv_eval/qa_metrics.py`, `qkv_eval/evaluate.py`).",
        "",
        table(sorted(results, key=lambda r: (model_of(r), _key(r)[1:], config_of(r).mode, config_of(r).codec))),
    ]
    if layers := layers_table(results):
        parts += ["", "## Layer selection: F1 by method and share of layers sent", "", layers]
    if datasets := datasets_table(results):
        parts += ["", "## Every dataset: baseline, skyline and the card (F1)", "", datasets]
    if hops := hops_table(results):
        parts += ["", "## Multi-hop relay: F1 by number of hops (re-encode: each hop re-quantizes the whole cache; "
                  "deltas: each hop sends only its own turn)", "", hops]
    parts += [f"\n![{p.stem}]({p.name})" for p in charts]
    return "\n".join(parts) + "\n"
