"""`qkvcomm report`: eval JSON results -> a markdown table, RESULTS.md and PNG charts."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

COLUMNS = ["data", "context", "mode", "codec", "rows", "EM", "F1", "contains", "bits/elem", "wire KB/row", "ratio vs fp16", "TTFT ms"]


def load(paths: list[Path]) -> list[dict]:
    return [json.loads(p.read_text()) for p in paths]


def bits_per_element(summary: dict) -> float | None:
    """Bits per KV element on the wire, everything in the card counted: 16 / ratio vs fp16."""
    ratio = summary.get("compression_ratio")
    return 16 / ratio if ratio else None


def _row(r: dict) -> list[str]:
    c, s = r["config"], r["summary"]
    kv = c["mode"] == "kv"
    bits = bits_per_element(s)
    return [
        Path(c["data"]).name, c["context_field"], c["mode"], c["codec"] if kv else "-", str(s["rows"]),
        f"{s['em']:.1f}", f"{s['f1']:.1f}", f"{s['contains']:.1f}", f"{bits:.2f}" if bits else "-",
        f"{s['wire_bytes_mean'] / 1e3:.0f}", f"{s['compression_ratio']:.2f}" if kv else "-", f"{s['ttft_s_mean'] * 1e3:.0f}",
    ]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines)


def f1_vs_bits_chart(results: list[dict], out: Path) -> None:
    """One panel per dataset: F1 of every kv codec against its bits per element on the wire,
    with the skyline and baseline as horizontal lines."""
    import matplotlib  # noqa: PLC0415 - only `report` needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by_data: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_data[f"{Path(r['config']['data']).stem} ({r['config']['context_field']})"].append(r)
    fig, axes = plt.subplots(1, len(by_data), figsize=(6 * len(by_data), 4.5), squeeze=False)
    for ax, (name, runs) in zip(axes[0], sorted(by_data.items())):
        for r in runs:
            s, c = r["summary"], r["config"]
            if c["mode"] == "kv":
                ax.scatter(bits_per_element(s), s["f1"], color="tab:blue")
                ax.annotate(c["codec"], (bits_per_element(s), s["f1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            else:
                ax.axhline(s["f1"], linestyle="--", color="tab:green" if c["mode"] == "skyline" else "tab:red", label=c["mode"])
        ax.set(xscale="log", xlabel="bits per KV element on the wire (log)", ylabel="F1", title=name)
        ax.set_xticks([2, 3, 4, 6, 8, 16], labels=["2", "3", "4", "6", "8", "16"])
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results[0]['model']}: answer F1 vs card size ({results[0]['config']['date']}, {results[0]['config']['machine']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def results_md(results: list[dict], command: str, chart: Path | None) -> str:
    c = results[0]["config"]
    parts = [
        "# Results",
        "",
        f"Model `{results[0]['model']}` on {c['device']} ({c['dtype']}), {c['machine']}, {c['date']}.",
        f"Produced by `{command}` from the JSON files in `results/` (one per `qkvcomm eval` run;",
        "`benchmarks/qa_sweep.sh` runs them). Bits/elem and the ratio count every byte of the card.",
        "",
        table(results),
    ]
    if chart:
        parts += ["", f"![F1 vs bits per element]({chart.name})"]
    return "\n".join(parts) + "\n"
