"""Self-speculative decoding: a cheap preset of the same checkpoint drafts, the requested preset verifies.

Both presets are placements of one set of weights, so the draft costs no memory for weights, only its own
per-layer caches (``Speculation.state``). One engine step for a batch that holds speculating rows:

1. one forward for every draft (the tokens it has not seen yet: the pending token, plus the last accepted draft
   when the previous step accepted them all) *and* every plain row's decode token -- rows on different presets
   share forwards, as everywhere in this engine -- then ``k - 1`` more draft forwards, one token each;
2. one forward of the target over ``k + 1`` positions per speculating row (the pending token and the k drafts),
   which gives the target's logits at every drafted position at once;
3. acceptance (``spec_sampling.verify``), then rollback of both states to the last accepted position
   (``spec_rollback.Checkpoint``: FA truncates, SWA restores its ring slots, GDN/KDA take the recorded state of
   that position). Rows of unequal length in one forward are padded and rolled back the same way.

k is chosen per sequence and per step from its running acceptance (``spec_policy``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from serving.runner import ModelRunner
from serving.sampling import TokenLogprobs, sample, top_logprobs
from serving.spec_policy import DraftPlan, SpecConfig, best_k, step_bytes
from serving.spec_rollback import Checkpoint
from serving.spec_sampling import draft_token, verify
from serving.types import EngineError, GenerationRequest, SpecUsage
from supernet.cache import SequenceState


@dataclass
class Speculation:
    """One sequence's draft: its caches, its acceptance history, and its usage counters."""

    draft: str  # draft preset name
    state: SequenceState | None
    cost_ratio: float  # draft step / verify step (spec_policy.step_bytes at the request's context)
    k_limit: int
    lag: list[int] = field(default_factory=list)  # accepted tokens the draft has not consumed yet
    accepted_w: float = 0.0  # decayed counts behind the running acceptance rate
    trials_w: float = 0.0
    skip: tuple[int, int] = (0, 0)  # prompt positions the draft's prefill can leave out (see SpeculativeDecoder)
    pause: int = 0  # steps left without speculating
    forced: bool = False  # the request asked for speculation: k >= 1 even where the cost model says no
    usage: SpecUsage = field(default_factory=SpecUsage)

    def fork(self) -> Speculation:
        twin = copy.copy(self)
        assert self.state is not None, "forked before its caches were freed"
        twin.state, twin.lag, twin.usage = self.state.clone(), list(self.lag), SpecUsage(draft=self.draft)
        return twin

    def plan(self, config: SpecConfig, remaining: int) -> int:
        """k for this step (0 = decode plainly this step)."""
        limit = min(self.k_limit, remaining - 1)
        if limit < 1:
            return 0
        if not config.adaptive:
            return min(config.k_start, limit)
        if self.pause:
            self.pause -= 1
            return 0 if self.pause else 1  # a paused sequence probes with k = 1
        a0, n0 = config.prior
        rate = (self.accepted_w + a0) / (self.trials_w + n0)
        k, _ = best_k(rate, self.cost_ratio, limit)
        if k == 0 and self.forced:
            return 1
        if k == 0:
            self.pause = config.probe_every
        return k

    def update(self, config: SpecConfig, k: int, accepted: int) -> None:
        trials = accepted + (accepted < k)  # drafts judged: every accepted one and the first rejected one
        self.accepted_w = config.decay * self.accepted_w + accepted
        self.trials_w = config.decay * self.trials_w + trials
        u = self.usage
        u.draft_tokens += k
        u.accepted_tokens += accepted
        u.verify_steps += 1
        u.emitted_tokens += accepted + 1


@dataclass
class Emission:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]
    drafted: int = 0  # drafts verified this step (0: decoded plainly)
    accepted: int = 0


Row = tuple[SequenceState, list[int], Checkpoint | None]  # a state, the tokens it takes, its open window


