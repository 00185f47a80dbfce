"""Who runs and who holds which cache blocks: admission, growth as sequences decode, preemption.

* **Admission** (FIFO, oldest first) takes a request when the batch has room and the pool can give every one of
  its sequences the blocks for what it holds *now* (its prompt, plus the tokens a step may write) while
  ``watermark`` blocks stay free (1% of the pool, vLLM's default): headroom so that admitting does not force a
  preemption at the very next step. Nothing is reserved for ``max_tokens``.
* **Growth**: before each decode step every running sequence gets the blocks for the tokens that step may write
  (one, or ``k + 1`` when it verifies k drafts), oldest request first. Its FA tensors grow with the blocks
  (``KVCache.reserve``); the blocks run ahead by 1/8 of what it holds when the pool can spare them, so a long
  sequence copies its KV a bounded number of times, not once per block.
* **Preemption**: when the pool cannot give a sequence its next blocks, the *youngest* admitted request (latest
  arrival, possibly the one asking) is preempted: its caches are dropped, its blocks freed, and it goes back to
  the front of the queue. When readmitted it is recomputed (vLLM's recompute preemption): each sequence
  prefills ``prompt + tokens generated so far`` (all but the last, which is its next decode input) and carries
  on. Nothing it sampled is redrawn, and its sampling generator object stays with it, so a seeded request
  produces the same tokens as if it had never been preempted. The oldest request is never preempted for a
  younger one, and any request fits the pool alone at its full length (else it is refused up front), so every
  request completes.
* **Prefix caching** (serving.prefix_cache, when enabled): a request admitted fresh starts from the longest cached
  prefix of its prompt on its preset, and its prefill records what later requests can reuse. Cached entries
  live in free blocks of the same pool and are evicted before anyone is preempted.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from serving.detokenizer import IncrementalDetokenizer
from serving.memory import BlockPool, CacheLayout
from serving.prefix_cache import DEFAULT_INTERVAL, PrefixCache, Recording
from serving.runner import ModelRunner
from serving.sampling import SamplingParams, TokenLogprobs
from serving.spec_decode import Speculation, SpeculativeDecoder
from serving.spec_policy import DraftPlan
from serving.types import GenerationRequest, RequestTooLarge
from supernet.cache import KVCache, SequenceState


@dataclass
class Sequence:
    """One of a request's ``n`` samples."""

    index: int
    params: SamplingParams
    generator: torch.Generator
    detok: IncrementalDetokenizer
    state: SequenceState | None = None
    output_ids: list[int] = field(default_factory=list)
    pending: int | None = None  # last sampled token, the next decode input
    finish_reason: str | None = None
    last_token_time: float = 0.0
    # not yet sent to the client
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    group: RequestGroup | None = field(default=None, repr=False)
    spec: Speculation | None = None  # its draft, when the request speculates (serving.spec_decode)
    blocks: int = 0  # cache blocks it holds (its draft's included)
    tokens: int = 0  # positions its FA caches have room for (a block multiple)
    recomputed: int = 0  # after a preemption: tokens of prompt + output prefilled again so far

    def history(self) -> list[int]:
        """What a preempted sequence's caches held: everything but the pending token."""
        return _group(self).request.prompt_ids + self.output_ids[:-1]


