"""oneDNN's packed linear (kernels/linear.py) against ``F.linear`` at decode and prefill row counts.

The weights are SmolLM2-135M's layer shapes (q|k|v 960x576, o 576x576, MLP gate|up 3072x576 and down
576x1536), ``--layers`` distinct copies of each so that a pass streams them from memory as a decode step does.
Both forms run alternately in one process on the same inputs; medians of ``--repeats`` passes. Reported per
row count: the weight bytes read per second (what bounds a decode step) and the arithmetic rate (what bounds
prefill), for each form, and packed / F.linear.

    python benchmarks/bench_linear.py --rows 1,8,64,256,1024 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # out x in, one decoder layer of SmolLM2-135M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,64,256,1024", help="comma list of row counts (tokens per call)")
    ap.add_argument("--layers", type=int, default=30, help="distinct copies of each weight")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    from kernels.linear import PACK_ROWS_HINT, packed_available

    if not packed_available():
        raise SystemExit("this torch build has no oneDNN packed linear (torch.ops.mkldnn._reorder_linear_weight)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    weights = [(torch.randn(shape, generator=gen) * 0.02).to(dtype) for _ in range(args.layers) for shape in SHAPES]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"# {len(weights)} weights, {nbytes / 2**20:.0f} MiB {args.dtype}; threads={args.threads}; "
          f"medians of {args.repeats}")
    print(f"{'rows':>5} {'F.linear GB/s':>13} {'packed GB/s':>11} {'F.linear GFLOP/s':>16} "
          f"{'packed GFLOP/s':>14} {'packed/F.linear':>15}")
    for rows in map(int, args.rows.split(",")):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=gen).to(dtype) for w in weights}

        def plain(inputs: dict = inputs) -> None:
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def onednn(inputs: dict = inputs) -> None:
            for w, p in zip(weights, packed, strict=True):
                torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")

        times: dict[str, list[float]] = {"plain": [], "packed": []}
        plain(), onednn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("packed", onednn)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        t_plain, t_packed = statistics.median(times["plain"]), statistics.median(times["packed"])
        flops = 2 * rows * sum(w.numel() for w in weights)
        print(f"{rows:>5} {nbytes / t_plain / 1e9:>13.1f} {nbytes / t_packed / 1e9:>11.1f} "
              f"{flops / t_plain / 1e9:>16.0f} {flops / t_packed / 1e9:>14.0f} {t_plain / t_packed:>14.2f}x")


if __name__ == "__main__":
    main()
