"""The library functions behind ``supernet place eval|profile|search`` (the CLI only parses and prints)."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from placement.constraints import Constraints, InfeasibleError, parse_allowed
from placement.cost import CostModel, analytic_cost_model, measure_cost_model, parse_cost_model_name
from placement.dp import dp_front
from placement.evaluate import (
    CORE_METRICS,
    EvalSettings,
    Evaluator,
    combine,
    corpus_data_factory,
    parse_quality,
)
from placement.presets import mixer_counts, preset_name, save_presets
from placement.report import plot_front, write_report, write_search_json
from placement.search import SearchResult, SearchSettings, run_search
from placement.store import ResultStore, checkpoint_hash, default_db_path
from placement.surrogate import QualityTables
from supernet.config import MIXER_NAMES, SupernetConfig
from supernet.placement import format_placement, parse_placement
from supernet.presets import CostInfo, PresetEntry, PresetsFile, QualityInfo


def set_threads(threads: int = 0) -> int:
    """``threads`` > 0: use that many; 0: torch's default, except 1 when the machine is oversubscribed
    (1-minute load average above the core count). OpenMP threads that wait on each other at every op
    barrier are what an oversubscribed CPU punishes: measured here with a training job beside it, a 4 x
    128-token forward of the 135M supernet took 14-30 s with 2 threads and 5-8 s with 1."""
    import os

    if threads < 0:
        raise ValueError(f"--threads {threads}: must be >= 0 (0 = automatic)")
    if threads == 0:
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores
        threads = 1 if busy else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def open_checkpoint(model_dir: str | Path, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer, checkpoint key) with the model on ``device`` in ``dtype`` (supernet.device syntax).

    The key names what the scores are scores of: the checkpoint's hash, plus ``@<device type>-<dtype>`` unless
    fp32 on CPU (the reference numerics, and every result stored before the option existed), so results in
    bf16 or on CUDA never mix with fp32 ones in the database."""
    from transformers import AutoTokenizer

    from supernet.checkpoint import load_supernet
    from supernet.device import resolve

    torch_device, torch_dtype = resolve(device, dtype)
    model = load_supernet(model_dir, dtype=torch_dtype, device=torch_device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    key = checkpoint_hash(model_dir)
    if (torch_device.type, torch_dtype) != ("cpu", torch.float32):
        key += f"@{torch_device.type}-{str(torch_dtype).removeprefix('torch.')}"
    return model, tokenizer, key


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def make_cost_model(
    name: str,
    config: SupernetConfig,
    context: int,
    batch: int,
    *,
    model=None,
    store: ResultStore | None = None,
    prefill_context: int | None = None,
) -> CostModel:
    """``analytic:<gpu>`` from the config alone; ``measured`` times this device (cached in the database per
    config, context, batch and thread count, since timing is the slow part and depends on nothing else)."""
    if context < 1 or batch < 1:
        raise ValueError(f"context ({context}) and batch ({batch}) must be >= 1")
    kind, gpu = parse_cost_model_name(name)
    if gpu is not None:  # analytic
        return analytic_cost_model(config, context, batch, gpu, prefill_context=prefill_context)
    if model is None:
        raise ValueError("the measured cost model needs the loaded model")
    device = f"{cpu_name()}, {torch.get_num_threads()} threads, fp32"
    key = json.dumps([config.to_dict(), context, batch, prefill_context, device], sort_keys=True)
    if store is not None:
        cached = store.get_blob("profile", key)
        if cached is not None:
            return CostModel.from_dict(cached)
    cm = measure_cost_model(model, context, batch, prefill_context=prefill_context, device_name=device)
    if store is not None:
        store.put_blob("profile", key, cm.to_dict())
    return cm


def parse_kv_budget(text: str | None) -> float | None:
    """'512MiB', '2GB', '1e6' (bytes) -> bytes."""
    if text is None or not str(text).strip():
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}
    t = str(text).strip().lower()
    suffix = next((u for u in units if t.endswith(u)), "")
    number, scale = (t[: -len(suffix)], units[suffix]) if suffix else (t, 1)
    try:
        value = float(number) * scale
    except ValueError as err:
        raise ValueError(f"--kv-budget {text!r}: expected bytes like 64MiB, 1GB or 5e7") from err
    if value <= 0:
        raise ValueError(f"--kv-budget {text!r} must be positive")
    return value


