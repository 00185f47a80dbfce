"""The decode products' forms side by side: ``F.linear``, oneDNN's packed linear, and (fp32, where it builds) the
C kernel over blocked weights (kernels/cpu/linear.c), at decode and prefill row counts.

The weights are SmolLM2-135M's layer shapes (q|k|v 960x576, o 576x576, MLP gate|up 3072x576 and down
576x1536), ``--layers`` distinct copies of each so that a pass streams them from memory as a decode step does.
Both forms run alternately in one process on the same inputs; medians of ``--repeats`` passes. Reported per
row count: the weight bytes read per second (what bounds a decode step) and the arithmetic rate (what bounds
prefill) of each form.

    python benchmarks/bench_linear.py --rows 1,2,4,8,16,32,64,256 --threads 1
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

    from kernels import cpu as cpu_kernels
    from kernels.linear import PACK_ROWS_HINT, packed_available

    if not packed_available():
        raise SystemExit("this torch build has no oneDNN packed linear (torch.ops.mkldnn._reorder_linear_weight)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    weights = [(torch.randn(shape, generator=gen) * 0.02).to(dtype) for _ in range(args.layers) for shape in SHAPES]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    lib = cpu_kernels.library() if dtype == torch.float32 else None
    blocked = [cpu_kernels.block_weight(w) for w in weights] if lib is not None else []
    print(f"# {len(weights)} weights, {nbytes / 2**20:.0f} MiB {args.dtype}; threads={args.threads}; "
          f"medians of {args.repeats}; GB/s (GFLOP/s) per form")
    forms = ["F.linear", "packed"] + (["blocked C"] if blocked else [])
    print(f"{'rows':>5} " + " ".join(f"{f:>18}" for f in forms))
    for rows in map(int, args.rows.split(",")):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=gen).to(dtype) for w in weights}

        def plain(inputs: dict = inputs) -> None:
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def onednn(inputs: dict = inputs) -> None:
            for w, p in zip(weights, packed, strict=True):
                torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")

        def c_kernel(inputs: dict = inputs) -> None:
            for w, b in zip(weights, blocked, strict=True):
                cpu_kernels.linear_rows(lib, inputs[w.shape[1]], b, None, w.shape[0])

        fns = dict(zip(forms, [plain, onednn, c_kernel], strict=False))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        flops = 2 * rows * sum(w.numel() for w in weights)
        cells = []
        for name in fns:
            t = statistics.median(times[name])
            cells.append(f"{nbytes / t / 1e9:>9.1f} ({flops / t / 1e9:>5.0f})")
        print(f"{rows:>5} " + " ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
