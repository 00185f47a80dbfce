"""Does the SWA window (or its attention sinks) limit quality? Held-out perplexity of SWA placements at several
windows, on the trained checkpoint, side by side in one process.

    python benchmarks/ablate_window.py --data runs/demo/data/val.jsonl            # the demo, 2 x 2,048 tokens
    python benchmarks/ablate_window.py --windows 128,256,512,1024 --sinks 0,4 --placements all-swa,fast-17x-b

This is an evaluation-time ablation: the SWA mixers were trained at one window (the checkpoint's config) and
are run here at others with the same weights -- no retraining per window, which a CPU session cannot afford.
A window that helps at evaluation time is an upper bound on what retraining at it would show for the window's
reach; one that hurts says the trained window is not wasted. The cache an SWA layer keeps grows with
``sinks + window`` (supernet.cache.layer_state_bytes), which the table prints beside the perplexity. The
reference is the model's own all-FA placement, which equals the teacher.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from supernet import DEMO_DIR
from supernet.cache import layer_state_bytes
from supernet.checkpoint import load_supernet
from supernet.model import SupernetForCausalLM
from supernet.presets import resolve_placement
from supernet.training.data import tokenize_file
from supernet.training.evaluate import evaluate_placements


def set_window(model: SupernetForCausalLM, window: int, sinks: int) -> None:
    """Run every layer's SWA mixer at ``window`` + ``sinks`` (the weights are unchanged)."""
    for layer in model.layers:
        swa = layer.mixers["swa"]
        swa.window, swa.sinks = window, sinks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_DIR)
    ap.add_argument("--data", default="runs/demo/data/val.jsonl", help="held-out text (as `supernet eval --data`)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--windows", default="128,256,512,1024")
    ap.add_argument("--sinks", default="0,4")
    ap.add_argument("--placements", default="all-swa", help="placements or preset names, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model = load_supernet(args.model).float().eval()
    trained = (model.config.swa.window, model.config.swa.sinks)
    names = args.placements.split(",")
    placements = {name: resolve_placement(name, args.model) for name in names}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.from_numpy(tokenize_file(args.data, tokenizer, args.seq_len, args.max_tokens, "text")).long()
    print(f"# {args.model}: SWA trained at window {trained[0]} + {trained[1]} sinks; "
          f"{ids.numel()} held-out tokens ({len(ids)} x {args.seq_len}) from {args.data}")
    print("| window | sinks | SWA cache per layer (KiB) | " + " | ".join(f"{n} ppl / all-FA" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for window in (int(w) for w in args.windows.split(",")):
        for sinks in (int(s) for s in args.sinks.split(",")):
            set_window(model, window, sinks)
            model.config.swa.window, model.config.swa.sinks = window, sinks  # for layer_state_bytes
            t0 = time.perf_counter()
            scored = evaluate_placements(model, ids, list(placements.values()), include_teacher=True)
            ref = scored["teacher"]["ppl"]
            kib = layer_state_bytes(model.config, "swa", args.seq_len) / 1024
            mark = " (trained)" if (window, sinks) == trained else ""
            ratios = " | ".join(f"{scored[p]['ppl'] / ref:.3f}" for p in placements.values())
            print(f"| {window}{mark} | {sinks} | {kib:.0f} | {ratios} |  <!-- {time.perf_counter() - t0:.0f} s -->",
                  flush=True)


if __name__ == "__main__":
    main()