def check_feasible(cm: CostModel, constraints: Constraints, max_cost: float | None) -> None:
    """Fail before any evaluation when nothing can satisfy the constraints and budget, naming the cheapest."""
    zero = QualityTables(
        0.0,
        np.zeros((cm.num_layers, len(MIXER_NAMES))),
        np.zeros((cm.num_layers, 0, len(MIXER_NAMES), len(MIXER_NAMES))),
    )
    try:
        front = dp_front(zero, cm.mixer, constraints, kv_bytes=cm.kv_bytes)
    except InfeasibleError as err:
        raise InfeasibleError(
            f"{err}; cheapest KV/state per sequence at context {cm.context} is "
            f"{min(cm.kv_bytes.values()) * cm.num_layers / 2**20:.2f} MiB (all linear mixers), "
            f"all-FA needs {cm.kv_bytes['fa'] * cm.num_layers / 2**20:.2f} MiB"
        ) from None
    cheapest = front[0].placement
    rel = cm.cost(cheapest) / cm.cost(("fa",) * cm.num_layers)
    if max_cost is not None and rel > max_cost + 1e-12:
        raise InfeasibleError(
            f"--budget {max_cost:g} (cost relative to all-FA) is infeasible: the cheapest placement "
            f"the constraints allow ({format_placement(cheapest)}) costs {rel:.3f} x all-FA "
            f"under {cm.model} (speed-up {1 / rel:.2f}x)"
        )


@dataclass
class SearchOutputs:
    document: PresetsFile
    result: SearchResult
    presets_path: Path
    report_path: Path | None
    plot_path: Path | None
    evaluator: Evaluator


def evaluate_placement(
    model_dir: str | Path,
    placement: str | Sequence[str],
    metrics: Sequence[str] | None = None,
    *,
    db: str | Path | None = None,
    settings: EvalSettings | None = None,
    sources: Sequence[str] = ("demo",),
    opened=None,
) -> dict[str, float]:
    model, tokenizer, ckpt = opened or open_checkpoint(model_dir)
    spec = parse_placement(placement, model.config.num_hidden_layers)
    settings = settings or EvalSettings()
    with ResultStore(db or default_db_path()) as store:
        ev = Evaluator(
            model,
            ckpt,
            store,
            settings,
            data_factory=corpus_data_factory(model, tokenizer, settings, sources),
        )
        return ev.evaluate(spec, list(metrics or (*CORE_METRICS, *ev.available_metrics()[len(CORE_METRICS) :])))


