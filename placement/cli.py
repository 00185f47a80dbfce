"""``supernet place eval|profile|search``: thin wrappers over placement.pipeline (tests call those
directly)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from supernet.device import DeviceOpt, DtypeOpt

place = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Placement optimiser: measure quality and cost, fit a surrogate, search the Pareto front.",
)

ModelOpt = Annotated[Path, typer.Option("--model", help="supernet checkpoint directory")]
DbOpt = Annotated[Path | None, typer.Option(help="results database (default $SUPERNET_CACHE/placement/results.sqlite)")]
ContextOpt = Annotated[int, typer.Option(help="context length the cost (and KV budget) is stated at")]
BatchOpt = Annotated[int, typer.Option(help="decode batch size the cost is stated at")]
TraceSeqOpt = Annotated[int, typer.Option(help="teacher traces scored")]
TraceLenOpt = Annotated[int, typer.Option(help="tokens per trace / KL sequence")]
NeedleOpt = Annotated[str, typer.Option(help="passkey haystack lengths (tokens)")]
SourcesOpt = Annotated[str, typer.Option(help="text sources whose held-out split is scored (see training data)")]
ThreadsOpt = Annotated[int, typer.Option(help="torch threads (0: default, 1 when oversubscribed)")]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _set_threads(threads: int) -> None:
    """Torch threads for this command (placement.pipeline.set_threads); a bad value is a CLI error."""
    from placement.pipeline import set_threads

    try:
        set_threads(threads)
    except ValueError as err:
        fail(str(err))


def _eval_settings(
    trace_sequences: int,
    trace_length: int,
    kl_sequences: int,
    needle_lengths: str,
    seed: int,
    mc: list[Path] | None,
):
    from placement.evaluate import EvalSettings

    try:
        lengths = tuple(int(x) for x in needle_lengths.split(",") if x.strip())
    except ValueError:
        fail(f"--needle-lengths {needle_lengths!r}: expected comma-separated integers like 512,1024,2048")
    if not lengths or min(lengths) < 64:
        fail(f"--needle-lengths {needle_lengths!r}: every length must be >= 64 tokens")
    if trace_sequences < 1 or kl_sequences < 1 or trace_length < 16:
        fail("--trace-sequences and --kl-sequences must be >= 1 and --trace-length >= 16")
    return EvalSettings(
        trace_sequences=trace_sequences,
        trace_length=trace_length,
        trace_prompt=trace_length // 4,
        kl_sequences=kl_sequences,
        kl_length=trace_length,
        needle_lengths=lengths,
        seed=seed,
        mc_files=tuple(str(p) for p in mc or ()),
    )


@place.command("eval")
def eval_cmd(
    model: ModelOpt,
    placement: Annotated[list[str], typer.Option(help="placement(s) to score: all-fa, fa-every-4:gdn, a list...")],
    metrics: Annotated[
        str, typer.Option(help="comma list: trace_loglik,kl,needle_acc,needle_loglik,mc:<stem>")
    ] = "trace_loglik,kl,needle_acc,needle_loglik",
    mc: Annotated[list[Path] | None, typer.Option(help="multiple-choice JSONL file(s) (metric mc:<file stem>)")] = None,
    db: DbOpt = None,
    trace_sequences: TraceSeqOpt = 4,
    trace_length: TraceLenOpt = 128,
    kl_sequences: Annotated[int, typer.Option(help="held-out sequences for KL")] = 4,
    needle_lengths: NeedleOpt = "512,1024",
    sources: SourcesOpt = "demo",
    threads: ThreadsOpt = 0,
    seed: int = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
) -> None:
    """Score placements (results cached in the database; printed as JSON lines)."""
    from placement.pipeline import evaluate_placement, open_checkpoint
    from supernet.checkpoint import CheckpointError
    from supernet.config import SupernetConfig
    from supernet.placement import PlacementError, format_placement, parse_placement

    settings = _eval_settings(trace_sequences, trace_length, kl_sequences, needle_lengths, seed, mc)
    _set_threads(threads)
    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    wanted += [f"mc:{p.stem}" for p in mc or () if f"mc:{p.stem}" not in wanted]
    from placement.evaluate import CORE_METRICS

    for m in wanted:
        if m not in CORE_METRICS and not (m.startswith("mc:") and any(p.stem == m[3:] for p in mc or ())):
            fail(f"unknown metric {m!r}; valid: {', '.join(CORE_METRICS)}, mc:<stem of a --mc file>")
    for p in mc or ():
        if not p.is_file():
            fail(f"--mc {p}: file not found")
    try:
        layers = SupernetConfig.load(model).num_hidden_layers
        from supernet.presets import resolve_placement

        specs = [parse_placement(resolve_placement(p, model), layers) for p in placement]
        opened = open_checkpoint(model, device, dtype)
    except (PlacementError, CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    for spec in specs:
        try:
            values = evaluate_placement(
                model, spec, wanted, db=db, settings=settings, opened=opened, sources=sources.split(",")
            )
        except ValueError as err:
            fail(str(err))
        typer.echo(json.dumps({"placement": format_placement(spec), **{k: round(v, 6) for k, v in values.items()}}))


@place.command("profile")
def profile_cmd(
    model: ModelOpt,
    context: ContextOpt = 8192,
    batch: BatchOpt = 8,
    cost_model: Annotated[str, typer.Option(help="'measured' (this device), 'analytic:<gpu>' or 'all'")] = "all",
    placement: Annotated[list[str] | None, typer.Option(help="placement(s) to cost")] = None,
    prefill_context: Annotated[int, typer.Option(help="prefill length timed by the measured model")] = 1024,
    db: DbOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the cost model(s) as JSON here")] = None,
    threads: ThreadsOpt = 0,
) -> None:
    """Per-mixer decode/prefill cost (measured here and/or analytic for a GPU), speed-ups and KV memory."""
    from placement.cost import GPUS, parse_cost_model_name
    from placement.pipeline import make_cost_model
    from placement.store import ResultStore, default_db_path
    from supernet.checkpoint import CheckpointError, load_supernet
    from supernet.config import SupernetConfig
    from supernet.placement import PlacementError, format_placement, parse_placement

    try:
        config = SupernetConfig.load(model)
        names = ["measured", "analytic:h100-sxm"] if cost_model == "all" else [cost_model]
        for n in names:
            parse_cost_model_name(n)
        specs = [parse_placement(p, config.num_hidden_layers) for p in placement or ()]
        if context < 1 or batch < 1 or prefill_context < 1:
            raise ValueError(f"--context {context}, --batch {batch}, --prefill-context {prefill_context} must be >= 1")
    except (PlacementError, FileNotFoundError, ValueError) as err:
        fail(f"{err} (GPUs: {', '.join(GPUS)})" if "GPU" in str(err) else str(err))
    _set_threads(threads)
    net = None
    if "measured" in names:
        try:
            net = load_supernet(model)
        except (CheckpointError, FileNotFoundError, ValueError) as err:
            fail(str(err))
    dumped = {}
    with ResultStore(db or default_db_path()) as store:
        for n in names:
            cm = make_cost_model(n, config, context, batch, model=net, store=store, prefill_context=prefill_context)
            dumped[n] = cm.to_dict()
            typer.echo(f"\n{cm.describe()}  [{cm.device}]")
            header = f"  {'mixer':5} {'decode/layer':>14} {'rel. FA':>8} {'prefill/layer':>14}"
            typer.echo(f"{header} {'KV/state per seq':>17}")
            for m, v in cm.mixer.items():
                pre = f"{cm.prefill[m] * 1e3:11.3f} ms" if cm.prefill else "-"
                typer.echo(
                    f"  {m:5} {v * 1e6:11.1f} us {v / cm.mixer['fa']:8.3f} {pre:>14} {cm.kv_bytes[m] / 2**10:13.1f} KiB"
                )
            typer.echo(f"  shared (MLPs, norms, head): {cm.shared * 1e3:.3f} ms per step")
            for m in ("fa", "swa", "gdn", "kda"):
                p = (m,) * config.num_hidden_layers
                kv = cm.kv_bytes_per_seq(p) / 2**20
                typer.echo(f"  all-{m:4} speed-up {cm.speedup(p):6.2f}x   KV/seq {kv:8.2f} MiB")
            for p in specs:
                typer.echo(
                    f"  {format_placement(p)}: speed-up {cm.speedup(p):.2f}x, "
                    f"KV/seq {cm.kv_bytes_per_seq(p) / 2**20:.2f} MiB"
                )
    if out is not None:
        out.write_text(json.dumps(dumped, indent=1) + "\n")


@place.command("search")
def search_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="presets.yaml to write (e.g. supernet/demo/presets.yaml)")],
    report_dir: Annotated[Path | None, typer.Option(help="where report.md, pareto.png, search.json go")] = None,
    evals: Annotated[int, typer.Option(help="placements the guided search measures (random baseline: same)")] = 24,
    init_random: Annotated[int, typer.Option(help="random placements before the first surrogate fit")] = 8,
    per_round: Annotated[int, typer.Option(help="placements chosen per active round")] = 4,
    presets: Annotated[int, typer.Option(help="presets to write (all-FA included)")] = 6,
    distance: Annotated[int, typer.Option(help="surrogate interaction distance (= DP state length)")] = 3,
    cost_model: Annotated[
        str, typer.Option(help="'analytic:<gpu>' (h100-sxm, h200, a100-sxm, ...) or 'measured'")
    ] = "analytic:h100-sxm",
    context: ContextOpt = 8192,
    batch: BatchOpt = 8,
    quality: Annotated[
        str, typer.Option(help="metric weights, e.g. trace_loglik=1,needle_acc=1")
    ] = "trace_loglik=1,needle_acc=1",
    min_fa: Annotated[int, typer.Option(help="minimum number of FA layers")] = 0,
    allowed: Annotated[
        str | None, typer.Option(help="allowed mixers per layer, e.g. 'fa,any*28,fa' or 'all-fa|swa|gdn'")
    ] = None,
    kv_budget: Annotated[
        str | None, typer.Option(help="max KV/state bytes per sequence at --context, e.g. 64MiB")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="max cost relative to all-FA for the presets (0.5 = >= 2x)")
    ] = None,
    baseline: Annotated[bool, typer.Option(help="also run random search at the same evaluation budget")] = True,
    measure_cpu: Annotated[bool, typer.Option(help="add measured CPU speed-ups to the report")] = True,
    db: DbOpt = None,
    trace_sequences: TraceSeqOpt = 4,
    trace_length: TraceLenOpt = 128,
    kl_sequences: Annotated[int, typer.Option(help="held-out sequences for KL (presets only)")] = 4,
    needle_lengths: NeedleOpt = "512,1024",
    sources: SourcesOpt = "demo",
    threads: ThreadsOpt = 0,
    note: Annotated[
        str | None, typer.Option(help="a line for the report (e.g. where the checkpoint came from)")
    ] = None,
    seed: int = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
) -> None:
    """Sample -> evaluate -> fit surrogate -> exact DP Pareto front -> measured presets, report and plot."""
    from placement.constraints import InfeasibleError
    from placement.pipeline import search_pipeline
    from placement.search import SearchSettings
    from supernet.checkpoint import CheckpointError
    from supernet.placement import PlacementError

    settings = _eval_settings(trace_sequences, trace_length, kl_sequences, needle_lengths, seed, None)
    _set_threads(threads)
    if evals < 2 or init_random < 0 or per_round < 1 or presets < 1 or distance < 0:
        fail(
            f"--evals {evals} must be >= 2, --per-round {per_round} and --presets {presets} >= 1, "
            f"--init-random {init_random} and --distance {distance} >= 0"
        )
    ss = SearchSettings(
        evals=evals,
        init_random=init_random,
        per_round=per_round,
        distance=distance,
        presets=presets,
        seed=seed,
        baseline=baseline,
    )
    command = (
        "supernet place search " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if len(sys.argv) > 3 and sys.argv[1:3] == ["place", "search"]
        else ""
    )
    try:
        outputs = search_pipeline(
            model,
            presets_out=out,
            report_dir=report_dir,
            db=db,
            cost_model=cost_model,
            context=context,
            batch=batch,
            quality=quality,
            eval_settings=settings,
            search_settings=ss,
            allowed=allowed,
            min_fa=min_fa,
            kv_budget=kv_budget,
            max_cost=budget,
            measure_cpu=measure_cpu,
            device=device,
            dtype=dtype,
            command=command,
            sources=sources.split(","),
            note=note,
        )
    except (PlacementError, InfeasibleError, CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    doc = outputs.document
    typer.echo(f"wrote {outputs.presets_path} ({len(doc.presets)} presets, default {doc.default_name})")
    for p in doc.presets:
        typer.echo(
            f"  {p.name:12} {p.speedup or 1.0:6.2f}x  quality {p.measured_quality or 0.0:+.4f} "
            f"(predicted {p.predicted_quality or 0.0:+.4f})  {p.placement}"
        )
    if outputs.report_path:
        typer.echo(f"report: {outputs.report_path}")


@place.command("refresh")
def refresh_cmd(
    model: ModelOpt,
    presets: Annotated[Path, typer.Option(help="presets.yaml written by `place search` (its placements are kept)")],
    out: Annotated[Path | None, typer.Option(help="file to write (default: --presets itself)")] = None,
    db: DbOpt = None,
    trace_sequences: TraceSeqOpt = 4,
    trace_length: TraceLenOpt = 128,
    kl_sequences: Annotated[int, typer.Option(help="held-out sequences for KL")] = 4,
    needle_lengths: NeedleOpt = "512,1024",
    sources: SourcesOpt = "demo",
    threads: ThreadsOpt = 0,
    seed: int = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
) -> None:
    """Re-measure every preset's quality on a retrained checkpoint (same placements, same evaluation)."""
    from placement.refresh import refresh_presets
    from supernet.checkpoint import CheckpointError
    from supernet.placement import PlacementError
    from supernet.presets import PresetsFileError

    settings = _eval_settings(trace_sequences, trace_length, kl_sequences, needle_lengths, seed, None)
    _set_threads(threads)
    try:
        document = refresh_presets(model, presets, out or presets, settings, db=db,
                                   sources=tuple(sources.split(",")), device=device, dtype=dtype)
    except (PresetsFileError, PlacementError, CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"wrote {out or presets} ({len(document.presets)} presets re-measured on {model})")
    for p in document.presets:
        typer.echo(f"  {p.name:12} {p.speedup or 1.0:6.2f}x  quality {p.measured_quality or 0.0:+.4f}  "
                   f"needles {p.needle_acc_by_length}")


def register(app: typer.Typer) -> None:
    app.add_typer(place, name="place")
