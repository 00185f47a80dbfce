"""Self-speculative decoding in the embedded engine: lossless greedy output, the target's distribution when
sampling, exact rollback of every cache type, the k policy, and the counters it reports."""

from __future__ import annotations

import pytest
import torch

from serving.engine import EngineConfig, LLMEngine
from serving.sampling import SamplingParams, warped_probs
from serving.spec_policy import DraftPlan, SpecConfig, best_k
from serving.spec_rollback import Checkpoint
from serving.types import EngineError, GenerationRequest

PROMPT = "It is a truth universally acknowledged, that a single man in possession"


def spec_config(model, pairs: dict[str, str], **options) -> SpecConfig:
    options.setdefault("adaptive", False)  # fixed k: the tiny model's draft is never cheaper (see spec_policy)
    return SpecConfig(drafts={t: DraftPlan(d, model.placement(d)) for t, d in pairs.items()}, **options)


def run(model, tokenizer, requests, speculative: SpecConfig | None = None, max_num_seqs: int = 32):
    """requests: (id, prompt ids, preset, speculative flag, SamplingParams kwargs) -> tokens, usage per id."""
    engine = LLMEngine(
        model,
        tokenizer,
        EngineConfig(max_model_len=256, prefill_chunk=16, max_num_seqs=max_num_seqs, speculative=speculative),
    )
    for rid, ids, preset, flag, params in requests:
        params = {"temperature": 0, "ignore_eos": True, **params}
        engine.add_request(
            GenerationRequest(rid, ids, model.placement(preset), SamplingParams(**params), preset, speculative=flag)
        )
    tokens: dict[str, dict[int, list[int]]] = {}
    usage = {}
    while engine.has_work():
        for out in engine.step():
            for d in out.deltas:
                tokens.setdefault(out.request_id, {}).setdefault(d.index, []).extend(d.token_ids)
            if out.finished:
                usage[out.request_id] = out.speculative
    assert engine.budget.used == 0
    return tokens, usage


PAIRS = [  # (target, draft)
    ("all-fa", "all-swa"),  # partly accepted
    ("all-fa", "all-fa"),  # the target drafting for itself: every draft accepted (the catch-up path)
    ("all-fa", "fa-every-4:gdn"),  # rejected at the first token on every step
    ("fa-every-4:swa", "all-swa"),
    ("all-gdn", "all-kda"),
    ("all-kda", "swa-every-2:gdn"),
    ("swa-every-2:gdn", "all-gdn"),
]


@pytest.mark.parametrize("target,draft", PAIRS)
def test_greedy_output_is_unchanged(tiny_model, tiny_tokenizer, target, draft):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    req = [("a", ids, target, None, {"max_tokens": 40}), ("b", ids[:7], target, None, {"max_tokens": 25})]
    plain, _ = run(tiny_model, tiny_tokenizer, req)
    cfg = spec_config(tiny_model, {target: draft}, k_start=4)
    spec, usage = run(tiny_model, tiny_tokenizer, [(*r[:3], True, r[4]) for r in req], cfg)
    assert spec == plain
    u = usage["a"]
    assert u.draft == draft and u.verify_steps > 0 and u.emitted_tokens == u.accepted_tokens + u.verify_steps
    if draft == target:
        assert u.accepted_tokens == u.draft_tokens
    if draft == "fa-every-4:gdn":  # every draft rejected at its first token, and still the same output
        assert u.accepted_tokens == 0 and u.emitted_tokens == u.verify_steps


def test_greedy_mixed_batch(tiny_model, tiny_tokenizer):
    """Speculating and plain sequences, several targets and drafts, n = 2 forks, uneven k (the last tokens of a
    request bound k) and prompts of several lengths share every step; each output is its plain greedy output."""
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    reqs = [
        ("fa-spec", ids, "all-fa", True, {"max_tokens": 30}),
        ("fa-plain", ids[:9], "all-fa", False, {"max_tokens": 30}),
        ("gdn-spec", ids[:5], "all-gdn", True, {"max_tokens": 17, "n": 2}),
        ("kda-plain", ids[:12], "all-kda", None, {"max_tokens": 21}),
        ("hybrid-spec", ids[:3], "fa-every-4:swa", True, {"max_tokens": 26}),
        ("self-spec", ids[:6], "swa-every-2:gdn", True, {"max_tokens": 19}),
    ]
    plain, _ = run(tiny_model, tiny_tokenizer, [(*r[:3], False, r[4]) for r in reqs])
    cfg = spec_config(
        tiny_model,
        {"all-fa": "all-swa", "all-gdn": "all-kda", "fa-every-4:swa": "all-swa", "swa-every-2:gdn": "swa-every-2:gdn"},
        k_start=5,
    )
    spec, usage = run(tiny_model, tiny_tokenizer, reqs, cfg)
    assert spec == plain
    assert usage["fa-plain"] is None and usage["kda-plain"] is None  # off by request, off by default
    assert usage["gdn-spec"].verify_steps > 0 and usage["self-spec"].acceptance_rate == 1.0


