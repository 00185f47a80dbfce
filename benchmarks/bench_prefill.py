"""Prefill speed per preset: prompt tokens/s of the engine's chunked prefill, fast path vs reference path.

Each (preset, context) prefills a real-text prompt (Jane Austen, else the demo corpus) in chunks of
``--chunk`` tokens (the server's ``prefill_chunk``) through ``ModelRunner.prefill``, exactly what a request's
time to first token pays, with the decode fast paths on (under inference mode the linear layers use oneDNN's
packed weights at every size: kernels/linear.py) and, alternately in the same process, with them off
(``supernet.fastpath.reference_path()``: ``F.linear``). Medians of ``--rounds``; "vs FA" compares the
preset's fast prefill with all-FA's, "vs ref" the fast path with the reference path of the same preset.

    python benchmarks/bench_prefill.py --presets all-fa,all-swa,all-gdn,all-kda --contexts 1024,4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from supernet.fastpath import reference_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="supernet checkpoint (default: the demo)")
    ap.add_argument("--presets", default="all-fa,all-swa,all-gdn,all-kda", help="comma list of presets")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per prefill call (the server's default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from bench_spec_decode import prompt_ids  # the script's folder is on sys.path when run as a script

    import supernet
    from serving.runner import ModelRunner
    from serving.server import load_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or supernet.DEMO_DIR
    model, tokenizer = load_model(model_dir)
    runner = ModelRunner(model)
    names = ["all-fa"] + [n for n in args.presets.split(",") if n != "all-fa"]  # all-FA first: "vs FA"
    placements = {name: model.placement(name) for name in names}
    contexts = [int(c) for c in args.contexts.split(",")]
    ids = prompt_ids(tokenizer, max(contexts))

    def prefill(name: str, context: int) -> float:
        state = runner.new_state(placements[name], context)
        t0 = time.perf_counter()
        for start in range(0, context, args.chunk):
            runner.prefill(state, ids[start : min(start + args.chunk, context)])
        return time.perf_counter() - t0

    print(f"# {model_dir}: threads={args.threads}, chunks of {args.chunk}, medians of {args.rounds}")
    print(f"{'preset':<14} {'ctx':>6} {'fast tok/s':>10} {'ref tok/s':>10} {'vs ref':>7} {'vs FA':>7}")
    results = []
    for context in contexts:
        times: dict[tuple[str, bool], list[float]] = {(n, ref): [] for n in names for ref in (False, True)}
        for name in names:  # warm-up: packed copies are built on first use
            prefill(name, min(context, args.chunk))
        for _ in range(args.rounds):  # round-robin, so every preset and path sees the same load drift
            for name in names:
                times[(name, False)].append(prefill(name, context))
                with reference_path():
                    times[(name, True)].append(prefill(name, context))
        fa = statistics.median(times[(names[0], False)])
        for name in names:
            fast, ref = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
            row = {
                "preset": name, "context": context, "fast_tok_s": round(context / fast, 1),
                "reference_tok_s": round(context / ref, 1), "vs_reference": round(ref / fast, 2),
                "vs_fa": round(fa / fast, 2),
            }
            results.append(row)
            print(f"{name:<14} {context:>6} {row['fast_tok_s']:>10.1f} {row['reference_tok_s']:>10.1f} "
                  f"{row['vs_reference']:>6.2f}x {row['vs_fa']:>6.2f}x", flush=True)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
