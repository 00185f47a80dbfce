"""Cache memory: one size formula that matches the real tensors, a block pool that follows sequences as they
grow, and preemption (recompute) that lets every request finish with the output it would have had anyway."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from placement.cost import state_bytes as cost_state_bytes
from serving.engine import EngineConfig, LLMEngine
from serving.memory import state_bytes as serving_state_bytes
from serving.runner import ModelRunner
from serving.sampling import SamplingParams
from serving.spec_policy import DraftPlan, SpecConfig
from serving.types import GenerationRequest
from supernet.cache import layer_state_bytes, state_bytes
from supernet.config import MIXER_NAMES
from supernet.model import SupernetForCausalLM

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_formula_equals_allocated_bytes(tiny_model, mixer):
    """supernet.cache's formula is what a state's tensors really take after a prefill and decode steps, and the
    serving and placement sizes are that formula."""
    runner, cfg = ModelRunner(tiny_model), tiny_model.config
    placement = tiny_model.placement(f"all-{mixer}")
    for length in (1, 37):
        state = runner.new_state(placement, capacity=length)
        if length > 1:
            runner.prefill(state, list(range(5, 5 + length - 1)))
        runner.decode([state], [9])
        assert state.length == length
        want = state_bytes(cfg, placement, length)
        assert state.allocated_bytes() == state.nbytes() == want
        assert serving_state_bytes(cfg, placement, length) == want
        assert cost_state_bytes(cfg, length, 4)[mixer] * len(placement) == want
    assert cost_state_bytes(cfg, 100, 2)[mixer] == layer_state_bytes(cfg, mixer, 100, torch.bfloat16)


def test_formula_follows_each_mixers_own_config_in_bf16(tiny_model):
    """KDA and GDN sized from their own sections (they used to be conflated), bf16 caches, fp32 delta state."""
    cfg = dataclasses.replace(
        tiny_model.config,
        kda=dataclasses.replace(tiny_model.config.kda, conv_kernel=3),
        gdn=dataclasses.replace(tiny_model.config.gdn, conv_kernel=5),
    )
    torch.manual_seed(0)
    model = SupernetForCausalLM(cfg).to(torch.bfloat16)
    for mixer in MIXER_NAMES:
        state = ModelRunner(model).new_state(model.placement(f"all-{mixer}"), capacity=48)
        assert state.allocated_bytes() == state_bytes(cfg, state.placement, 48, torch.bfloat16), mixer
    assert layer_state_bytes(cfg, "kda", 0, torch.bfloat16) == 3 * 64 * 2 * 2 + 4 * 16 * 16 * 4
    assert layer_state_bytes(cfg, "kda", 0) != layer_state_bytes(cfg, "gdn", 0)


def requests(model, tokenizer) -> list[GenerationRequest]:
    """Mixed presets, prompt lengths, greedy and seeded sampling, n = 2, one speculating request."""
    ids = tokenizer(PROMPT)["input_ids"]
    specs = [
        ("fa-long", ids, "all-fa", {"max_tokens": 90}, None),
        ("fa-seeded", ids[:9], "all-fa", {"max_tokens": 80, "temperature": 1.0, "seed": 7, "n": 2}, None),
        ("mixed", ids[:20], "fa-every-4:swa", {"max_tokens": 70}, None),
        ("gdn", ids[:5], "all-gdn", {"max_tokens": 60, "temperature": 0.8, "seed": 3}, None),
        ("fa-spec", ids[:14], "all-fa", {"max_tokens": 60, "temperature": 1.0, "seed": 11}, True),
        ("fa-late", ids[:12], "all-fa", {"max_tokens": 75}, None),
    ]
    return [
        GenerationRequest(
            rid, list(p), model.placement(preset), SamplingParams(**{"temperature": 0, "ignore_eos": True, **kw}),
            preset, speculative=flag,
        )
        for rid, p, preset, kw, flag in specs
    ]


def run(model, tokenizer, budget: int | None) -> tuple[dict, LLMEngine]:
    spec = SpecConfig(drafts={"all-fa": DraftPlan("all-swa", model.placement("all-swa"))}, adaptive=False)
    config = EngineConfig(max_model_len=256, prefill_chunk=32, speculative=spec)
    if budget is not None:
        config.memory_budget = budget
    engine = LLMEngine(model, tokenizer, config)
    for req in requests(model, tokenizer):
        engine.add_request(req)
    tokens: dict[str, dict[int, list[int]]] = {}
    while engine.has_work():
        for out in engine.step():
            for d in out.deltas:
                tokens.setdefault(out.request_id, {}).setdefault(d.index, []).extend(d.token_ids)
        states = [s for g in engine.groups.values() for q in g.seqs for s in (q.state, q.spec and q.spec.state) if s]
        held = sum(q.blocks for g in engine.groups.values() for q in g.seqs)
        # the pool's count is what the sequences hold, and covers every tensor their caches really allocate
        assert engine.budget.used == held * engine.budget.block_bytes <= engine.budget.capacity
        assert sum(s.allocated_bytes() for s in states) <= engine.budget.used
    assert engine.budget.used == 0 and not engine.groups
    return tokens, engine


def test_preemption_keeps_outputs(tiny_model, tiny_tokenizer):
    """A pool far too small for every running sequence at once: requests are preempted and recomputed, and every
    one still completes with exactly its unconstrained tokens (greedy, seeded sampling, n = 2, speculation)."""
    free, unconstrained = run(tiny_model, tiny_tokenizer, None)
    assert unconstrained.sched.preemptions == 0
    full = len(tiny_tokenizer(PROMPT)["input_ids"]) + 90 + 16  # fa-long at its full length, with room to spare
    one_fa = state_bytes(tiny_model.config, tiny_model.placement("all-fa"), full)
    tight, engine = run(tiny_model, tiny_tokenizer, 2 * one_fa)
    assert engine.sched.preemptions > 0
    assert tight == free
    lengths = {rid: [len(t) for t in seqs.values()] for rid, seqs in tight.items()}
    assert lengths == {r.request_id: [r.params.max_tokens] * r.params.n for r in requests(tiny_model, tiny_tokenizer)}


def test_64_default_chats_run_at_once_on_a_small_budget(tiny_model, tiny_tokenizer, tiny_dir):
    """64 concurrent chat requests, no max_tokens (each may run to the end of the context), through the openai
    client, against a cache budget as small for this model as the demo's default 4 GiB is for the demo: all 64
    are admitted and decoded in one batch, and all complete."""
    import asyncio
    import re

    import httpx
    from openai import AsyncOpenAI

    import supernet
    from supernet.config import SupernetConfig

    from .conftest import start_server

    demo = SupernetConfig.load(supernet.DEMO_DIR)
    demo_full = state_bytes(demo, ("fa",) * demo.num_hidden_layers, demo.max_position_embeddings)
    max_len = 256
    full = state_bytes(tiny_model.config, ("fa",) * 4, max_len)
    budget = int(4 * 2**30 / demo_full * full)  # ~11 full-length all-fa sequences, like the demo's default
    assert budget < 64 * full / 5
    config = EngineConfig(max_model_len=max_len, max_num_seqs=64, memory_budget=budget)
    server = start_server(tiny_model, tiny_tokenizer, tiny_dir, served_model_name="tiny", engine_config=config)
    srv = next(server)
    try:
        client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)

        async def chat(i: int):
            return await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Tell me story {i}."}], temperature=0
            )

        async def all_chats():
            return await asyncio.gather(*(chat(i) for i in range(64)))

        answers = asyncio.run(all_chats())
        metrics = httpx.get(srv.url + "/metrics").text
    finally:
        next(server, None)
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert all(a.usage.prompt_tokens + a.usage.completion_tokens <= max_len for a in answers)
    assert sum(a.usage.completion_tokens for a in answers) > 64 * 40  # they did run long, not stop at once

    def value(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))

    assert value("supernet_decode_batch_peak") >= 64  # all 64 decoded in one step
    assert value("supernet_cache_blocks_used") == 0 and value("supernet_cache_blocks_free") == budget // 4096
    print("preemptions:", value("supernet_preemptions_total"))