def _same(a, b) -> bool:
    """Two SequenceStates hold bit-identical caches (FA up to its length, SWA ring with positions, GDN/KDA)."""
    assert a.length == b.length
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("k", "v", "pos", "conv", "recurrent"):
            if not hasattr(x, name):
                continue
            tx, ty = getattr(x, name), getattr(y, name)
            if hasattr(x, "length"):
                tx, ty = tx[:, : x.length], ty[:, : y.length]
            if tx.dtype != ty.dtype or not torch.equal(tx, ty):
                return False
    return True


def test_rollback_is_exact(tiny_model):
    """fp32, one layer of each kind, 21 positions cached (the SWA ring of 8 has wrapped). A verify window of four
    tokens whose last two are rejected, rolled back, equals bit for bit a run that never saw those two tokens:
    the same window holding other tokens there (as a padded row in a batch does) and rolled back. (A run fed the
    kept tokens alone differs in the last bits only because fp32 matmul rows depend on the number of rows --
    checked below to 1e-5 -- which no k + 1-token verify pass can avoid.) Both then decode identically."""
    model = tiny_model
    assert model.embed_tokens.weight.dtype == torch.float32
    prefix = torch.randint(3, model.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(0))
    base = model.new_state("fa,swa,gdn,kda")
    with torch.inference_mode():
        model(prefix, states=[base])
        seen, unseen, stepwise = base.clone(), base.clone(), base.clone()
        for state, window in ((seen, [5, 6, 7, 8]), (unseen, [5, 6, 41, 42])):
            ck = Checkpoint(state, 4)
            model(torch.tensor([window]), states=[state])
            ck.rollback(2)
            ck.close()
        for token in (5, 6):
            model(torch.tensor([[token]]), states=[stepwise])
        assert _same(seen, unseen)
        assert seen.length == 23
        for x, y in zip(seen.layers, stepwise.layers, strict=True):
            for name in ("k", "v", "conv", "recurrent"):
                if hasattr(x, name):
                    tx, ty = getattr(x, name), getattr(y, name)
                    n = getattr(x, "length", tx.shape[1])
                    torch.testing.assert_close(tx[:, :n], ty[:, :n], atol=1e-5, rtol=0)
        # the restored SWA ring: the slots of positions 21, 22 hold them again, the others their old keys
        ring = seen.layers[1]
        assert sorted(ring.pos.tolist()) == [0, 1, *range(15, 23)]
        out_seen = model(torch.tensor([[9]]), states=[seen]).logits
        out_unseen = model(torch.tensor([[9]]), states=[unseen]).logits
        assert torch.equal(out_seen, out_unseen) and _same(seen, unseen)


