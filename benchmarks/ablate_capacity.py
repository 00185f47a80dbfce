"""Which capacity limits the linear mixers? The warm start of a few layers under build variants, side by side.

    python benchmarks/ablate_capacity.py --layers 3,15,27 --chunks 4          # SmolLM2, the demo corpus
    python benchmarks/ablate_capacity.py --tiny --layers 0,1 --chunks 2       # a tiny random teacher, seconds

Each variant builds a supernet from the teacher (LoRA rank, full per-mixer weights, decay initialisation, SWA
window) and runs the real warm start (supernet/training/warmstart.py) on the same chunks for the chosen
layers only; the table is each (layer, mixer)'s held-out relative activation error after the same number of
chunks, plus the variant's stored-parameter count (what the shipped-weights budget pays for).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

VARIANTS: dict[str, dict] = {
    # name: build options (supernet.convert.config_from_teacher) and post-build edits
    "rank16": {"build": {"lora_rank": 16}},
    "rank64": {"build": {"lora_rank": 64}},
    "full": {"build": {"mixer_weights": "full"}},  # own q/k/v/o per mixer: the capacity upper bound
    "swa512": {"build": {"lora_rank": 16, "window": 512}},
    # Decay and gate initialisation, each against rank16 (transfer init: per-token decay exp(-0.1 softplus(0)),
    # half-life ~10 tokens, on every head; beta = sigmoid(0) = 0.5; output gate neutral):
    "slow-decay": {"build": {"lora_rank": 16}, "init": {"A_log": [math.log(0.01)]}},  # half-life ~100 tokens
    # one half-life per head, spread geometrically from ~2 to ~1,000 tokens (Mamba/GDN-style multi-scale)
    "multiscale-decay": {"build": {"lora_rank": 16}, "init": {"A_log": "multiscale"}},
    "beta-0.9": {"build": {"lora_rank": 16}, "init": {"b_proj.bias": [math.log(9.0)]}},  # sigmoid -> 0.9
}


def apply_init(model, init: dict) -> None:
    """Overwrite GDN/KDA initial parameters in place: a one-element list fills the tensor; "multiscale" spreads
    A_log over the heads so half-lives run geometrically from ~2 to ~1,000 tokens (at init the per-token
    decay is 2^-exp(A_log), so a half-life of h tokens is A_log = -log h)."""
    with torch.no_grad():
        for layer in model.layers:
            for m in ("gdn", "kda"):
                for name, value in init.items():
                    param = layer.mixers[m].get_parameter(name)
                    if value == "multiscale":
                        half_life = torch.logspace(math.log10(2), 3, param.numel())
                        param.copy_(-torch.log(half_life))
                    else:
                        param.fill_(value[0])


def run_variant(name: str, args, work: Path) -> tuple[dict[tuple[int, str], tuple[float, float]], int, float]:
    from supernet.checkpoint import load_supernet, save_supernet
    from supernet.training.config import TrainConfig
    from supernet.training.trainer import Trainer
    from supernet.training.warmstart import WarmStart

    variant = VARIANTS[name]
    build = {"window": 256, "sinks": 4, **variant["build"]}
    init = work / f"{name}-init"
    cfg = {
        "model": {"checkpoint": str(init), "teacher": args.teacher, "build": build},
        "data": {"sources": args.data, "seq_len": args.seq_len, "max_train_tokens": args.train_tokens,
                 "max_val_tokens": args.seq_len * 8},
        "blockwise": {
            "steps": args.chunks * args.steps_per_chunk,
            "steps_per_chunk": args.steps_per_chunk,
            "chunk_sequences": args.chunk_sequences,
            "batch_size": args.batch,
            "lr": args.lr,
            "mixers": args.mixers,
            "patience": 1000,  # same chunks for every variant: no early stop
        },
        "optim": {"steps": 0},
        "run": {"out": str(work / f"{name}-run"), "progress": False, "threads": args.threads},
    }
    trainer = Trainer(TrainConfig.from_dict(cfg))
    if "init" in variant:
        model = load_supernet(init)
        apply_init(model, variant["init"])
        save_supernet(model, init)
        trainer = Trainer(TrainConfig.from_dict(cfg), resume=True)
    warm = WarmStart(trainer)
    warm.units = [(i, m) for i, m in warm.units if i in args.layers]
    t0 = time.perf_counter()
    progress = warm.run()
    stored = sum(p.numel() for n, p in trainer.model.named_parameters() if ".mixers." in n and ".mixers.fa." not in n)
    return {(p.layer, p.mixer): (p.initial, p.best) for p in progress}, stored, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="rank16,slow-decay,multiscale-decay,beta-0.9")
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--mixers", default="gdn,kda")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-sequences", type=int, default=16)
    ap.add_argument("--steps-per-chunk", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-tokens", type=int, default=2_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama teacher instead of SmolLM2")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    args.mixers = args.mixers.split(",")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="ablate-"))
    args.teacher, args.data = "smollm2", ["demo"]
    if args.tiny:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        tiny = work / "tiny-teacher"
        LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)).save_pretrained(tiny)
        from supernet import DEMO_DIR

        AutoTokenizer.from_pretrained(DEMO_DIR).save_pretrained(tiny)
        args.teacher, args.seq_len, args.train_tokens = str(tiny), 64, 20_000
    rows = {}
    for name in args.variants.split(","):
        errors, stored, seconds = run_variant(name, args, work)
        rows[name] = (errors, stored, seconds)
        print(f"{name}: {stored / 1e6:.1f}M trainable params, {seconds:.0f} s", flush=True)
    keys = sorted(next(iter(rows.values()))[0])
    print("\n| variant | params (M) | " + " | ".join(f"L{i} {m}" for i, m in keys) + " | mean |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for name, (errors, stored, _) in rows.items():
        finals = [errors[k][1] for k in keys]
        print(f"| {name} | {stored / 1e6:.1f} | " + " | ".join(f"{e:.4f}" for e in finals)
              + f" | {sum(finals) / len(finals):.4f} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
