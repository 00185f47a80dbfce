"""The embedded engine: a scheduler with continuous batching over requests on *different presets*.

Every ``step()``:
1. admits waiting requests FIFO while the cache blocks they need *now* fit the pool and the batch has room,
   and gives running sequences the blocks their next tokens need, preempting the youngest request when the
   pool runs out (scheduler.py, memory.py);
2. runs ONE decode forward for every running sequence, whatever its preset -- the model groups rows by mixer
   at each layer (supernet.model.DecoderLayer.mix), so presets share the batch with no weight reload, no
   cache wipe and no switching cost;
3. runs prompt chunks of admitted requests up to ``prefill_chunk`` tokens (chunked prefill: a long prompt is
   split over several steps so it never stalls the running sequences for more than one chunk), and the
   recomputation of preempted sequences; with prefix caching on (the default, as in vLLM V1) a prompt starts
   from its longest cached prefix on its preset and its chunks stop where the cache snapshots (prefix_cache.py);
4. samples, detokenizes, checks stop conditions, and frees the cache of every sequence that ended.

It is synchronous and single-threaded on purpose: async_engine.AsyncEngine drives it from one thread and
bridges to asyncio; tests and benchmarks drive it directly.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import torch

from serving.detokenizer import IncrementalDetokenizer
from serving.memory import BLOCK_SIZE
from serving.prefix_cache import DEFAULT_INTERVAL
from serving.runner import ModelRunner
from serving.sampling import TokenLogprobs, make_generator, sample, top_logprobs
from serving.scheduler import RequestGroup, Scheduler, Sequence
from serving.spec_decode import SpeculativeDecoder
from serving.spec_policy import SpecConfig
from serving.types import (
    EngineError,
    GenerationRequest,
    RequestOutput,
    RequestTooLarge,
    SequenceDelta,
    ServerBusy,
    SpecUsage,
)
from supernet.cache import SequenceState
from supernet.model import SupernetForCausalLM

GiB = 1 << 30


@dataclass
class EngineConfig:
    max_model_len: int = 8192
    max_num_seqs: int = 256  # most sequences decoded together (the cache budget usually binds first)
    prefill_chunk: int = 256  # prompt tokens processed per step (chunked prefill)
    memory_budget: int = 4 * GiB  # bytes of cache (KV + recurrent state) for every sequence together
    block_size: int = BLOCK_SIZE  # tokens per cache block (memory.py)
    max_queue: int = 256  # requests waiting for admission before new ones get 429
    speculative: SpecConfig | None = None  # drafts per preset and the k policy (None: no drafts configured)
    enable_prefix_caching: bool = True  # reuse cached prompt prefixes per preset (serving.prefix_cache)
    prefix_cache_interval: int = DEFAULT_INTERVAL  # tokens between snapshots of SWA/GDN/KDA states


__all__ = ["EngineConfig", "LLMEngine", "Sequence"]


class LLMEngine:
    def __init__(
        self,
        model: SupernetForCausalLM,
        tokenizer: Any,
        config: EngineConfig | None = None,
        metrics: Any = None,
    ) -> None:
        self.model = model
        self.runner = ModelRunner(model)
        self.tokenizer = tokenizer
        self.config = config or EngineConfig(max_model_len=model.config.max_position_embeddings)
        self.metrics = metrics
        self.spec = SpeculativeDecoder(self.runner, self.config.speculative or SpecConfig())
        self.sched = Scheduler(
            self.runner,
            self.spec,
            memory_budget=self.config.memory_budget,
            max_num_seqs=self.config.max_num_seqs,
            block_size=self.config.block_size,
            metrics=metrics,
            prefix_caching=self.config.enable_prefix_caching,
            prefix_interval=self.config.prefix_cache_interval,
        )
        self.eos_ids = _eos_ids(model, tokenizer)
        self._arrivals = itertools.count()
        self._inbox: deque[RequestGroup] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()  # guards inbox/aborts: the only state other threads touch

    # what the scheduler holds, for callers and tests
    budget = property(lambda self: self.sched.pool)
    groups = property(lambda self: self.sched.groups)
    running = property(lambda self: self.sched.running)
    waiting = property(lambda self: self.sched.waiting)
    prefilling = property(lambda self: self.sched.prefilling)

    # ---- admission (called from any thread) -------------------------------------------------------------

    def check(self, group: RequestGroup) -> None:
        """Raise when the request can never run here (bad parameters, too long, larger than the whole pool)."""
        request = group.request
        p, n_prompt = request.params, len(request.prompt_ids)
        p.validate()
        if n_prompt == 0:
            raise EngineError("the prompt is empty; send at least one token")
        total = n_prompt + p.max_tokens
        if total > self.config.max_model_len:
            raise RequestTooLarge(
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, you "
                f"requested {total} tokens ({n_prompt} in the prompt, {p.max_tokens} for the completion). "
                f"Please reduce the length of the prompt or max_tokens."
            )
        if p.n > self.config.max_num_seqs:
            raise RequestTooLarge(f"n={p.n} exceeds the server's batch size ({self.config.max_num_seqs})")
        self.sched.check(group)

    def add_request(self, request: GenerationRequest) -> None:
        draft = self.spec.plan_for(request)
        p = request.params
        seqs = [
            Sequence(
                i,
                p,
                make_generator(None if p.seed is None else p.seed + i),
                IncrementalDetokenizer(self.tokenizer, request.prompt_ids, p.stop),
            )
            for i in range(p.n)
        ]
        group = RequestGroup(request, seqs, draft=draft)
        self.check(group)
        if not request.arrival:
            request.arrival = time.monotonic()
        for seq in seqs:
            seq.group = group
        with self._lock:
            if request.request_id in self.groups or any(
                g.request.request_id == request.request_id for g in self._inbox
            ):
                raise EngineError(f"duplicate request id {request.request_id!r}")
            if len(self._inbox) + len(self.waiting) >= self.config.max_queue:
                raise ServerBusy(
                    f"the server is at capacity ({self.config.max_queue} requests queued); retry later"
                )
            group.order = next(self._arrivals)
            self._inbox.append(group)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self.groups or self.waiting or self._inbox or self._aborts)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    # ---- one scheduler iteration (engine thread only) ------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs: dict[str, RequestOutput] = {}
        self._take_inbox(outputs)
        self.sched.admit()
        if self.running:
            self.sched.make_room()
        if self.running:
            self._decode(outputs)
        if self.prefilling:
            self._prefill(outputs)
        self._reap(outputs)
        if self.metrics is not None:
            pool = self.budget
            self.metrics.scheduler(
                self.num_waiting,
                len(self.running) + len(self.prefilling),
                pool.used_blocks,
                pool.num_blocks,
                pool.block_bytes,
                self.sched.peak_batch,
                pool.cached_blocks,
            )
        return list(outputs.values())

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected error in a forward pass: end every request (their states may be
        half-updated)."""
        outs = []
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        for group in list(self.groups.values()) + list(self.waiting):
            out = self._output(group, {})
            for seq in group.seqs:
                seq.finish_reason = seq.finish_reason or "abort"
            out.finished, out.error = True, message
            outs.append(out)
            self._release(group, status="error")
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()
        self.groups.clear()
        return outs

    def _take_inbox(self, outputs: dict[str, RequestOutput]) -> None:
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        for group in [g for g in self.waiting if g.request.request_id in aborts]:
            self.waiting.remove(group)
            self._end_aborted(group, outputs)
        for rid in aborts:
            group = self.groups.get(rid)
            if group is not None:
                self._end_aborted(group, outputs)

    def _end_aborted(self, group: RequestGroup, outputs: dict[str, RequestOutput]) -> None:
        out = self._output(group, outputs)
        for seq in group.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                out.deltas.append(SequenceDelta(seq.index, finish_reason="abort"))
        if group in self.prefilling:
            self.prefilling.remove(group)
        self.sched.running = [s for s in self.running if s.finish_reason is None]
        out.finished = True
        self._release(group, status="abort")

    def _prefill(self, outputs: dict[str, RequestOutput]) -> None:
        budget = self.config.prefill_chunk
        while self.prefilling and budget > 0:
            group = self.prefilling[0]
            if group.resuming:
                budget = self._recompute(group, budget)
                continue
            prompt = group.request.prompt_ids
            start = group.num_prefilled
            chunk = prompt[start : self.sched.chunk_end(group, start, start + budget)]
            want_lp = group.prompt_logprobs is not None
            logits = self.runner.prefill(group.seqs[0].state, chunk, all_logits=want_lp)
            if group.seqs[0].spec is not None:  # the draft's own caches take the prompt too
                self.spec.prefill(group.seqs[0].spec, start, chunk)
            group.num_prefilled += len(chunk)
            budget -= len(chunk)
            self.sched.prefilled(group)
            if want_lp:
                targets = prompt[
                    start + 1 : start + len(chunk) + 1
                ]  # the prompt tokens these positions predict
                if targets:
                    lps = torch.log_softmax(logits[: len(targets)], dim=-1)
                    k = group.request.params.prompt_logprobs
                    group.prompt_logprobs.extend(top_logprobs(lps, torch.tensor(targets), k))
            if group.num_prefilled < len(prompt):
                continue
            self.prefilling.popleft()
            self._start_decoding(group, logits[-1:], outputs)

    def _recompute(self, group: RequestGroup, budget: int) -> int:
        """A preempted group readmitted: prefill each sequence's prompt + output so far (chunked like prompts);
        when all are done they decode on from their pending tokens (nothing is sampled again)."""
        for seq in group.live:
            history = seq.history()
            if seq.recomputed == len(history) or budget <= 0:
                continue
            chunk = history[seq.recomputed : seq.recomputed + budget]
            self.runner.prefill(cast(SequenceState, seq.state), chunk)  # readmission gave it a state
            if seq.spec is not None:
                self.spec.prefill(seq.spec, seq.recomputed, chunk)
            seq.recomputed += len(chunk)
            budget -= len(chunk)
        if all(seq.recomputed == len(seq.history()) for seq in group.live):
            self.prefilling.popleft()
            self.running.extend(group.live)
        return budget

    def _start_decoding(
        self, group: RequestGroup, last_logits: torch.Tensor, outputs: dict[str, RequestOutput]
    ) -> None:
        """The prompt is cached: fork it for the other n-1 samples; draw every sample's first token."""
        seqs = group.seqs
        for seq in seqs[1:]:
            seq.state = cast(SequenceState, seqs[0].state).clone()  # the prefilled one
            seq.spec = seqs[0].spec.fork() if seqs[0].spec else None
        out = self._output(group, outputs)
        if group.request.params.max_tokens == 0:  # echo-only scoring request
            for seq in seqs:
                seq.finish_reason = "length"
                out.deltas.append(SequenceDelta(seq.index, finish_reason="length"))
            return
        tokens, lps = sample(
            last_logits.expand(len(seqs), -1), [s.params for s in seqs], [s.generator for s in seqs]
        )
        for seq, token, lp in zip(seqs, tokens, lps, strict=True):
            self._append(group, seq, token, lp, outputs)
            if seq.finish_reason is None:
                self.running.append(seq)

    def _decode(self, outputs: dict[str, RequestOutput]) -> None:
        seqs = self.running
        if any(s.spec is not None for s in seqs):
            for seq, emitted in zip(seqs, self.spec.step(seqs), strict=True):
                for token, lp in zip(emitted.tokens, emitted.logprobs, strict=True):
                    if seq.finish_reason is None:
                        self._append(seq.group, seq, token, lp, outputs)
                if emitted.drafted and self.metrics is not None:
                    self.metrics.speculation(seq.group.request.preset, emitted.drafted, emitted.accepted)
            self.sched.running = [s for s in seqs if s.finish_reason is None]
            return
        logits = self.runner.decode([s.state for s in seqs], [s.pending for s in seqs])
        tokens, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, token, lp in zip(seqs, tokens, lps, strict=True):
            self._append(seq.group, seq, token, lp, outputs)
        self.sched.running = [s for s in seqs if s.finish_reason is None]

    def _append(
        self,
        group: RequestGroup,
        seq: Sequence,
        token: int,
        lp: TokenLogprobs | None,
        outputs: dict[str, RequestOutput],
    ) -> None:
        p = seq.params
        now = time.monotonic()
        if self.metrics is not None:
            if not seq.output_ids and seq.index == 0:
                self.metrics.first_token(group.request.preset, now - group.request.arrival)
            elif seq.output_ids:
                self.metrics.inter_token(group.request.preset, now - seq.last_token_time)
        if group.first_token_time is None:
            group.first_token_time = now
        seq.last_token_time = now
        seq.output_ids.append(token)
        seq.pending = token
        seq.new_ids.append(token)
        if lp is not None:
            seq.new_logprobs.append(lp)
        stop_token = token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos)
        hit_stop_string = seq.detok.add(token, skip_text=stop_token)
        if stop_token or hit_stop_string:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = "length"
        out = self._output(group, outputs)
        out.deltas.append(
            SequenceDelta(
                seq.index,
                seq.new_ids,
                seq.detok.take(seq.finish_reason is not None),
                seq.new_logprobs,
                seq.finish_reason,
            )
        )
        seq.new_ids, seq.new_logprobs = [], []

    def _output(self, group: RequestGroup, outputs: dict[str, RequestOutput]) -> RequestOutput:
        rid = group.request.request_id
        out = outputs.get(rid)
        if out is None:
            n_prompt, cached = len(group.request.prompt_ids), group.cached_tokens
            out = outputs[rid] = RequestOutput(rid, [], prompt_tokens=n_prompt, cached_tokens=cached)
        if (
            group.prompt_logprobs is not None
            and not group.sent_prompt_logprobs
            and group.num_prefilled == len(group.request.prompt_ids)
        ):
            out.prompt_logprobs = group.prompt_logprobs
            group.sent_prompt_logprobs = True
        out.completion_tokens = sum(len(s.output_ids) for s in group.seqs)
        if group.draft is not None:
            out.speculative = SpecUsage(group.draft.draft)
            for s in group.seqs:
                if s.spec is not None:
                    out.speculative.add(s.spec.usage)
        return out

    def _reap(self, outputs: dict[str, RequestOutput]) -> None:
        """Free the cache of every sequence that ended this step; end requests whose sequences all ended."""
        for seq_group in list(self.groups.values()):
            if seq_group.num_prefilled < len(seq_group.request.prompt_ids):
                continue
            for seq in seq_group.seqs:
                if seq.finish_reason is not None:
                    self.sched.free_seq(seq)
            if seq_group.finished:
                out = self._output(seq_group, outputs)
                out.finished = True
                self._release(seq_group, status="ok")

    def _release(self, group: RequestGroup, status: str) -> None:
        req = group.request
        self.sched.free(group)
        self.groups.pop(req.request_id, None)
        if self.metrics is not None:
            reason = status if status != "ok" else (group.seqs[0].finish_reason or "stop")
            self.metrics.request_finished(
                req.preset,
                reason,
                len(req.prompt_ids),
                sum(len(s.output_ids) for s in group.seqs),
                time.monotonic() - req.arrival,
            )


def _eos_ids(model: SupernetForCausalLM, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
