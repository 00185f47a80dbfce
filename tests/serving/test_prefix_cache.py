"""Prefix caching per preset: a request that shares a prompt prefix with an earlier one on the same preset starts
from the cached state and produces exactly the tokens it would have without the cache; never across presets;
under a small budget entries are evicted instead of requests failing."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from serving.engine import EngineConfig, LLMEngine
from serving.memory import state_bytes
from serving.prefix_cache import block_hashes, root_hash
from serving.sampling import SamplingParams
from serving.types import GenerationRequest
from tests.conftest import free_port
from tests.serving.conftest import wait_until_healthy

from .conftest import CORPUS, start_server

SYSTEM = " ".join(CORPUS)  # the shared prefix, far longer than the tiny model's SWA window (8) + sinks (2)
QUESTIONS = ["What is the fox doing?", "Who is Ishmael?", "Name a preset."]
INTERVAL = 64  # snapshots of SWA/GDN/KDA states every 64 tokens (four 16-token blocks)


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(f"{SYSTEM}\n{q}")["input_ids"] for q in QUESTIONS]


def run(model, tokenizer, reqs: list[GenerationRequest], caching: bool, *, together: int = 0, **config):
    """Requests one after another (each sees what the previous ones cached), the last ``together`` of them all at
    once; greedy tokens and cached prompt tokens per request id, and the engine."""
    cfg = EngineConfig(
        max_model_len=256, prefill_chunk=48, enable_prefix_caching=caching, prefix_cache_interval=INTERVAL
    )
    for name, value in config.items():
        setattr(cfg, name, value)
    engine = LLMEngine(model, tokenizer, cfg)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    alone = len(reqs) - together
    for batch in [[r] for r in reqs[:alone]] + ([reqs[alone:]] if together else []):
        for req in batch:
            engine.add_request(req)
        while engine.has_work():
            for out in engine.step():
                cached[out.request_id] = out.cached_tokens
                for d in out.deltas:
                    tokens.setdefault(out.request_id, []).extend(d.token_ids)
            pool = engine.budget
            assert pool.used_blocks + pool.cached_blocks <= pool.num_blocks  # the cache never exceeds the budget
            if engine.sched.prefix is not None:
                assert pool.cached_blocks == engine.sched.prefix.blocks + sum(
                    g.recording.blocks for g in engine.groups.values() if g.recording is not None
                )
    assert engine.budget.used_blocks == 0 and not engine.groups
    return tokens, cached, engine


def make(model, ids, preset: str, rid: str, placement: str | None = None, **params) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0, "max_tokens": 16, "ignore_eos": True, **params})
    return GenerationRequest(rid, list(ids), model.placement(placement or preset), sampling, preset=preset)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("preset", ["all-fa", "all-swa", "all-gdn", "all-kda", "fa,swa,gdn,kda"])
def test_shared_prefix_outputs_unchanged_and_hit(tiny_model, tiny_tokenizer, preset):
    """Three questions after one long system prompt: with the cache, the 2nd and 3rd start from the cached
    prefix -- every whole block of it on FA-only presets; on presets with fixed-size states the 2nd from the last
    snapshot point (a multiple of the interval), the 3rd from the branch point the 2nd snapshotted -- and every
    request's greedy tokens equal those without the cache."""
    ps = prompts(tiny_tokenizer)
    assert len(ps[0]) > 100

    def reqs() -> list[GenerationRequest]:
        return [make(tiny_model, p, preset, f"q{i}") for i, p in enumerate(ps)]

    plain, no_cache, _ = run(tiny_model, tiny_tokenizer, reqs(), caching=False)
    assert set(no_cache.values()) == {0}
    warm, cached, engine = run(tiny_model, tiny_tokenizer, reqs(), caching=True)
    assert warm == plain
    shared = common_prefix(ps[0], ps[1])
    step = 16 if preset == "all-fa" else INTERVAL
    assert cached["q0"] == 0
    assert cached["q1"] == shared // step * step >= 64
    assert cached["q2"] == common_prefix(ps[2], ps[1]) // 16 * 16
    if step > 16:
        assert cached["q2"] > cached["q1"]  # from the branch point q1 snapshotted


