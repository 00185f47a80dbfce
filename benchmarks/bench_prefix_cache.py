"""Prefix caching: time to first token of chat requests that share a long system prompt, cold vs warm, per preset.

One process drives the embedded engine directly (no HTTP, so only prefill and the first sample are timed). For
each preset, a fresh engine with prefix caching on (the server's default) receives ``--requests`` chats one after
another: the same ~``--system-tokens``-token system prompt (real text) followed by a short, distinct user
question, rendered with the model's chat template. After one unmeasured warm-up request of the same length (other
tokens, another engine), the first request is cold (nothing cached for that preset); the later ones start from
its cached prefix. TTFT = ``add_request`` to the step that returns the first token.
Printed per preset: the cold TTFT, the median warm TTFT, their ratio, the cached prompt tokens of the warm
requests, and as a control the median TTFT of the same warm requests on an engine with prefix caching off (which
should be about the cold one). Greedy decoding; the warm requests' first tokens are checked to equal the
uncached ones.

    python benchmarks/bench_prefix_cache.py                       # the demo, all-fa and linear-4.7x; idle machine
    python benchmarks/bench_prefix_cache.py --tiny                # a tiny random supernet, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from serving.engine import EngineConfig, LLMEngine
from serving.presets import load_presets
from serving.sampling import SamplingParams
from serving.types import GenerationRequest

QUESTIONS = [
    "Summarise the passage in one sentence.",
    "Who is the main character?",
    "What happens next?",
    "Name one place mentioned above.",
    "Is the tone happy or sad?",
    "What is the first word of the text?",
    "Give the passage a title.",
    "Which season is it?",
]


def system_prompt(tokenizer, tokens: int) -> str:
    """About ``tokens`` tokens of real text (Jane Austen, else the demo corpus), cut at a token boundary."""
    from supernet.training.data import DataError, austen, demo_corpus

    try:
        docs = austen()
    except DataError:
        docs = demo_corpus()
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc.text)["input_ids"]
        if len(ids) >= tokens:
            break
    return str(tokenizer.decode(ids[:tokens]))


def chat_ids(tokenizer, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def ttft(engine: LLMEngine, request: GenerationRequest) -> tuple[float, int, int]:
    """Seconds to the first token, prompt tokens served from the cache, the first token; the request then ends."""
    start = time.perf_counter()
    engine.add_request(request)
    first: tuple[float, int, int] | None = None
    while engine.has_work():
        for out in engine.step():
            for d in out.deltas:
                if first is None and d.token_ids:
                    first = (time.perf_counter() - start, out.cached_tokens, d.token_ids[0])
    assert first is not None, "the request produced no token"
    return first


def bench(model, tokenizer, preset: str, placement, prompts: list[list[int]], caching: bool, chunk: int) -> list:
    config = EngineConfig(
        max_model_len=model.config.max_position_embeddings, prefill_chunk=chunk, enable_prefix_caching=caching
    )
    engine = LLMEngine(model, tokenizer, config)
    params = SamplingParams(temperature=0, max_tokens=1)
    return [ttft(engine, GenerationRequest(f"r{i}", p, placement, params, preset)) for i, p in enumerate(prompts)]


def tiny_checkpoint(directory: Path) -> Path:
    """The serving tests' tiny random supernet (char-level tokenizer with a chat template)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.serving.conftest import build_tiny_checkpoint

    return build_tiny_checkpoint(directory)


def main() -> None:
    import supernet
    from serving.server import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="supernet checkpoint (default: the demo)")
    ap.add_argument(
        "--presets", nargs="+", default=None, help="preset names or placements (default: all-fa linear-4.7x)"
    )
    ap.add_argument("--system-tokens", type=int, default=None, help="shared system prompt length (default 1024)")
    ap.add_argument("--requests", type=int, default=4, help="chats per preset (the first is cold)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="the server's default")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random supernet and a short prompt (smoke run)")
    args = ap.parse_args()
    if not 2 <= args.requests <= len(QUESTIONS):
        ap.error(f"--requests must be 2..{len(QUESTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        model_dir = tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-supernet")
        names, system_tokens = args.presets or ["all-fa", "fa,swa,gdn,kda"], args.system_tokens or 150
    else:
        model_dir = args.model or Path(supernet.DEMO_DIR)
        names, system_tokens = args.presets or ["all-fa", "linear-4.7x"], args.system_tokens or 1024
    model, tokenizer = load_model(model_dir)
    table = load_presets(model_dir, model.config.num_hidden_layers)
    system = system_prompt(tokenizer, system_tokens)
    prompts = [chat_ids(tokenizer, system, q) for q in QUESTIONS[: args.requests]]
    print(f"{model_dir.name}: {len(prompts[0])}-token first prompt, {args.requests} chats per preset")
    print(f"{'preset':>16} {'cold ms':>9} {'warm ms':>9} {'speed-up':>9} {'cached':>7} {'uncached warm ms':>17}")
    for name in names:
        placement = table.get(name).placement if name in table.presets else model.placement(name)
        bench(model, tokenizer, name, placement, [prompts[0][::-1]], False, args.prefill_chunk)  # warm-up
        warm_runs = bench(model, tokenizer, name, placement, prompts, True, args.prefill_chunk)
        cold_runs = bench(model, tokenizer, name, placement, prompts, False, args.prefill_chunk)
        assert [r[2] for r in warm_runs] == [r[2] for r in cold_runs], "prefix caching changed a first token"
        cold = warm_runs[0][0]
        warm = statistics.median(r[0] for r in warm_runs[1:])
        uncached = statistics.median(r[0] for r in cold_runs[1:])
        cached = statistics.median(r[1] for r in warm_runs[1:])
        row = f"{cold * 1e3:9.1f} {warm * 1e3:9.1f} {cold / warm:8.1f}x {cached:7.0f} {uncached * 1e3:17.1f}"
        print(f"{name:>16} {row}")


if __name__ == "__main__":
    main()