def test_rollback_to_the_window_start(tiny_model):
    """Keeping nothing restores the checkpoint itself, bit for bit, for every layer type."""
    state = tiny_model.new_state("kda,swa,fa,gdn")
    with torch.inference_mode():
        tiny_model(torch.arange(3, 15)[None], states=[state])
        before = state.clone()
        ck = Checkpoint(state, 3)
        tiny_model(torch.tensor([[20, 21, 22]]), states=[state])
        ck.rollback(0)
        ck.close()
    assert _same(state, before)
    with pytest.raises(ValueError, match="window"):
        Checkpoint(state, tiny_model.config.swa.window + 1)


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square p-value, cells with expected count < 5 pooled (torch's regularised gamma)."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


def test_sampled_tokens_follow_the_target_distribution(tiny_model, tiny_tokenizer):
    """3,840 seeded samples of three tokens (temperature 0.8, top-k 3: 27 outcomes) from all-fa drafted by
    all-swa, which accepts about half the drafts: the second and third tokens come from verify steps (accepted
    drafts, residual draws after rejections, bonus tokens). Their joint frequencies match the target's own
    probabilities, computed exactly from the model: Pearson chi-square, significance level 0.001."""
    target, draft, params = "all-fa", "all-swa", {"temperature": 0.8, "top_k": 3}
    ids = tiny_tokenizer("It is a truth universally")["input_ids"]
    reqs = [(f"r{i}", ids, target, True, {**params, "max_tokens": 3, "n": 64, "seed": 1000 * i}) for i in range(60)]
    tokens, usage = run(tiny_model, tiny_tokenizer, reqs, spec_config(tiny_model, {target: draft}, k_start=2), 64)
    drafted = sum(u.draft_tokens for u in usage.values())
    accepted = sum(u.accepted_tokens for u in usage.values())
    assert 0.2 < accepted / drafted < 0.8  # both branches (accept, reject) are exercised
    sp = SamplingParams(**params)

    def probs(prefix: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = tiny_model(torch.tensor([ids + prefix]), target, num_logits_to_keep=1).logits[0, -1]
        return warped_probs(logits.float(), sp).double()

    p1 = probs([])
    expected: dict[tuple[int, ...], float] = {}
    for a in p1.nonzero()[:, 0].tolist():
        p2 = probs([a])
        for b in p2.nonzero()[:, 0].tolist():
            p3 = probs([a, b])
            for c in p3.nonzero()[:, 0].tolist():
                expected[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    counts = dict.fromkeys(expected, 0)
    samples = [tuple(seq) for per_request in tokens.values() for seq in per_request.values()]
    for s in samples:
        assert s in counts, f"{s} has probability 0 under the target"
        counts[s] += 1
    n = len(samples)
    assert n == 3840
    cells = list(expected)
    p_value = _chi_square_p(
        torch.tensor([counts[c] for c in cells], dtype=torch.float64),
        torch.tensor([expected[c] * n for c in cells], dtype=torch.float64),
    )
    assert p_value > 0.001, p_value


def test_seeded_sampling_is_reproducible(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    cfg = spec_config(tiny_model, {"all-fa": "all-swa"}, k_start=3)
    req = [("s", ids, "all-fa", True, {"temperature": 1.0, "seed": 7, "max_tokens": 24, "n": 2})]
    first, usage = run(tiny_model, tiny_tokenizer, req, cfg)
    again, _ = run(tiny_model, tiny_tokenizer, req, cfg)
    assert first == again and first["s"][0] != first["s"][1] and usage["s"].verify_steps > 0


def test_k_follows_acceptance():
    assert best_k(0.95, 0.2, 8)[0] >= 5  # a cheap, accurate draft drafts far
    assert best_k(0.5, 0.2, 8)[0] in (1, 2, 3)
    assert best_k(0.1, 0.5, 8) == (0, 1.0)  # nothing pays: pause
    assert best_k(0.9, 1.0, 8)[0] == 0  # a draft as costly as the target never pays


def test_speculation_needs_a_draft(tiny_model, tiny_tokenizer):
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(max_model_len=256))
    req = GenerationRequest("x", [5, 6], tiny_model.placement("all-fa"), SamplingParams(), "all-fa", speculative=True)
    with pytest.raises(EngineError, match="no draft preset"):
        engine.add_request(req)


def test_http_request_field_usage_and_metrics(server, client):
    """Through the OpenAI client: ``speculative`` on/off per request (greedy output unchanged), the counters in
    the response's usage (non-streaming and streaming), and per-preset acceptance in /metrics."""
    import httpx
    import openai

    kwargs = {"model": "tiny:all-fa", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    on = client.completions.create(**kwargs, extra_body={"speculative": True, "ignore_eos": True})
    off = client.completions.create(**kwargs, extra_body={"speculative": False, "ignore_eos": True})
    assert on.choices[0].text == off.choices[0].text
    spec = on.usage.model_extra["speculative"]
    assert spec["draft"] == server.engine.spec.config.drafts["all-fa"].draft
    assert spec["verify_steps"] > 0 and 0 <= spec["acceptance_rate"] <= 1
    assert spec["tokens_per_verify_step"] == pytest.approx(1 + spec["accepted_tokens"] / spec["verify_steps"], abs=1e-3)
    assert "speculative" not in (off.usage.model_extra or {})
    stream = client.chat.completions.create(
        model="tiny:all-fa",
        messages=[{"role": "user", "content": "Call me Ishmael."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"speculative": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage and usage[-1].model_extra["speculative"]["verify_steps"] > 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'supernet_spec_decode_acceptance_rate{preset="all-fa"}' in metrics
    assert 'supernet_spec_decode_tokens_per_verify_step{preset="all-fa"}' in metrics
    with pytest.raises(openai.BadRequestError, match="speculative"):
        client.completions.create(**kwargs, extra_body={"vllm_xargs": {"speculative": "yes"}})


def test_all_swa_draft_prefill_skips_the_middle_of_the_prompt(tiny_model, tiny_tokenizer):
    """An all-SWA draft takes only the sinks and the last (layers + 1) x window prompt tokens: its caches at the
    end of a 120-token prompt equal those of a full prefill (to fp32 rounding), with 70 positions never fed."""
    from serving.runner import ModelRunner
    from serving.spec_decode import SpeculativeDecoder

    ids = (tiny_tokenizer(PROMPT * 4)["input_ids"] * 3)[:120]
    runner = ModelRunner(tiny_model)
    dec = SpeculativeDecoder(runner, spec_config(tiny_model, {"all-fa": "all-swa"}))
    req = GenerationRequest("x", ids, tiny_model.placement("all-fa"), SamplingParams(max_tokens=4), "all-fa", True)
    sp = dec.start(req, dec.config.drafts["all-fa"])
    assert sp.skip == (2, 120 - 5 * 8)
    for start in range(0, len(ids), 16):
        dec.prefill(sp, start, ids[start : start + 16])
    full = runner.new_state(tiny_model.placement("all-swa"), 130)
    runner.forward([ids], [full])
    assert sp.state.length == full.length == 120
    for x, y in zip(sp.state.layers, full.layers, strict=True):
        assert torch.equal(x.pos, y.pos)
        torch.testing.assert_close(x.k, y.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(x.v, y.v, atol=1e-5, rtol=0)


def test_k_policy_pauses_and_probes():
    """A sequence whose drafts keep failing stops drafting, then probes with k = 1 after probe_every steps; one
    whose drafts are accepted drafts further. A request that asked for speculation never pauses."""
    from serving.spec_decode import Speculation

    cfg = SpecConfig(probe_every=4)
    good, bad = Speculation("d", None, 0.2, 6), Speculation("d", None, 0.5, 6)  # (draft, state, cost ratio, k cap)
    for _ in range(10):
        good.update(cfg, good.plan(cfg, 100), 6)
    assert good.plan(cfg, 100) == 6 and good.plan(cfg, 3) == 2  # bounded by the tokens left
    ks = []
    for _ in range(12):
        k = bad.plan(cfg, 100)
        ks.append(k)
        if k:
            bad.update(cfg, k, 0)
    assert ks[:3] != [0, 0, 0] and 0 in ks and ks.count(0) >= 6  # pauses, and comes back to probe
    assert any(a == 0 and b == 1 for a, b in zip(ks, ks[1:], strict=False))
    forced = Speculation("d", None, 0.5, 6, forced=True)
    for _ in range(6):
        forced.update(cfg, forced.plan(cfg, 100), 0)
    assert forced.plan(cfg, 100) == 1


def test_on_by_default_from_a_context_length(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    cfg = SpecConfig(drafts={"all-fa": DraftPlan("all-swa", tiny_model.placement("all-swa"), from_context=10)})
    cfg.adaptive = False
    reqs = [(name, ids[:n], "all-fa", None, {"max_tokens": 6}) for name, n in (("long", 12), ("short", 8))]
    _, usage = run(tiny_model, tiny_tokenizer, reqs, cfg)
    assert usage["long"].verify_steps > 0 and usage["short"] is None


def test_drafts_from_presets_yaml(tiny_model, tmp_path):
    from serving.presets import PresetError, load_presets_file
    from serving.spec_policy import spec_config_from_presets

    path = tmp_path / "presets.yaml"
    path.write_text(
        "presets:\n"
        "  - {name: exact, placement: all-fa, draft: quick, speculative_from_context: 4096}\n"
        "  - {name: quick, placement: all-swa}\n"
        "  - {name: mid, placement: fa-every-4:gdn}\n"
    )
    table = load_presets_file(path, tiny_model.config.num_hidden_layers)
    cfg = spec_config_from_presets(tiny_model, table, 256)
    assert cfg.drafts["exact"] == DraftPlan("quick", tiny_model.placement("all-swa"), 4096)
    assert cfg.drafts["mid"].from_context is None  # a default draft is never on by default
    path.write_text("presets:\n  - {name: exact, placement: all-fa, draft: nope}\n")
    with pytest.raises(PresetError, match="draft 'nope'"):
        load_presets_file(path, tiny_model.config.num_hidden_layers)
