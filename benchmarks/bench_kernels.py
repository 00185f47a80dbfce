"""Throughput of the chunked GDN / KDA kernels against transformers' torch references and causal SDPA.

One process, identical inputs (B=1, H=9, K=V=64, fp32 by default), forward only under inference_mode (or
forward + backward with ``--backward``). Times are medians of ``--repeats`` runs after one warm-up run. The
machine is shared and noisy, so read the ratios (measured side by side) rather than absolute numbers.
transformers' KDA reference is slow (~1k tok/s); at a length where its estimated run time exceeds
``--slow-limit`` seconds it is skipped, and the table says so.

On a machine shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: with the default (spinning) policy,
every parallel op waits for a descheduled thread, and 2-thread wall-clock numbers of op-heavy code (ours,
transformers') measured 5-10x low and erratic while SDPA (one big op) barely moved. Or use
``--threads 1 --clock cpu``.

    python benchmarks/bench_kernels.py                       # T = 1024, 4096, 16384; 2 threads
    python benchmarks/bench_kernels.py --lengths 4096 --repeats 5 --threads 1
    python benchmarks/bench_kernels.py --lengths 2048 --backward
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_kernels.py     # on a shared machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import chunk_gated_delta_rule, chunk_kda, l2_norm


def _run(fn: Callable[..., object], tensors: tuple[Tensor, ...], kwargs: dict, backward: bool) -> None:
    """One call; with ``backward``, on fresh leaves and through ``o.sum().backward()``."""
    if not backward:
        with torch.inference_mode():
            fn(*tensors, **kwargs)
        return
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    out = fn(*leaves, **kwargs)
    (out[0] if isinstance(out, tuple) else out).sum().backward()


def _timed(fn: Callable[[], object], repeats: int, slow_limit: float, clock: Callable[[], float]) -> float:
    """Median seconds over ``repeats`` runs after a warm-up; fewer repeats when one run is slow."""
    t0 = clock()
    fn()
    warm = clock() - t0
    n = max(1, min(repeats, int(slow_limit // max(warm, 1e-9))))
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--dim", type=int, default=64, help="head dim (K = V)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    ap.add_argument("--slow-limit", type=float, default=60.0,
                    help="skip transformers' KDA at a length whose estimated run time exceeds this (s)")
    ap.add_argument("--no-transformers", action="store_true", help="only our kernels and SDPA")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = this process's CPU time: steadier when other jobs share the cores, but "
                         "it sums all threads, so use it with --threads 1")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_gdn = hf_kda = None
    if not args.no_transformers:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # silence "falling back to the torch reference" notices
        from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention as hf_kda
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as hf_gdn

    H, D, C = args.heads, args.dim, args.chunk_size
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    chunk = {"chunk_size": C}
    rows, notes = [], []
    hf_kda_per_token = None
    for T in args.lengths:
        q = l2_norm(torch.randn(1, T, H, D))
        k = l2_norm(torch.randn(1, T, H, D))
        v = torch.randn(1, T, H, D)
        beta = torch.rand(1, T, H).sigmoid()
        g = -F.softplus(torch.randn(1, T, H)) * 0.5  # per head
        gk = -F.softplus(torch.randn(1, T, H, D)) * 2.0  # per channel, down to ~-10 per token
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))

        def time_it(fn: Callable[..., object], tensors: tuple[Tensor, ...], kwargs: dict) -> float:
            call = partial(_run, fn, tensors, kwargs, args.backward)
            return _timed(call, args.repeats, args.slow_limit, clock)

        r: dict[str, float | None] = {}
        r["gdn"] = time_it(chunk_gated_delta_rule, (q, k, v, g, beta), chunk)
        r["kda"] = time_it(chunk_kda, (q, k, v, gk, beta), chunk)
        r["sdpa"] = time_it(F.scaled_dot_product_attention, (qs, ks, vs), {"is_causal": True})
        if hf_gdn is not None:
            r["hf_gdn"] = time_it(hf_gdn, (q, k, v, g, beta), chunk)
            estimate = None if hf_kda_per_token is None else hf_kda_per_token * T
            if estimate is not None and estimate > args.slow_limit:
                r["hf_kda"] = None
                notes.append(f"transformers KDA skipped at T={T}: estimated {estimate:.0f} s per run "
                             f"> --slow-limit {args.slow_limit:.0f} s")
            else:
                r["hf_kda"] = time_it(hf_kda, (q, k, v, gk, beta), chunk)
                hf_kda_per_token = r["hf_kda"] / T
        rows.append((T, r))
        print(f"T={T} done", flush=True)

    def tps(T: int, s: float | None | str) -> str:
        return "-" if s == "-" else "skipped" if s is None else f"{T / s:,.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{b / a:.2f}x"

    mode = "forward + backward" if args.backward else "forward"
    print(f"\nB=1, H={H}, K=V={D}, fp32, chunk {C}, {args.threads} thread(s), {mode}, {args.clock} clock, "
          f"median of up to {args.repeats} runs after a warm-up; tokens/s (tf = transformers' torch "
          f"reference); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average at the end: "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| T | GDN ours | GDN tf | GDN ours/tf | KDA ours | KDA tf | KDA ours/tf "
          "| SDPA causal | GDN ours/SDPA | KDA ours/SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T, r in rows:
        hf_g, hf_k = r.get("hf_gdn", "-"), r.get("hf_kda", "-")
        cells = [
            str(T), tps(T, r["gdn"]), tps(T, hf_g), ratio(r["gdn"], r.get("hf_gdn")),
            tps(T, r["kda"]), tps(T, hf_k), ratio(r["kda"], r.get("hf_kda")),
            tps(T, r["sdpa"]), ratio(r["gdn"], r["sdpa"]), ratio(r["kda"], r["sdpa"]),
        ]
        print("| " + " | ".join(cells) + " |")
    for n in notes:
        print(f"\n{n}")
    print_shipped_size()


def print_shipped_size() -> None:
    """The memory-budget check: what the shipped demo supernet adds over its teacher, on disk (budget 64 MB)."""
    from supernet import DEMO_DIR

    files = sorted(p for p in DEMO_DIR.iterdir() if p.is_file()) if DEMO_DIR.is_dir() else []
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    total = sum(p.stat().st_size for p in files)
    print(f"\nshipped demo ({DEMO_DIR.name}/): weights {weights / 1e6:.1f} MB, all files {total / 1e6:.1f} MB "
          f"(budget 64 MB)")


if __name__ == "__main__":
    main()
