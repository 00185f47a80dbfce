"""Search outputs: ``presets.yaml`` (what the server loads), a Pareto plot (PNG) and a Markdown report.

Preset names say what a user picks them for, speed: ``all-fa`` is the teacher-exact placement (speed-up 1.0),
every other preset is ``fast-<speed-up>x`` with the speed-up under the file's cost model rounded to one
decimal below 10 (``fast-1.6x``, ``fast-3x``) and to an integer above (``fast-12x``). A clash gets ``-b``,
``-c``... The server reads ``default`` and each preset's ``name`` and ``placement``; everything else documents
where the preset came from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from supernet.config import MIXER_NAMES


def preset_name(placement: Sequence[str], speedup: float, taken: set[str]) -> str:
    if all(m == "fa" for m in placement):
        base = "all-fa"
    else:
        x = round(speedup, 1) if speedup < 10 else round(speedup)
        base = f"fast-{x:g}x"
    name, suffix = base, ord("b")
    while name in taken:
        name, suffix = f"{base}-{chr(suffix)}", suffix + 1
    taken.add(name)
    return name


def mixer_counts(placement: Sequence[str]) -> dict[str, int]:
    return {m: sum(x == m for x in placement) for m in MIXER_NAMES}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_presets(path: str | Path, document: dict) -> Path:
    """Write the presets document atomically (see module docstring for the layout)."""
    path = Path(path)
    text = (
        "# Written by `supernet place search`; see README.md (Placements and presets). The server reads `default` and\n"
        "# each preset's `name` and `placement` (supernet.placement syntax); the rest records where it\n"
        "# came from.\n"
    )
    text += yaml.safe_dump(document, sort_keys=False, width=120)
    _atomic_write(path, text.encode())
    return path


def load_presets(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "presets" not in data or "default" not in data:
        raise ValueError(f"{path}: expected a mapping with 'default' and 'presets'")
    names = [p["name"] for p in data["presets"]]
    if data["default"] not in names:
        raise ValueError(f"{path}: default {data['default']!r} is not one of the presets {names}")
    return data


def plot_front(
    path: str | Path,
    guided: dict,
    baseline: dict,
    front_pred: list[tuple[float, float]],
    presets: list[dict],
    speedup,
    title: str,
) -> Path:
    """Measured quality vs speed-up: the guided search's placements, the random baseline's, the predicted
    front (line) and the presets (labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    if baseline:
        ax.scatter(
            [speedup(p) for p in baseline],
            list(baseline.values()),
            s=14,
            c="#bbbbbb",
            label=f"random search ({len(baseline)} measured)",
        )
    ax.scatter(
        [speedup(p) for p in guided],
        list(guided.values()),
        s=16,
        c="#4a7fb5",
        label=f"surrogate-guided ({len(guided)} measured)",
    )
    if front_pred:
        xs, ys = zip(*sorted(front_pred), strict=True)
        ax.plot(xs, ys, c="#4a7fb5", lw=1, alpha=0.7, label="predicted Pareto front (DP)")
    for pr in presets:
        ax.scatter([pr["speedup"]], [pr["measured_quality"]], s=60, marker="*", c="#d1495b", zorder=5)
        ax.annotate(
            pr["name"],
            (pr["speedup"], pr["measured_quality"]),
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


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def write_report(
    path: str | Path,
    *,
    document: dict,
    result,
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
    for p in document["presets"]:
        m = p["metrics"]
        counts = "/".join(str(p["mixers"][k]) for k in MIXER_NAMES)
        row = (
            f"| {p['name']} | {p['speedup']:.2f}x | {_fmt(p['measured_quality'])} | "
            f"{_fmt(p['predicted_quality'])} | {_fmt(m.get('trace_loglik'))} | {_fmt(m.get('kl'))} | "
            f"{_fmt(m.get('needle_acc'))} | {_fmt(m.get('needle_loglik'))} | "
            f"{p['kv_bytes_per_seq'] / 2**20:.1f} | {counts} | {p.get('source', 'dp')} |"
        )
        if measured_speedups:
            row += f" {measured_speedups.get(p['name'], float('nan')):.2f}x |"
        lines.append(row)
    lines += [
        "",
        "`from`: `dp` = the exact DP's pick on the surrogate for that speed band, measured; `measured` = a "
        "placement measured during the search that beat the pick within the same band.",
    ]
    lengths = sorted({int(k) for p in document["presets"] for k in p.get("needle_acc_by_length", {})})
    if lengths:
        lines += [
            "",
            "Needle digit accuracy by haystack length (tokens):",
            "",
            "| name | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for p in document["presets"]:
            acc = {int(k): v for k, v in p.get("needle_acc_by_length", {}).items()}
            lines.append(f"| {p['name']} | " + " | ".join(_fmt(acc.get(n)) for n in lengths) + " |")
    lines += ["", "Placements (`supernet.placement` syntax):", ""]
    lines += [f"- `{p['name']}`: `{p['placement']}`" for p in document["presets"]]
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
    _atomic_write(path, "\n".join(lines).encode())
    return path
