"""Teacher cache vs teacher in the loop: time per stochastic-distillation step, side by side in one process.

    python benchmarks/teacher_cache.py --model runs/demo-init     # the SmolLM2 supernet (README.md, Training)
    python benchmarks/teacher_cache.py --tiny                     # a tiny random teacher, seconds

Both modes run the same student forward + backward on the same rows and placements; they differ only in where
the targets come from (a teacher forward each step, or memory-mapped fp16 arrays filled once). Steps alternate
between the modes so machine noise hits both alike; medians are reported, plus the one-off cost of filling the
cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model(directory: Path) -> Path:
    from supernet.checkpoint import save_supernet
    from supernet.convert import build_from_teacher
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer(384)
    teacher = make_tiny_llama(vocab=len(tok), layers=8)
    model = build_from_teacher(teacher, window=16, sinks=2)
    save_supernet(model, directory, delta=False)
    tok.save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="supernet checkpoint directory")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random teacher instead")
    ap.add_argument("--data", default="demo", help="data source (see DataConfig.sources)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=8, help="sequences put in the cache")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from supernet.training.config import TrainConfig
    from supernet.training.step import DistillStep
    from supernet.training.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    model_dir = tiny_model(work / "model") if args.tiny else args.model
    if model_dir is None:
        ap.error("--model DIR or --tiny")
    data = args.data
    if args.tiny and data == "demo":
        data = "demo:shakespeare"

    def trainer(cached: bool) -> Trainer:
        cfg = {"model": {"checkpoint": str(model_dir)},
               "data": {"sources": [data], "seq_len": args.seq_len, "val_fraction": 0.02,
                        "max_train_tokens": args.sequences * args.seq_len},
               "teacher_cache": {"enabled": cached, "dir": str(work / "cache"), "batch_size": args.batch},
               "run": {"out": str(work / ("cached" if cached else "live")), "progress": False,
                       "eval_placements": []}}
        return Trainer(TrainConfig.from_dict(cfg))

    cached, live = trainer(True), trainer(False)
    t0 = time.perf_counter()
    cache_source = cached.targets_source()
    fill = time.perf_counter() - t0
    live_source = live.targets_source()
    n_tok = cached.data.train.size
    step = DistillStep(cached.model, cached.cfg)
    times: dict[str, list[float]] = {"cache": [], "in-loop": [], "teacher only": [], "cache read only": []}
    n = len(cached.data.train)
    for i in range(args.steps):
        rows = np.arange(i * args.batch, (i + 1) * args.batch) % n
        placements = cached.sampler.for_step(i, args.batch)
        ids = torch.from_numpy(cached.data.train[rows]).long()
        for name, source in (("cache", cache_source), ("in-loop", live_source)):
            t = time.perf_counter()
            targets = source.get(rows, ids)
            t_targets = time.perf_counter() - t
            loss, _, _ = step(ids, placements, targets)
            loss.backward()
            cached.model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t)
            times["cache read only" if name == "cache" else "teacher only"].append(t_targets)
    tokens = args.batch * args.seq_len
    print(f"model {model_dir}  batch {args.batch} x {args.seq_len}  threads {args.threads}  "
          f"steps {args.steps}")
    print(f"cache fill: {n_tok} tokens in {fill:.1f} s ({n_tok / fill:.0f} tok/s, one-off); "
          f"on disk {sum(f.stat().st_size for f in (work / 'cache').iterdir()) / 2**20:.0f} MiB")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:16s} {med * 1e3:9.1f} ms/step  ({tokens / med:8.0f} tok/s)")
    speedup = statistics.median(times["in-loop"]) / statistics.median(times["cache"])
    print(f"step speed-up with the cache: {speedup:.2f}x")


if __name__ == "__main__":
    main()
