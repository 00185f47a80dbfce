"""Re-measure a presets file on a retrained checkpoint: same placements, fresh quality numbers.

A preset's name, placement, cost and speed-up depend only on the placement and the cost model; its quality
depends on the weights. After the supernet is retrained (the same recipe re-run, or more steps), the search's
front is still the right set of placements to offer, but every measured number in the file describes the old
weights. ``refresh_presets`` re-evaluates each preset on the new checkpoint with the file's own evaluation
settings and writes the file again, so the server never quotes quality measured on other weights.

What changes: ``metrics``, ``measured_quality`` (the file's metric weights over the new metrics),
``needle_acc_by_length`` and ``quality.checkpoint``. The surrogate's ``predicted_quality`` was fitted on the old
weights and is dropped (None), as are speculative-decoding measurements, whose acceptance rates depend on the
weights too (``draft`` and ``speculative_from_context``, which a person may have set, stay).
"""

from __future__ import annotations

from pathlib import Path

from placement.evaluate import CORE_METRICS, EvalSettings, Evaluator, combine, corpus_data_factory
from placement.pipeline import open_checkpoint
from placement.presets import save_presets
from placement.store import ResultStore, default_db_path
from supernet.config import SupernetConfig
from supernet.placement import parse_placement
from supernet.presets import PresetsFile, QualityInfo, read_presets


def refresh_presets(
    model_dir: str | Path,
    presets_path: str | Path,
    out: str | Path,
    settings: EvalSettings,
    *,
    db: str | Path | None = None,
    sources: tuple[str, ...] = ("demo",),
    device: str = "cpu",
    dtype: str = "auto",
) -> PresetsFile:
    """Re-evaluate every preset of ``presets_path`` on ``model_dir`` and write the result to ``out``.

    ``settings`` must describe the same evaluation the file records (``quality.eval``): numbers measured on
    other data would not be comparable with the search's, so a mismatch is an error naming both."""
    document = read_presets(presets_path)
    if document.quality is None:
        raise ValueError(f"{presets_path}: no 'quality' section (metric weights and evaluation); "
                         "refresh re-measures files written by `supernet place search`")
    if settings.describe() != document.quality.eval:
        raise ValueError(f"evaluation settings ({settings.describe()}) differ from the file's "
                         f"({document.quality.eval}); pass the search's --trace-* / --kl-* / --needle-* options")
    layers = SupernetConfig.load(model_dir).num_hidden_layers
    placements = [parse_placement(p.placement, layers) for p in document.presets]  # depth checked before loading
    model, tokenizer, ckpt = open_checkpoint(model_dir, device, dtype)
    weights = document.quality.weights
    wanted = list(dict.fromkeys([*CORE_METRICS, *weights]))
    entries = []
    with ResultStore(db or default_db_path()) as store:
        data = corpus_data_factory(model, tokenizer, settings, sources)
        ev = Evaluator(model, ckpt, store, settings, data_factory=data)
        for entry, spec in zip(document.presets, placements, strict=True):
            values = ev.evaluate(spec, wanted)
            entries.append(entry.model_copy(update={
                "metrics": {k: round(float(v), 5) for k, v in values.items()},
                "measured_quality": round(combine(values, weights), 5),
                "predicted_quality": None,
                "needle_acc_by_length": ev.needle_by_length(spec),
                "speculative_measured": [],
            }))
    quality = QualityInfo(weights=weights, eval=document.quality.eval, checkpoint=ckpt,
                          model_dir=Path(model_dir).name)
    refreshed = document.model_copy(update={"presets": entries, "quality": quality})
    save_presets(out, refreshed)
    return refreshed