def search_pipeline(
    model_dir: str | Path,
    *,
    presets_out: str | Path,
    report_dir: str | Path | None,
    db: str | Path | None = None,
    cost_model: str = "analytic:h100-sxm",
    context: int = 8192,
    batch: int = 8,
    quality: str | None = None,
    eval_settings: EvalSettings | None = None,
    search_settings: SearchSettings | None = None,
    allowed: str | None = None,
    min_fa: int = 0,
    kv_budget: str | None = None,
    max_cost: float | None = None,
    sources: Sequence[str] = ("demo",),
    measure_cpu: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
    command: str = "",
    progress: bool = True,
    note: str | None = None,
) -> SearchOutputs:
    """sample -> eval -> fit -> optimise -> presets.yaml + report + plot. Validates every input against the
    config before loading weights, so bad input fails in a second."""
    model_dir = Path(model_dir)
    config = SupernetConfig.load(model_dir)
    L = config.num_hidden_layers
    weights = parse_quality(quality)
    constraints = Constraints(L, parse_allowed(allowed, L), min_fa, parse_kv_budget(kv_budget))
    if max_cost is not None and max_cost <= 0:
        raise ValueError(f"--budget {max_cost}: must be > 0 (cost relative to all-FA, e.g. 0.5)")
    es = eval_settings or EvalSettings()
    ss = search_settings or SearchSettings()
    kind, _ = parse_cost_model_name(cost_model)
    if kind == "analytic":
        check_feasible(make_cost_model(cost_model, config, context, batch), constraints, max_cost)
    if device != "cpu" and (kind == "measured" or measure_cpu):
        raise ValueError(f"--device {device}: the measured cost model and --measure-cpu time this CPU; "
                         "use --cost-model analytic:<gpu> and --no-measure-cpu")
    model, tokenizer, ckpt = open_checkpoint(model_dir, device, dtype)
    store = ResultStore(db or default_db_path())
    try:
        cm = make_cost_model(cost_model, config, context, batch, model=model, store=store, prefill_context=1024)
        check_feasible(cm, constraints, max_cost)
        ev = Evaluator(model, ckpt, store, es, data_factory=corpus_data_factory(model, tokenizer, es, sources))
        metrics = list(weights)
        for metric in metrics:  # build the data sets now: a bad setting fails before the first evaluation
            ev._data_hash(metric)
        bar = _progress_bar(progress)

        def quality_of(p: tuple[str, ...]) -> float:
            return combine(ev.evaluate(p, metrics), weights)

        t0 = time.time()
        result = run_search(
            quality_of,
            cm.mixer,
            cm.shared,
            constraints,
            ss,
            kv_bytes=cm.kv_bytes,
            progress=bar,
            max_cost=max_cost,
        )
        # every preset gets every core metric (KL too), measured
        all_metrics = list(dict.fromkeys([*CORE_METRICS, *metrics]))
        taken: set[str] = set()
        entries: list[PresetEntry] = []
        for pr in sorted(result.presets, key=lambda x: cm.cost(x.placement), reverse=True):
            p = pr.placement
            values = ev.evaluate(p, all_metrics)
            speed = cm.speedup(p)
            entries.append(
                PresetEntry(
                    name=preset_name(p, speed, taken),
                    placement=format_placement(p),
                    predicted_quality=round(float(pr.predicted_quality), 5),
                    measured_quality=round(float(pr.measured_quality), 5),
                    source=pr.source,
                    metrics={k: round(float(v), 5) for k, v in values.items()},
                    needle_acc_by_length=ev.needle_by_length(p),
                    cost=float(f"{cm.cost(p):.6g}"),
                    speedup=round(speed, 3),
                    kv_bytes_per_seq=int(cm.kv_bytes_per_seq(p)),
                    mixers=mixer_counts(p),
                )
            )
        bar("done", 0, 0)
        elapsed = time.time() - t0
        names = [e.name for e in entries]
        default = "all-fa" if "all-fa" in names else max(entries, key=lambda e: e.measured_quality or 0.0).name
        document = PresetsFile(
            default=default,
            cost=CostInfo(context=context, batch=batch, device=cm.device, model=cm.model),
            quality=QualityInfo(weights=weights, eval=es.describe(), checkpoint=ckpt, model_dir=model_dir.name),
            presets=entries,
        )
        presets_path = save_presets(presets_out, document)
        report_path = plot_path = None
        if report_dir is not None:
            report_dir = Path(report_dir)
            placements = {e.name: parse_placement(e.placement, L) for e in entries}
            plot_path = plot_front(
                report_dir / "pareto.png",
                result.evaluated,
                result.baseline,
                [(cm.speedup(f.placement), f.value) for f in result.front],
                entries,
                cm.speedup,
                f"{model_dir.name}: quality vs speed-up ({cm.model}, context {context}, batch {batch})",
            )
            measured = None
            if measure_cpu and kind != "measured":
                cpu = make_cost_model(
                    "measured", config, context, batch, model=model, store=store, prefill_context=1024
                )
                measured = {name: cpu.speedup(p) for name, p in placements.items()}
            settings_text = ([f"note: {note}"] if note else []) + [
                f"checkpoint: `{model_dir.name}` (hash {ckpt})",
                f"cost model: {cm.describe()}; per-layer mixer cost relative to FA: "
                + ", ".join(f"{m} {v:.3f}" for m, v in cm.relative().items()),
                "quality = " + " + ".join(f"{w:g} x {m}" for m, w in weights.items()),
                f"evaluation data: {es.describe()}",
                f"search: {len(result.evaluated)} placements measured by the guided search "
                f"({ss.init_random} random + anchors, then {result.rounds} active rounds of {ss.per_round}), "
                f"interaction distance {ss.distance}, {ss.thompson_samples} Thompson samples per round; "
                f"constraints: min FA {constraints.min_fa}, KV budget "
                f"{'none' if constraints.kv_budget is None else f'{constraints.kv_budget / 2**20:.1f} MiB'}"
                f", allowed {'all' if allowed is None else allowed}",
                f"evaluations computed in this run: {ev.computed} metric values in {ev.seconds:.0f} s "
                f"(wall {elapsed:.0f} s); the rest came from the database",
            ]
            if measured:
                settings_text.append(
                    f"CPU speed-up column: measured decode step on this machine ({cpu.device}), "
                    f"context {context}, batch {batch}"
                )
            report_path = write_report(
                report_dir / "report.md",
                document=document,
                result=result,
                settings_text=settings_text,
                command=command or "supernet place search ...",
                plot_name=plot_path.name,
                measured_speedups=measured,
            )
            write_search_json(report_dir / "search.json", result, es, ss)
        return SearchOutputs(document, result, presets_path, report_path, plot_path, ev)
    finally:
        store.close()


def _progress_bar(enabled: bool):
    """A tqdm bar per stage, fed by run_search's progress callback."""
    if not enabled:
        return lambda stage, done, total: None
    from tqdm import tqdm

    state: dict = {"stage": None, "bar": None}

    def update(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].close()
            state["stage"] = stage
            state["bar"] = None if stage == "done" else tqdm(desc=stage, total=total or None, unit="placement")
        if state["bar"] is not None:
            state["bar"].total = max(total, done)
            state["bar"].n = done
            state["bar"].refresh()

    return update
