"""Self-speculative decoding: decode tokens/s with vs without speculation, per target preset, context and batch.

For each target preset and context length the prompt (real text: Jane Austen, else the demo corpus) is
prefilled ONCE on the target's placement and once on each draft's; every measurement then starts from copies
of those caches, so a 32k-token prefill is paid once per preset, not once per batch size and mode. A
measurement decodes ``--new-tokens`` tokens for ``batch`` copies of the sequence (greedy, so both modes produce
the same tokens and the comparison is like for like) through the engine's own decode step
(``SpeculativeDecoder.step`` with the server's adaptive k policy, or the plain ``ModelRunner.decode``). Plain
and speculative runs alternate for ``--rounds`` rounds; medians are reported. Acceptance rate = accepted /
drafted tokens; tokens/step = tokens emitted per verify step.

Draft choice (``--drafts all``): for each target every preset faster than it (by the presets file's speed-up;
a slower draft cannot pay) is scored by measured acceptance x measured speed -- its speculative speed-up at
batch 1 on the largest context, over ``--select-rounds`` rounds -- and the best one is kept for the full sweep;
a target with no faster preset (the fastest) is skipped. Prefilled caches are kept for the whole run, so each
placement's prompt is prefilled once per context however many targets it drafts for.

``--write`` stores into the model's presets.yaml, per target: ``draft`` (that choice),
``speculative_from_context`` (the smallest measured context from which speculation is >= --min-speedup at
batch 1 and never slower at any measured batch, i.e. on by default only where it pays; omitted when nowhere)
and ``speculative_measured`` (the rows behind it). ``--json`` is rewritten after every row, so a run stopped
part-way keeps what it measured; ``--write-from ROWS.json`` writes presets.yaml from such a file without
measuring anything.

    python benchmarks/bench_spec_decode.py --model supernet/demo --contexts 1024,8192,32768 --batches 1,8 \\
        --drafts all --write          # idle machine; over 1 h on 2 CPU cores, ~16 GB of RAM at 32k x 8
    python benchmarks/bench_spec_decode.py --targets all-fa --drafts fast-17x --contexts 64 --batches 1,2 \\
        --new-tokens 8 --rounds 1     # a smoke run (a minute)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from serving.engine import Sequence
from serving.runner import ModelRunner
from serving.sampling import SamplingParams, make_generator, sample
from serving.spec_decode import SpeculativeDecoder
from serving.spec_policy import DraftPlan, SpecConfig
from serving.types import GenerationRequest, SpecUsage
from supernet.atomic import atomic_write
from supernet.cache import SequenceState
from supernet.presets import PRESETS_FILE, SpecMeasurement, read_presets, write_presets


def prompt_ids(tokenizer, length: int) -> list[int]:
    from supernet.training.data import DataError, austen, demo_corpus

    try:
        docs = list(austen())
    except DataError:
        docs = list(demo_corpus())
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc.text)["input_ids"]
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"the corpus holds only {len(ids)} tokens; a {length}-token context needs more text")


def prefill(runner: ModelRunner, placement, ids: list[int], capacity: int, chunk: int = 512):
    state = runner.new_state(placement, capacity)
    for start in range(0, len(ids), chunk):
        logits = runner.prefill(state, ids[start : start + chunk])
    return state, logits[-1]


def decode(
    spec: SpeculativeDecoder,
    target: tuple[SequenceState, torch.Tensor],
    draft: SequenceState | None,
    plan: DraftPlan | None,
    batch: int,
    new_tokens: int,
    preset: str,
) -> tuple[float, SpecUsage]:
    """Decode ``new_tokens`` for ``batch`` copies; (seconds, summed speculative counters)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    state, logits = target
    first = int(logits.argmax())
    seqs = []
    for i in range(batch):
        seq = Sequence(i, params, make_generator(i), detok=None, state=state.clone(), output_ids=[first])
        seq.pending = first
        if plan is not None:
            req = GenerationRequest("bench", [0] * state.length, state.placement, params, preset, speculative=True)
            seq.spec = spec.start(req, plan)
            seq.spec.state = draft.clone()
        seqs.append(seq)
    t0 = time.perf_counter()
    running = seqs
    while running:
        if plan is not None:
            emitted = [e.tokens for e in spec.step(running)]
        else:
            out = spec.runner.decode([s.state for s in running], [s.pending for s in running])
            emitted = [[t] for t in sample(out, [s.params for s in running], [s.generator for s in running])[0]]
        for seq, tokens in zip(running, emitted, strict=True):
            take = tokens[: new_tokens - len(seq.output_ids)]
            seq.output_ids += take
            seq.pending = take[-1]
        running = [s for s in running if len(s.output_ids) < new_tokens]
    seconds = time.perf_counter() - t0
    usage = SpecUsage()
    for s in seqs:
        if s.spec is not None:
            usage.add(s.spec.usage)
    return seconds, usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="supernet checkpoint directory (default: the demo)")
    ap.add_argument("--targets", default=None, help="comma list of target presets (default: all)")
    ap.add_argument("--drafts", default=None, help="'all' (choose per target), or one draft preset for all")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--select-rounds", type=int, default=1, help="rounds per candidate when choosing a draft")
    ap.add_argument("--k", type=int, default=0, help="fixed k (0: the server's adaptive policy)")
    ap.add_argument("--min-speedup", type=float, default=1.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="store drafts and on/off contexts in presets.yaml")
    ap.add_argument("--json", type=Path, default=None, help="also write every row here (after each row)")
    ap.add_argument("--write-from", type=Path, default=None, help="write presets.yaml from this rows file; no runs")
    args = ap.parse_args()

    import supernet
    from serving.server import load_model

    model_dir = Path(args.model or supernet.DEMO_DIR)
    if args.write_from:
        write_presets_from(model_dir, json.loads(args.write_from.read_text()), args.min_speedup)
        return
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(model_dir)
    doc = read_presets(model_dir / PRESETS_FILE)
    placements = {p.name: model.placement(p.placement) for p in doc.presets}
    targets = args.targets.split(",") if args.targets else list(placements)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    runner = ModelRunner(model)
    cfg = SpecConfig(adaptive=args.k == 0, k_start=args.k or 3, k_max=max(args.k, 6))
    spec = SpeculativeDecoder(runner, cfg)
    texts = prompt_ids(tokenizer, max(contexts))
    print(f"model {model_dir}; threads {args.threads}; {args.new_tokens} new tokens; medians of {args.rounds}")
    print(f"{'target':>16} {'draft':>16} {'ctx':>6} {'b':>2} {'plain tok/s':>11} {'spec tok/s':>10} "
          f"{'speedup':>7} {'accept':>6} {'tok/step':>8}")
    rows: list[dict] = []
    speed = {p.name: p.speedup or 1.0 for p in doc.presets}
    states: dict[tuple[str, int], tuple] = {}  # (preset, context) -> prefilled (state, last logits), kept

    def prefilled(name: str, ctx: int):
        if (name, ctx) not in states:
            states[(name, ctx)] = prefill(runner, placements[name], texts[:ctx], ctx + args.new_tokens + 8)
        return states[(name, ctx)]

    for target in targets:
        entry = next(p for p in doc.presets if p.name == target)
        if args.drafts == "all":
            candidates = [n for n in placements if speed[n] > speed[target]]
            if not candidates:
                print(f"{target:>16} skipped: no preset is faster, so none can draft for it", flush=True)
                continue
        else:
            candidates = [args.drafts or entry.draft or next(n for n in placements if n != target)]

        def measure(
            draft: str, ctx: int, batch: int, target: str = target, rounds: int = args.rounds, selection: bool = False
        ) -> dict:
            plan = DraftPlan(draft, placements[draft])
            plain, fast, usage = [], [], SpecUsage()
            for _ in range(rounds):
                t, _ = decode(spec, prefilled(target, ctx), None, None, batch, args.new_tokens, target)
                plain.append(t)
                t, usage = decode(
                    spec, prefilled(target, ctx), prefilled(draft, ctx)[0], plan, batch, args.new_tokens, target
                )
                fast.append(t)
            tokens = batch * (args.new_tokens - 1)
            row = {
                "target": target, "draft": draft, "context": ctx, "batch": batch,
                "plain_tok_s": tokens / statistics.median(plain), "spec_tok_s": tokens / statistics.median(fast),
                "acceptance": usage.acceptance_rate, "tokens_per_step": usage.tokens_per_verify_step,
            }
            row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
            if selection:  # a draft candidate's score, not a row of the sweep (write_presets_from skips it)
                row["selection"] = True
            print(f"{target:>16} {draft:>16} {ctx:>6} {batch:>2} {row['plain_tok_s']:>11.2f} "
                  f"{row['spec_tok_s']:>10.2f} {row['speedup']:>7.2f} {row['acceptance']:>6.2f} "
                  f"{row['tokens_per_step']:>8.2f}", flush=True)
            rows.append(row)
            if args.json:
                atomic_write(args.json, json.dumps(rows, indent=1))
            return row

        if len(candidates) > 1:  # acceptance x speed: the speed-up at batch 1 on the longest context
            scored = [(measure(d, contexts[-1], 1, rounds=args.select_rounds, selection=True), d) for d in candidates]
            candidates = [max(scored, key=lambda rd: rd[0]["speedup"])[1]]
        draft = candidates[0]
        for ctx in contexts:
            for batch in batches:
                measure(draft, ctx, batch)
        later = targets[targets.index(target) + 1 :]
        for key in list(states):  # free the caches no later target drafts from (at 32k: GBs each)
            if key[0] != args.drafts and not any(speed[t] < speed[key[0]] for t in later):
                del states[key]
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1))
    if args.write:
        write_presets_from(model_dir, rows, args.min_speedup)