def ragged_forward(runner: ModelRunner, rows: Sequence[Row]) -> list[Tensor]:
    """One forward over rows of unequal length: short rows are padded (repeating their last token) and rolled
    back to their real tokens afterwards. Returns each row's logits [len, V]."""
    width = max(len(t) for _, t, _ in rows)
    padded = [t + t[-1:] * (width - len(t)) for _, t, _ in rows]
    logits = runner.forward(padded, [s for s, _, _ in rows], last_only=width == 1)
    out = []
    for (_, tokens, ck), row in zip(rows, logits, strict=True):
        if len(tokens) < width:
            assert ck is not None, "a padded row needs a checkpoint to take its padding back"
            ck.rollback(ck.fed - (width - len(tokens)))
        out.append(row[: len(tokens)])
    return out


def _logprobs(logits: Tensor, tokens: list[int], k: int | None) -> list[TokenLogprobs | None]:
    if k is None:
        return [None] * len(tokens)
    return list(top_logprobs(torch.log_softmax(logits, dim=-1), torch.tensor(tokens), k))


class SpeculativeDecoder:
    """The engine's speculative side; ``LLMEngine`` calls these hooks (sequences are engine ``Sequence``s)."""

    def __init__(self, runner: ModelRunner, config: SpecConfig) -> None:
        self.runner, self.config = runner, config
        # Every window (k + 1 tokens, padding included) must fit in an SWA ring: rollback copies its slots.
        window = runner.model.config.swa.window
        self.k_cap = config.k_max if window is None else min(config.k_max, window - 1)

    # ---- per request ------------------------------------------------------------------------------------

    def plan_for(self, request: GenerationRequest) -> DraftPlan | None:
        """The draft a request speculates with, or None; raises when it asks for speculation that cannot be."""
        plan = self.config.drafts.get(request.preset)
        if request.speculative is False:
            return None
        if plan is None:
            if request.speculative:
                raise EngineError(
                    f"speculative decoding is not available for preset {request.preset!r}: it has no draft "
                    "preset (set `draft:` for it in presets.yaml)"
                )
            return None
        if request.speculative is None and (
            plan.from_context is None or len(request.prompt_ids) < plan.from_context
        ):
            return None
        return plan

    def start(self, request: GenerationRequest, plan: DraftPlan) -> Speculation:
        """The draft's empty caches for a request just admitted (its prompt is prefilled with the target's)."""
        total = len(request.prompt_ids) + request.params.max_tokens
        model = self.runner.model
        ratio = step_bytes(model, plan.placement, total) / step_bytes(model, request.placement, total)
        state = self.runner.new_state(plan.placement)  # FA room comes with the scheduler's blocks
        sp = Speculation(plan.draft, state, ratio, self.k_cap, forced=request.speculative is True)
        sp.usage.draft = plan.draft
        sp.skip = self._skip(plan, len(request.prompt_ids))
        return sp

    def restart(self, sp: Speculation, plan: DraftPlan, length: int) -> None:
        """After a preemption: empty draft caches, to be prefilled with the sequence's first ``length`` tokens
        again (prompt and output alike; the draft then has nothing left to catch up on)."""
        sp.state, sp.lag, sp.skip = self.runner.new_state(plan.placement), [], self._skip(plan, length)

    def _skip(self, plan: DraftPlan, length: int) -> tuple[int, int]:
        if set(plan.placement) != {"swa"}:
            return (0, 0)
        cfg = self.runner.model.config
        reach = (cfg.num_hidden_layers + 1) * (cfg.swa.window or 0)  # how far back the last keys depend
        return (cfg.swa.sinks, max(cfg.swa.sinks, length - reach))

    def prefill(self, sp: Speculation, start: int, chunk: list[int]) -> None:
        """Feed the draft its part of the prompt chunk at positions [start, start + len(chunk)).

        A draft made only of SWA layers needs just the attention sinks and the last ``layers x window``
        prompt tokens: a key at layer l depends on at most ``l + 1`` windows of tokens before it, so its caches
        at the end of the prompt are the same whether or not the middle was fed (the ring holds absolute
        positions, and the skipped ones are simply absent). For a 32k prompt and the demo's all-SWA draft that
        is 7.7k tokens of draft prefill instead of 32k. Any other draft takes the whole prompt."""
        lo, hi = sp.skip
        end = start + len(chunk)
        assert sp.state is not None
        for a, b in ((start, min(end, lo)), (max(start, hi), end)) if hi > lo else ((start, end),):
            if a < b:
                sp.state.length = a  # jump over skipped positions: rotary and the ring use absolute ones
                self.runner.forward([chunk[a - start : b - start]], [sp.state])

    # ---- one decode step ------------------------------------------------------------------------------

    def step(self, seqs: list[Any]) -> list[Emission]:
        """Decode every running sequence (speculating or not) by at least one token."""
        cfg = self.config
        ks = [s.spec.plan(cfg, s.params.max_tokens - len(s.output_ids)) if s.spec else 0 for s in seqs]
        spec = [i for i, k in enumerate(ks) if k > 0]
        plain = [i for i, k in enumerate(ks) if k == 0]
        for i in spec:  # a draft that sat out several steps catches up first (those tokens are final)
            sp = seqs[i].spec
            if len(sp.lag) > 1:
                self.runner.forward([sp.lag[:-1]], [sp.state])
                sp.lag = sp.lag[-1:]
        # 1. every draft's first step and every plain row's decode, in one forward
        first = [seqs[i].spec.lag + [seqs[i].pending] for i in spec] + [[seqs[i].pending] for i in plain]
        width = max(len(t) for t in first)
        d_ck = {i: Checkpoint(seqs[i].spec.state, max(len(seqs[i].spec.lag) + ks[i], width)) for i in spec}
        p_ck = {i: Checkpoint(seqs[i].state, width) for i in plain} if width > 1 else {}
        rows: list[Row] = [(seqs[i].spec.state, t, d_ck[i]) for i, t in zip(spec, first, strict=False)]
        rows += [(seqs[i].state, t, p_ck.get(i)) for i, t in zip(plain, first[len(spec) :], strict=True)]
        logits = ragged_forward(self.runner, rows)
        drafts: dict[int, list[int]] = {i: [] for i in spec}
        probs: dict[int, list[Tensor | None]] = {i: [] for i in spec}
        last = {i: logits[n][-1] for n, i in enumerate(spec)}
        while True:
            for i in last:
                d, q = draft_token(last[i], seqs[i].params, seqs[i].generator)
                drafts[i].append(d)
                probs[i].append(q)
            active = [i for i in last if len(drafts[i]) < ks[i]]
            if not active:
                break
            out = self.runner.forward([[drafts[i][-1]] for i in active], [seqs[i].spec.state for i in active])
            last = {i: out[n, -1] for n, i in enumerate(active)}
        # 2. the target verifies k + 1 positions per speculating row in one forward
        span = max((ks[i] + 1 for i in spec), default=0)
        t_ck = {i: Checkpoint(seqs[i].state, span) for i in spec}
        rows = [(seqs[i].state, [seqs[i].pending] + drafts[i], t_ck[i]) for i in spec]
        target = dict(zip(spec, ragged_forward(self.runner, rows), strict=True)) if spec else {}
        # 3. accept, roll back, emit
        result: dict[int, Emission] = {}
        for i in spec:
            seq, sp, k = seqs[i], seqs[i].spec, ks[i]
            verdict = verify(target[i], drafts[i], probs[i], seq.params, seq.generator)
            j = verdict.accepted
            t_ck[i].rollback(j + 1)  # the pending token and the accepted drafts
            d_ck[i].rollback(len(sp.lag) + 1 + min(j, k - 1))  # the draft never consumed its last draft
            sp.lag = drafts[i][-1:] if j == k else []
            sp.update(cfg, k, j)
            lps = _logprobs(target[i][: j + 1], verdict.tokens, seq.params.logprobs)
            result[i] = Emission(verdict.tokens, lps, k, j)
        for ck in (*t_ck.values(), *d_ck.values(), *p_ck.values()):
            ck.close()
        if plain:
            rows_logits = torch.stack([logits[len(spec) + n][-1] for n in range(len(plain))])
            tokens, lps = sample(rows_logits, [seqs[i].params for i in plain], [seqs[i].generator for i in plain])
            for i, t, lp in zip(plain, tokens, lps, strict=True):
                if seqs[i].spec is not None:  # a paused draft falls behind by the token decoded without it
                    seqs[i].spec.lag.append(seqs[i].pending)
                result[i] = Emission([t], [lp])
        return [result[i] for i in range(len(seqs))]