def test_never_across_presets(tiny_model, tiny_tokenizer):
    """The same prompt on another preset -- even one with the very same placement -- finds nothing; on the first
    preset again it hits. Hash roots differ by preset."""
    ids = prompts(tiny_tokenizer)[0]
    reqs = [
        make(tiny_model, ids, "all-fa", "a"),
        make(tiny_model, ids, "all-swa", "b"),
        make(tiny_model, ids, "fa-twin", "c", placement="all-fa"),
        make(tiny_model, ids, "all-fa", "d"),
    ]
    tokens, cached, _ = run(tiny_model, tiny_tokenizer, reqs, caching=True)
    assert cached == {"a": 0, "b": 0, "c": 0, "d": (len(ids) - 1) // 16 * 16}
    assert tokens["c"] == tokens["a"] == tokens["d"]
    fa = tiny_model.placement("all-fa")
    assert block_hashes(root_hash("all-fa", fa), ids, 16, 2) != block_hashes(root_hash("fa-twin", fa), ids, 16, 2)


def test_eviction_under_a_small_budget(tiny_model, tiny_tokenizer):
    """A budget of about three sequences, ten requests with distinct long prompts on a hybrid preset, six one after
    another (the cache fills whatever is free, entries are evicted least recently used first to make room for
    new ones), then four at once (admission and growth evict the rest before anyone would be preempted): every
    request completes with its uncached tokens, the cache costs no preemption, and the pool never holds more than
    its blocks (checked at every step in ``run``)."""
    preset = "fa,swa,gdn,kda"
    ids = prompts(tiny_tokenizer)[0]

    def reqs() -> list[GenerationRequest]:
        return [make(tiny_model, [ids[0]] + ids[1 + i :], preset, f"r{i}", max_tokens=24) for i in range(10)]

    budget = 3 * state_bytes(tiny_model.config, tiny_model.placement(preset), len(ids) + 24 + 16)
    plain, _, ref = run(tiny_model, tiny_tokenizer, reqs(), False, together=4, memory_budget=budget)
    tokens, _, engine = run(tiny_model, tiny_tokenizer, reqs(), True, together=4, memory_budget=budget)
    assert tokens == plain and all(len(t) == 24 for t in tokens.values())
    assert engine.sched.preemptions == ref.sched.preemptions
    prefix = engine.sched.prefix
    assert prefix.evicted > 5 and prefix.stored > prefix.evicted
    assert sum(prefix.seen.values()) == sum(len(e.prompt) for e in prefix.entries.values())  # evictions undone
    assert sum(map(len, prefix.index.values())) == sum(len(e.keys) for e in prefix.entries.values())
    assert engine.budget.cached_blocks == prefix.blocks


def test_prompt_logprobs_and_recompute_stay_uncached(tiny_model, tiny_tokenizer):
    """A request asking for prompt logprobs gets every position's logprob (no cached prefix skips any)."""
    ids = prompts(tiny_tokenizer)[0]
    reqs = [make(tiny_model, ids, "all-fa", "a"), make(tiny_model, ids, "all-fa", "b", prompt_logprobs=1)]
    _, cached, engine = run(tiny_model, tiny_tokenizer, reqs, caching=True)
    assert cached == {"a": 0, "b": 0}
    assert engine.sched.prefix.stored == 1


def test_server_reports_cached_tokens(tiny_model, tiny_tokenizer, tiny_dir):
    """Through the real HTTP server and the official openai client: the second chat with the same system prompt
    reports usage.prompt_tokens_details.cached_tokens, and /metrics counts the queries and hits."""
    from openai import OpenAI

    server = start_server(tiny_model, tiny_tokenizer, tiny_dir, served_model_name="tiny")
    srv = next(server)
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def chat(question: str, **kw):
            return client.chat.completions.create(
                model="tiny",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                max_tokens=8,
                temperature=0,
                **kw,
            )

        first, second = chat(QUESTIONS[0]), chat(QUESTIONS[1])
        chunks = list(chat(QUESTIONS[1], stream=True, stream_options={"include_usage": True}))
        metrics = httpx.get(srv.url + "/metrics").text
    finally:
        next(server, None)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 100 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    streamed = chunks[-1].usage  # the same prompt again, streamed: its last chunk's usage says the same
    assert streamed.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // 16 * 16

    def value(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))

    assert value("supernet_prefix_cache_hits_total") == cached + streamed.prompt_tokens_details.cached_tokens
    assert value("supernet_prefix_cache_queries_total") == first.usage.prompt_tokens + 2 * second.usage.prompt_tokens
    assert value("supernet_prefix_cache_blocks") > 0


def test_no_enable_prefix_caching_flag(tiny_dir):
    """``supernet serve --no-enable-prefix-caching`` (a real process): the same chat twice reuses nothing."""
    from openai import OpenAI

    port = free_port()
    cmd = [sys.executable, "-m", "supernet.cli", "serve", "--model", str(tiny_dir), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--threads", "1", "--no-enable-prefix-caching"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
        usages = [
            client.chat.completions.create(model="tiny-supernet", messages=messages, max_tokens=4).usage
            for _ in range(2)
        ]
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.kill()
        proc.wait(30)
    assert [u.prompt_tokens_details.cached_tokens for u in usages] == [0, 0]
    assert usages[0].prompt_tokens > 100
    assert "supernet_prefix_cache_queries_total{" not in metrics  # nothing was looked up