def write_presets_from(model_dir: Path, rows: list[dict], min_speedup: float) -> None:
    """Store each measured target's draft, on/off context and sweep rows (not the selection rows) in the
    model's presets.yaml."""
    by_target: dict[str, list[SpecMeasurement]] = {}
    for row in rows:
        if not row.get("selection"):
            by_target.setdefault(row["target"], []).append(
                SpecMeasurement(
                    context=row["context"], batch=row["batch"], speedup=round(row["speedup"], 3),
                    acceptance=round(row["acceptance"], 3), tokens_per_step=round(row["tokens_per_step"], 3),
                    draft=row["draft"],
                )
            )
    path = model_dir / PRESETS_FILE
    doc = read_presets(path)
    for entry in doc.presets:
        if entry.name in by_target:
            measured = by_target[entry.name]
            entry.draft = measured[0].draft
            entry.speculative_measured = measured
            entry.speculative_from_context = on_from_context(measured, min_speedup)
    header = "\n".join(
        line.removeprefix("#").removeprefix(" ") for line in path.read_text().splitlines() if line.startswith("#")
    )
    write_presets(path, doc, header=header)
    print(f"wrote drafts and speculative_from_context of {len(by_target)} target(s) to {path}")


def on_from_context(measured: list[SpecMeasurement], min_speedup: float) -> int | None:
    """Smallest measured context from which every longer one pays at batch 1 and is never slower at any batch."""
    contexts = sorted({m.context for m in measured})
    start = None
    for ctx in reversed(contexts):
        at = [m for m in measured if m.context == ctx]
        pays = all(m.speedup >= min_speedup for m in at if m.batch == 1) and all(m.speedup >= 1.0 for m in at)
        if not pays:
            break
        start = ctx
    return start


if __name__ == "__main__":
    main()