@dataclass
class RequestGroup:
    request: GenerationRequest
    seqs: list[Sequence]
    order: int = 0  # arrival order: the youngest admitted request is preempted first
    num_prefilled: int = 0
    admitted: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    sent_prompt_logprobs: bool = False
    first_token_time: float | None = None
    draft: DraftPlan | None = None  # the draft preset it speculates with
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache (usage.prompt_tokens_details)
    recording: Recording | None = None  # what its prefill stores in the prefix cache

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]

    @property
    def resuming(self) -> bool:
        """Preempted after its prompt was done: readmission recomputes each sequence instead."""
        return self.num_prefilled == len(self.request.prompt_ids)


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        spec: SpeculativeDecoder,
        *,
        memory_budget: int,
        max_num_seqs: int,
        block_size: int,
        metrics: Any = None,
        prefix_caching: bool = False,
        prefix_interval: int = DEFAULT_INTERVAL,
    ) -> None:
        model = runner.model
        self.runner, self.spec, self.max_num_seqs, self.metrics = runner, spec, max_num_seqs, metrics
        self.layout = CacheLayout(model.config, model.embed_tokens.weight.dtype, block_size)
        self.pool = BlockPool(memory_budget, self.layout.block_bytes)
        self.watermark = max(1, self.pool.num_blocks // 100)
        self.prefix = PrefixCache(self.pool, self.layout, prefix_interval) if prefix_caching else None
        self.waiting: deque[RequestGroup] = deque()
        self.prefilling: deque[RequestGroup] = deque()
        self.running: list[Sequence] = []
        self.groups: dict[str, RequestGroup] = {}  # admitted, by request id
        self.preemptions = 0
        self.peak_batch = 0  # most sequences decoded in one step since start

    # ---- sizes ------------------------------------------------------------------------------------------

    def lookahead(self, draft: object) -> int:
        """Positions beyond its length a step may write into a sequence's caches: the decode token and padding
        (2), or the verify window and the draft's run-ahead when it speculates (spec_decode)."""
        return self.spec.k_cap + 2 if draft is not None else 2

    def blocks(self, group: RequestGroup, tokens: int) -> int:
        need = self.layout.blocks(group.request.placement, tokens)
        if group.draft is not None:
            need += self.layout.blocks(group.draft.placement, tokens)
        return need

    def full_length(self, group: RequestGroup) -> int:
        req = group.request
        return len(req.prompt_ids) + req.params.max_tokens + self.lookahead(group.draft)

    def check(self, group: RequestGroup) -> None:
        """Refuse a request that could not run even alone with the whole pool (it would never complete)."""
        req, n = group.request, len(group.seqs)
        need = n * self.blocks(group, self.full_length(group))
        if need > self.pool.num_blocks:
            raise RequestTooLarge(
                f"this request needs {need * self.pool.block_bytes / 2**20:.1f} MiB of cache at its full length "
                f"({len(req.prompt_ids) + req.params.max_tokens} tokens x n={n} on preset {req.preset!r}) but the "
                f"server's cache budget is {self.pool.capacity / 2**20:.1f} MiB; lower max_tokens or n, or use a "
                "preset with more linear (gdn/kda/swa) layers"
            )

    # ---- admission --------------------------------------------------------------------------------------

    def admit(self) -> None:
        active = len(self.running) + sum(len(g.live) for g in self.prefilling)
        while self.waiting:
            group = self.waiting[0]
            live = group.live
            if active + len(live) > self.max_num_seqs:
                break
            la, n_prompt = self.lookahead(group.draft), len(group.request.prompt_ids)
            tokens = [self.layout.round_up(n_prompt + max(len(s.output_ids) - 1, 0) + la) for s in live]
            need = [self.blocks(group, t) for t in tokens]
            if not self.pool.try_allocate(sum(need), keep_free=self._headroom(group)):
                break
            self.waiting.popleft()
            for seq, t, b in zip(live, tokens, need, strict=True):
                seq.tokens, seq.blocks = t, b
            group.admitted = True
            self.groups[group.request.request_id] = group
            self.prefilling.append(group)
            active += len(live)
            if group.resuming:
                for seq in live:
                    seq.state, seq.recomputed = self.runner.new_state(group.request.placement, seq.tokens), 0
                    if seq.spec is not None and group.draft is not None:
                        self.spec.restart(seq.spec, group.draft, len(seq.history()))
                        _reserve(seq.spec.state, seq.tokens)
                continue
            req, first = group.request, group.seqs[0]
            first.state = self.runner.new_state(req.placement, first.tokens)
            if group.draft is not None:
                first.spec = self.spec.start(req, group.draft)
                _reserve(first.spec.state, first.tokens)
            if req.params.prompt_logprobs is not None:
                group.prompt_logprobs = [None]
            elif self.prefix is not None and group.draft is None:
                self._start_from_cache(group)

    # ---- prefix caching ---------------------------------------------------------------------------------

    def _start_from_cache(self, group: RequestGroup) -> None:
        req, prefix = group.request, cast(PrefixCache, self.prefix)
        state = cast(SequenceState, group.seqs[0].state)
        hit, group.recording = prefix.start(req.preset, req.placement, req.prompt_ids, state)
        group.num_prefilled = group.cached_tokens = hit
        if self.metrics is not None:
            self.metrics.prefix_cache(req.preset, len(req.prompt_ids), hit)

    def chunk_end(self, group: RequestGroup, start: int, end: int) -> int:
        """Where the prompt chunk ``[start, end)`` ends: sooner when the prefix cache snapshots before ``end``."""
        return end if group.recording is None else PrefixCache.chunk_end(group.recording, start, end)

    def prefilled(self, group: RequestGroup) -> None:
        """After each prompt chunk (the prefix cache snapshots or stores what the prefill has reached)."""
        rec, state = group.recording, group.seqs[0].state
        if rec is not None and self.prefix is not None and state is not None:
            if self.prefix.after_chunk(rec, state, group.num_prefilled == len(group.request.prompt_ids)):
                group.recording = None

    def _headroom(self, group: RequestGroup) -> int:
        """Blocks that must stay free after admitting ``group``: the watermark; for a preempted request also one
        more block per FA layer of every running sequence, so it is not preempted again by the next growth."""
        if not group.resuming:
            return self.watermark
        growth = sum(self.blocks(_group(s), 1) - self.blocks(_group(s), 0) for s in self.running)
        return max(self.watermark, growth)

    # ---- growth and preemption --------------------------------------------------------------------------

    def make_room(self) -> None:
        """Before a decode step: blocks for every running sequence's next tokens, oldest request first,
        preempting the youngest request whenever the pool runs out."""
        for seq in sorted(self.running, key=lambda s: (_group(s).order, s.index)):
            group = _group(seq)
            if not group.admitted or seq.state is None:  # preempted earlier in this loop
                continue
            need = self.layout.round_up(seq.state.length + self.lookahead(group.draft))
            while seq.tokens < need and not self._grow(seq, need):
                victim = max((g for g in self.groups.values() if g.admitted), key=lambda g: g.order)
                self.preempt(victim)
                if victim is group:
                    break
        self.peak_batch = max(self.peak_batch, len(self.running))

    def _grow(self, seq: Sequence, need: int) -> bool:
        group = _group(seq)
        cap = self.layout.round_up(self.full_length(group))
        ahead = min(self.layout.round_up(seq.tokens + seq.tokens // 8), cap)
        for tokens in dict.fromkeys((max(need, ahead), need)):  # run ahead if the pool can spare it, else just enough
            extra = self.blocks(group, tokens) - seq.blocks
            if self.pool.try_allocate(extra):
                seq.blocks, seq.tokens = seq.blocks + extra, tokens
                _reserve(seq.state, tokens)
                if seq.spec is not None:
                    _reserve(seq.spec.state, tokens)
                return True
        return False

    def preempt(self, group: RequestGroup) -> None:
        """Drop the group's caches and blocks and queue it again, ahead of everything younger."""
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preempted(group.request.preset)
        self.free(group)
        self.groups.pop(group.request.request_id, None)
        if group in self.prefilling:
            self.prefilling.remove(group)
        self.running = [s for s in self.running if s.group is not group]
        if not group.resuming:  # preempted during its prompt: admission starts it over
            group.num_prefilled, group.prompt_logprobs, group.seqs[0].spec = 0, None, None
        keys = [g.order for g in self.waiting]
        self.waiting.insert(bisect.bisect(keys, group.order), group)

    def free_seq(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = seq.tokens = 0
        seq.state = None
        if seq.spec is not None:
            seq.spec.state = None

    def free(self, group: RequestGroup) -> None:
        for seq in group.seqs:
            self.free_seq(seq)
        group.admitted = False
        if group.recording is not None and self.prefix is not None:
            self.prefix.discard(group.recording)
            group.recording = None


def _group(seq: Sequence) -> RequestGroup:
    assert seq.group is not None, "a sequence belongs to its request from the start"
    return seq.group


def _reserve(state: SequenceState | None, tokens: int) -> None:
    """FA tensors grown to the positions their blocks cover (SWA/GDN/KDA are allocated whole)."""
    if state is not None:
        for layer in state.layers:
            if isinstance(layer, KVCache):
                layer.reserve(tokens)
