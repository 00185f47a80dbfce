"""Decode speed of every preset vs all-FA, at several context lengths and batch sizes, in one process.

For each (context, batch) the caches are filled SYNTHETICALLY to the context length (random keys/values in FA
and SWA caches, random fp32 recurrent states for GDN/KDA) instead of by a real prefill: a decode step reads
the same bytes either way, and a real 32k-token prefill of 8 sequences would take most of an hour on this CPU.
Every row has its own buffers, as in a server. Only when the FA caches of one (context, batch) would not fit
``--max-kv-gib`` do the rows of a batch share one KV buffer per layer (column ``kv`` says ``shared``): each row
still reads all of it, but a shared buffer small enough to stay in the CPU's caches (1k-8k tokens: 1.5-12 MB
per layer) is read from cache by rows 2..B, so shared rows understate FA's batch cost there.

Also printed: the bandwidth floor of each step = bytes the step must read (the weights it touches + every
row's cache) / measured read bandwidth (torch sum over 1 GiB, same thread count), and step time / floor.

    python benchmarks/bench_decode.py --model runs/sn-serve [--contexts 1024,8192,32768] [--batches 1,8]

``--compare-reference`` also times every preset with the decode fast paths off (supernet.fastpath), in the same
round-robin, so the fast path's gain is a side-by-side ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from supernet.cache import DeltaState, KVCache, SequenceState, WindowKVCache, layer_state_bytes
from supernet.fastpath import reference_path
from supernet.model import SupernetForCausalLM

REF = "@ref"  # suffix of a preset timed on the reference path (--compare-reference)


def measure_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a streaming read (torch sum), median of repeats."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def weight_bytes(model: SupernetForCausalLM, placements: list[tuple[str, ...]]) -> int:
    """Parameter bytes one decode step reads: the trunk, the shared attention projections of every layer, and
    the own weights of each mixer some row uses at that layer (embeddings: one row per token, ignored)."""
    total = 0
    for i, layer in enumerate(model.layers):
        used = {p[i] for p in placements}
        modules = [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp]
        if layer.attn is not None:
            modules.append(layer.attn)
        modules += [layer.mixers[name] for name in used]
        total += sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
    return total + head.numel() * head.element_size() + model.norm.weight.numel() * 4


def synthetic_states(
    model: SupernetForCausalLM,
    placement: tuple[str, ...],
    batch: int,
    context: int,
    extra: int,
    gen: torch.Generator,
    share_kv: bool = False,
) -> list[SequenceState]:
    """``batch`` states at length ``context``; each row's FA buffers its own copy, or one buffer for every row
    when ``share_kv`` (see the module docstring)."""
    template = model.new_state(placement)
    dtype = model.embed_tokens.weight.dtype  # caches follow the model's dtype (recurrent states stay fp32)
    shared: list = []
    for layer in template.layers:
        if isinstance(layer, KVCache):
            h, _, d = layer.k.shape
            k = torch.randn(h, context + extra, d, generator=gen).to(dtype)
            shared.append((k, torch.randn(h, context + extra, d, generator=gen).to(dtype)))
        elif isinstance(layer, WindowKVCache):
            slots = layer.k.shape[1]
            pos = torch.full((slots,), -1, dtype=torch.long)
            pos[: layer.sinks] = torch.arange(layer.sinks)
            for p in range(max(layer.sinks, context - layer.window), context):
                pos[layer.sinks + (p - layer.sinks) % layer.window] = p
            shared.append(
                (torch.randn(layer.k.shape, generator=gen).to(dtype),
                 torch.randn(layer.v.shape, generator=gen).to(dtype), pos)
            )
        else:
            shared.append(None)
    states = []
    for _ in range(batch):
        layers = []
        for layer, buf in zip(template.layers, shared, strict=True):
            if isinstance(layer, KVCache):
                k, v = (buf[0], buf[1]) if share_kv else (buf[0].clone(), buf[1].clone())
                layers.append(KVCache(k, v, context))
            elif isinstance(layer, WindowKVCache):
                layers.append(
                    WindowKVCache(buf[0].clone(), buf[1].clone(), buf[2].clone(), layer.sinks, layer.window)
                )
            else:
                assert isinstance(layer, DeltaState)
                layers.append(
                    DeltaState(
                        torch.randn(layer.conv.shape, generator=gen).to(dtype),
                        torch.randn(layer.recurrent.shape, generator=gen) * 0.05,
                    )
                )
        states.append(SequenceState(placement, layers, context))
    return states


def fa_cache_bytes(model: SupernetForCausalLM, placement: tuple[str, ...], batch: int, context: int) -> int:
    """Bytes of the FA caches of ``batch`` rows at ``context`` (what sharing would save)."""
    per_layer = layer_state_bytes(model.config, "fa", context, model.embed_tokens.weight.dtype)
    return batch * per_layer * sum(name == "fa" for name in placement)


def available_gib() -> float:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30)


def cache_read_bytes(states: list[SequenceState]) -> int:
    return sum(s.nbytes() for s in states)


@torch.inference_mode()
def time_round_robin(
    models: dict[str, SupernetForCausalLM], batches: dict[str, list[SequenceState]], steps: int
) -> dict[str, list[float]]:
    """Time decode steps of every preset in turn (step 1 of each, then step 2 of each, ...): on a shared,
    noisy machine the load drifts over minutes, and interleaving exposes every preset to the same drift."""
    tokens = {
        name: torch.randint(0, models[name].config.vocab_size, (len(states), 1)) for name, states in batches.items()
    }
    def step(name: str, states: list[SequenceState]) -> float:
        with reference_path() if name.endswith(REF) else nullcontext():
            t0 = time.perf_counter()
            models[name](tokens[name], states=states)
            return time.perf_counter() - t0

    for name, states in batches.items():
        step(name, states)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(steps):
        for name, states in batches.items():
            times[name].append(step(name, states))
    return times


@torch.inference_mode()
def print_profile(model: SupernetForCausalLM, name: str, states: list[SequenceState], top: int = 12) -> None:
    """Where one decode step's CPU time goes: the aten ops with the most self time, and the op count (the
    profiler's own overhead inflates small ops alike, so read it as shares, not as timings)."""
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(0, model.config.vocab_size, (len(states), 1))
    with reference_path() if name.endswith(REF) else nullcontext():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(tokens, states=states)
    events = prof.key_averages()
    print(f"# profile {name}: {sum(e.count for e in events)} ops in one step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="supernet checkpoint (default: the demo)")
    ap.add_argument(
        "--presets", help="comma list (default: every preset of the model: presets.yaml or built-in)"
    )
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument(
        "--steps", type=int, default=7, help="timed decode steps per configuration (median reported)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="the model's dtype: auto (float32 on CPU), bf16, fp32")
    ap.add_argument(
        "--compare-dtype",
        help="also time every preset on a copy of the model in this dtype (rows '<preset>@<dtype>'), same run",
    )
    ap.add_argument(
        "--compare-reference",
        action="store_true",
        help=f"also time every preset on the reference path (rows '<preset>{REF}'): the fast path's gain",
    )
    ap.add_argument(
        "--max-kv-gib",
        type=float,
        default=round(0.6 * available_gib(), 1),
        help="FA cache bytes one (context, batch) may allocate before its rows share buffers "
        "(default: 60%% of the memory available at start)",
    )
    ap.add_argument("--profile", action="store_true", help="also print each preset's top ops in one step")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import supernet
    from serving.presets import load_presets, table_from_specs
    from serving.server import load_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or supernet.DEMO_DIR
    model, _ = load_model(model_dir, dtype=args.dtype)
    n = model.config.num_hidden_layers
    table = load_presets(model_dir, n)
    if args.presets:
        table = table_from_specs(
            {p: table.presets[p].spec if p in table.presets else p for p in args.presets.split(",")}, n
        )
    names = table.names
    if "all-fa" not in names:
        names = ["all-fa"] + names
    placements = {
        name: model.placement("all-fa" if name == "all-fa" else table.get(name).spec) for name in names
    }
    models = dict.fromkeys(names, model)
    if args.compare_reference:
        placements.update({name + REF: placements[name] for name in names})
        models.update({name + REF: model for name in names})
        names = [n for name in names for n in (name, name + REF)]
    if args.compare_dtype:
        other, _ = load_model(model_dir, dtype=args.compare_dtype)
        tag = f"@{args.compare_dtype}"
        placements.update({name + tag: placements[name] for name in names})
        models.update({name + tag: other for name in names})
        names = [n for name in names for n in (name, name + tag)]
    bandwidth = measure_bandwidth()
    print(
        f"# {model_dir}: {n} layers, {model.embed_tokens.weight.dtype}, threads={args.threads}, "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s; caches filled synthetically (see --help)"
    )
    print(
        f"{'preset':<18} {'ctx':>6} {'B':>3} {'step ms':>9} {'tok/s':>8} {'vs FA':>7} {'floor ms':>9} "
        f"{'x floor':>8} {'kv':>6}"
    )
    gen = torch.Generator().manual_seed(0)
    results = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            kv_bytes = sum(fa_cache_bytes(models[name], placements[name], batch, context) for name in names)
            share = batch > 1 and kv_bytes / (1 << 30) > args.max_kv_gib
            batches = {
                name: synthetic_states(models[name], placements[name], batch, context, args.steps + 3, gen, share)
                for name in names
            }
            floors = {
                name: weight_bytes(models[name], [placements[name]]) + cache_read_bytes(states)
                for name, states in batches.items()
            }
            times = time_round_robin(models, batches, args.steps)
            if args.profile:
                for name, states in batches.items():
                    print_profile(models[name], name, states)
            del batches
            fa_ms = statistics.median(times["all-fa"]) * 1e3
            for name in names:
                ms = statistics.median(times[name]) * 1e3
                floor_ms = floors[name] / bandwidth * 1e3
                row = {
                    "preset": name,
                    "context": context,
                    "batch": batch,
                    "step_ms": round(ms, 2),
                    "tokens_per_s": round(batch / ms * 1e3, 1),
                    "speedup_vs_fa": round(fa_ms / ms, 2),
                    "floor_ms": round(floor_ms, 2),
                    "x_floor": round(ms / floor_ms, 2),
                    "kv": "shared" if share else "own",
                }
                results.append(row)
                print(
                    f"{name:<18} {context:>6} {batch:>3} {ms:>9.1f} {row['tokens_per_s']:>8.1f} "
                    f"{row['speedup_vs_fa']:>6.2f}x {floor_ms:>9.1f} {row['x_floor']:>7.2f}x {row['kv']:>6}",
                    flush=True,
                )
    print(f"# load average at the end: {os.getloadavg()[0]:.1f} (other jobs share these cores)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bandwidth_gbs": bandwidth / 1e9, "threads": args.threads, "results": results}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
