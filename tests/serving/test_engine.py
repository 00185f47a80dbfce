"""The engine driven directly (no HTTP): chunked prefill, admission by memory, forks, aborts, stop strings."""

from __future__ import annotations

import pytest

from serving.detokenizer import IncrementalDetokenizer
from serving.engine import EngineConfig, LLMEngine
from serving.memory import state_bytes
from serving.sampling import SamplingParams
from serving.types import GenerationRequest, RequestTooLarge
from supernet.generate import greedy_generate


def run_all(engine: LLMEngine) -> dict[str, dict[int, list[int]]]:
    tokens: dict[str, dict[int, list[int]]] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for out in engine.step():
            for d in out.deltas:
                tokens.setdefault(out.request_id, {}).setdefault(d.index, []).extend(d.token_ids)
    return tokens


def request(model, rid, ids, preset, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    return GenerationRequest(rid, ids, model.placement(preset), SamplingParams(**params), preset=preset)


@pytest.mark.parametrize("preset", ["all-fa", "all-swa", "all-gdn", "all-kda", "fa-every-4:swa"])
def test_chunked_prefill_equals_one_shot(tiny_model, tiny_tokenizer, preset):
    """A 90-token prompt fed in 16-token chunks (crossing the SWA window of 8 several times) continues
    exactly like a single prefill."""
    ids = tiny_tokenizer(" ".join(["It is a truth universally acknowledged"] * 3))["input_ids"][:90]
    ref = greedy_generate(tiny_model, ids, preset, 20, [tiny_tokenizer.eos_token_id])
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256, prefill_chunk=16))
    engine.add_request(request(tiny_model, "a", ids, preset, max_tokens=20))
    assert run_all(engine)["a"][0] == ref


def test_cache_estimate_is_exact(tiny_model, tiny_tokenizer):
    """What admission reserves is what the cache really holds (FA grows to it, SWA/GDN/KDA are fixed)."""
    ids = tiny_tokenizer("Call me Ishmael.")["input_ids"]
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256))
    engine.add_request(request(tiny_model, "a", ids, "fa,swa,gdn,kda", max_tokens=20, ignore_eos=True))
    engine.step()
    state = engine.groups["a"].seqs[0].state
    while "a" in engine.groups:
        assert state.nbytes() == state_bytes(tiny_model.config, state.placement, state.length)
        engine.step()
    assert state.length == len(ids) + 19  # the last sampled token is never fed back
    assert engine.budget.used == 0


def test_admission_is_by_cache_blocks_needed_now(tiny_model, tiny_tokenizer):
    """Admission takes what a request holds now (its prompt's blocks), not its full length: two all-fa requests
    whose full lengths do not fit together both run; a GDN state is fixed-size, so the same pool holds more."""
    cfg = tiny_model.config
    ids = tiny_tokenizer("Call me Ishmael.")["input_ids"]
    full = len(ids) + 200
    fa_need = state_bytes(cfg, ("fa",) * 4, full)
    assert 4 * state_bytes(cfg, ("gdn",) * 4, full) < fa_need  # a GDN state does not grow with length
    engine = LLMEngine(
        tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256, memory_budget=int(1.5 * fa_need))
    )
    for rid in ("fa1", "fa2"):
        engine.add_request(request(tiny_model, rid, ids, "all-fa", max_tokens=200, ignore_eos=True))
    for i in range(4):
        engine.add_request(request(tiny_model, f"gdn{i}", ids, "all-gdn", max_tokens=200, ignore_eos=True))
    engine.step()
    assert set(engine.groups) == {"fa1", "fa2"} | {f"gdn{i}" for i in range(4)}
    assert engine.budget.used < fa_need  # blocks for the prompts, not for 2 x 200 more tokens
    for rid in list(engine.groups):
        engine.abort(rid)
    engine.step()
    assert engine.budget.used == 0 and not engine.groups and not engine.has_work()


def test_request_that_never_fits_is_refused(tiny_model, tiny_tokenizer):
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256, memory_budget=10_000))
    with pytest.raises(RequestTooLarge, match="cache budget is 0.0 MiB"):
        engine.add_request(request(tiny_model, "x", [5, 6, 7], "all-fa", max_tokens=200))
    with pytest.raises(RequestTooLarge, match="maximum context length is 256"):
        engine.add_request(request(tiny_model, "y", [5] * 250, "all-gdn", max_tokens=10))


def test_n_samples_fork_one_prefill(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer("To be, or not to be")["input_ids"]
    ref = greedy_generate(tiny_model, ids, "all-kda", 12, [tiny_tokenizer.eos_token_id])
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256))
    engine.add_request(request(tiny_model, "g", ids, "all-kda", max_tokens=12, n=3))
    engine.add_request(request(tiny_model, "s", ids, "all-kda", max_tokens=12, n=3, temperature=1.0, seed=5))
    out = run_all(engine)
    assert [out["g"][i] for i in range(3)] == [ref] * 3
    assert len({tuple(out["s"][i]) for i in range(3)}) > 1


def test_abort_frees_cache(tiny_model, tiny_tokenizer):
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256))
    ids = tiny_tokenizer("Call me Ishmael.")["input_ids"]
    engine.add_request(request(tiny_model, "a", ids, "all-fa", max_tokens=100, ignore_eos=True))
    engine.add_request(request(tiny_model, "b", ids, "all-swa", max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.budget.used > 0
    engine.abort("a")
    outs = engine.step()
    a = next(o for o in outs if o.request_id == "a")
    assert a.finished and a.deltas[-1].finish_reason == "abort"
    assert "a" not in engine.groups and all(s.group.request.request_id == "b" for s in engine.running)
    run_all(engine)
    assert engine.budget.used == 0


def test_detokenizer_stop_string_across_tokens(tiny_tokenizer):
    text = "the quick brown fox jumps"
    ids = tiny_tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tokenizer, [], stop=["own f"])
    sent, stopped = "", False
    for t in ids:
        stopped = detok.add(t)
        sent += detok.take(stopped)
        if stopped:
            break
    assert stopped and sent == "the quick br" and detok.text == "the quick br"
    # no stop string: streamed pieces add up to the plain decode
    detok = IncrementalDetokenizer(tiny_tokenizer, [], stop=[])
    assert "".join(detok.take(False) for t in ids if not detok.add(t)) + detok.take(True) == text


def test_decode_head_cache_matches_and_follows_weight_updates(tiny_model):
    """The batch-1 output projection (a cached transposed head, SupernetForCausalLM._logits) gives the plain
    head's logits, and an in-place weight update is seen on the next call."""
    import torch

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        fast = tiny_model(ids[:, -1:], "all-fa").logits  # 1 row: cached transpose
        rows = tiny_model.SMALL_HEAD_ROWS
        try:
            tiny_model.SMALL_HEAD_ROWS = 0
            plain = tiny_model(ids[:, -1:], "all-fa").logits
        finally:
            tiny_model.SMALL_HEAD_ROWS = rows
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
        head = tiny_model.lm_head.weight if tiny_model.lm_head is not None else tiny_model.embed_tokens.weight
        head.mul_(2.0)
        try:
            doubled = tiny_model(ids[:, -1:], "all-fa").logits
        finally:
            head.mul_(0.5)
        torch.testing.assert_close(doubled, 2 * fast, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(tiny_model(ids[:, -1:], "all-fa").logits, fast, atol=1e-5, rtol=0)
