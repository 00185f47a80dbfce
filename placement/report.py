"""The search's human-readable outputs: a Pareto plot (PNG) and a Markdown report (settings, the preset table
with every metric, surrogate accuracy, guided vs random search, exact DP vs greedy/beam)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from placement.evaluate import EvalSettings
from placement.search import SearchResult, SearchSettings
from supernet.atomic import atomic_write
from supernet.config import MIXER_NAMES
from supernet.placement import format_placement
from supernet.presets import PresetEntry, PresetsFile


def plot_front(
    path: str | Path,
    guided: dict[tuple[str, ...], float],
    baseline: dict[tuple[str, ...], float],
    front_pred: list[tuple[float, float]],
    presets: list[PresetEntry],
    speedup: Callable[[tuple[str, ...]], float],
    title: str,
) -> Path:
    """Measured quality vs speed-up: the guided search's placements, the random baseline's, the predicted
    front (line) and the presets (labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for points, size, color, label in (
        (baseline, 14, "#bbbbbb", "random search"),
        (guided, 16, "#4a7fb5", "surrogate-guided"),
    ):
        if points:
            ax.scatter(
                [speedup(p) for p in points],
                list(points.values()),
                s=size,
                c=color,
                label=f"{label} ({len(points)} measured)",
            )
    if front_pred:
        xs, ys = zip(*sorted(front_pred), strict=True)
        ax.plot(xs, ys, c="#4a7fb5", lw=1, alpha=0.7, label="predicted Pareto front (DP)")
    for pr in presets:
        if pr.speedup is None or pr.measured_quality is None:
            continue
        ax.scatter([pr.speedup], [pr.measured_quality], s=60, marker="*", c="#d1495b", zorder=5)
        ax.annotate(
            pr.name,
            (pr.speedup, pr.measured_quality),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("decode speed-up vs all-FA (cost model)")
    ax.set_ylabel("quality (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def write_report(
    path: str | Path,
    *,
    document: PresetsFile,
    result: SearchResult,
    settings_text: list[str],
    command: str,
    plot_name: str | None,
    measured_speedups: dict[str, float] | None = None,
) -> Path:
    """Markdown: settings, the preset table (each metric separately), surrogate accuracy, search
    comparisons."""
    lines = ["# Placement search report", ""]
    lines += [f"- {s}" for s in settings_text]
    lines += [
        "",
        "Rerun (results are cached in the database, so only new evaluations cost time):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if plot_name:
        lines += [f"![Pareto front]({plot_name})", ""]
    lines += [
        "## Presets",
        "",
        "| name | speed-up | measured quality | predicted | trace loglik | KL | needle acc | needle loglik "
        "| KV/seq (MiB) | FA/SWA/GDN/KDA | from |" + (" CPU speed-up |" if measured_speedups else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if measured_speedups else ""),
    ]
    for p in document.presets:
        m = p.metrics
        per_mixer = {str(k): v for k, v in (p.mixers or {}).items()}
        counts = "/".join(str(per_mixer.get(k, 0)) for k in MIXER_NAMES)
        row = (
            f"| {p.name} | {p.speedup or 1.0:.2f}x | {_fmt(p.measured_quality)} | "
            f"{_fmt(p.predicted_quality)} | {_fmt(m.get('trace_loglik'))} | {_fmt(m.get('kl'))} | "
            f"{_fmt(m.get('needle_acc'))} | {_fmt(m.get('needle_loglik'))} | "
            f"{(p.kv_bytes_per_seq or 0) / 2**20:.1f} | {counts} | {p.source or 'dp'} |"
        )
        if measured_speedups:
            row += f" {measured_speedups.get(p.name, float('nan')):.2f}x |"
        lines.append(row)
    lines += [
        "",
        "`from`: `dp` = the exact DP's pick on the surrogate for that speed band, measured; `measured` = a "
        "placement measured during the search that beat the pick within the same band.",
    ]
    lengths = sorted({k for p in document.presets for k in p.needle_acc_by_length})
    if lengths:
        lines += [
            "",
            "Needle digit accuracy by haystack length (tokens):",
            "",
            "| name | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for p in document.presets:
            acc = p.needle_acc_by_length
            lines.append(f"| {p.name} | " + " | ".join(_fmt(acc.get(n)) for n in lengths) + " |")
    lines += ["", "Placements (`supernet.placement` syntax):", ""]
    lines += [f"- `{p.name}`: `{p.placement}`" for p in document.presets]
    lines += [
        "",
        "## Surrogate accuracy",
        "",
        "| model | data | Spearman | Kendall | RMSE | n |",
        "|---|---|---|---|---|---|",
    ]
    for label, block in (
        ("5-fold CV on the search's placements", result.cv),
        ("held out: random-baseline placements the search never chose", result.held_out),
    ):
        for kind, sc in block.items():
            name = "BayesianRidge + pairwise (d)" if kind == "bayes" else "RandomForest on one-hots"
            if "error" in sc:
                lines.append(f"| {name} | {label} | - | - | - | ({sc['error']}) |")
            else:
                lines.append(
                    f"| {name} | {label} | {_fmt(sc['spearman'])} | {_fmt(sc['kendall'])} | "
                    f"{_fmt(sc['rmse'])} | {sc['n']} |"
                )
    comp = result.comparison
    if comp.get("targets"):
        lines += [
            "",
            "## Surrogate-guided search vs random search (equal evaluation budget)",
            "",
            f"Both measured {comp['evaluations']} placements. Best measured quality among placements at "
            "least this fast:",
            "",
            "| speed-up >= | guided | random |",
            "|---|---|---|",
        ]
        for t, g, r in zip(comp["targets"], comp["guided"], comp["random"], strict=True):
            lines.append(f"| {t:.2f}x | {_fmt(g)} | {_fmt(r)} |")
        lines.append(f"| mean (missing = worst measured) | {_fmt(comp['guided_mean'])} | {_fmt(comp['random_mean'])} |")
    if comp.get("beam"):
        lines += [
            "",
            "## Exact DP vs greedy / beam search on the same surrogate",
            "",
            "Predicted quality of the best placement within each preset's budget:",
            "",
            "| budget (speed-up) | DP (exact) | greedy (beam 1) | beam |",
            "|---|---|---|---|",
        ]
        rows = comp["beam"]
        for i in range(0, len(rows), 2):
            g, b = rows[i], rows[i + 1]
            lines.append(
                f"| {g['budget_speedup']:.2f}x | {_fmt(g['dp'])} | {_fmt(g['beam'])} | "
                f"{_fmt(b['beam'])} (width {b['width']}) |"
            )
    lines.append("")
    path = Path(path)
    atomic_write(path, "\n".join(lines).encode())
    return path


def write_search_json(path: Path, result: SearchResult, es: EvalSettings, ss: SearchSettings) -> Path:
    """Everything the search measured and computed, for re-plotting or comparing runs without a rerun."""
    data = {
        "evaluated": {format_placement(p): q for p, q in result.evaluated.items()},
        "random_baseline": {format_placement(p): q for p, q in result.baseline.items()},
        "cv": result.cv,
        "held_out": result.held_out,
        "comparison": result.comparison,
        "settings": {"eval": asdict(es), "search": asdict(ss)},
    }
    atomic_write(path, (json.dumps(data, indent=1, default=str) + "\n").encode())
    return path
