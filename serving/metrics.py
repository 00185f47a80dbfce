"""Prometheus metrics, labelled by preset so the speed/quality trade-off shows up per preset in dashboards.

The engine thread calls the hooks below (prometheus_client is thread-safe); /metrics renders this registry.
Each app gets its own CollectorRegistry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["preset"], buckets=buckets, registry=r)

        self.requests = counter(
            "supernet_requests", "Finished requests by preset and finish reason", "preset", "finish_reason"
        )
        self.rejected = counter(
            "supernet_requests_rejected", "Requests refused before admission, by HTTP status", "status"
        )
        self.prompt_tokens = counter("supernet_prompt_tokens", "Prompt tokens processed", "preset")
        self.generation_tokens = counter("supernet_generation_tokens", "Tokens generated", "preset")
        self.ttft = histogram(
            "supernet_time_to_first_token_seconds", "Arrival to first generated token", LATENCY_BUCKETS
        )
        self.itl = histogram(
            "supernet_inter_token_latency_seconds", "Time between consecutive tokens of a sequence", LATENCY_BUCKETS
        )
        self.e2e = histogram("supernet_e2e_request_latency_seconds", "Arrival to last token", E2E_BUCKETS)
        self.waiting = gauge("supernet_requests_waiting", "Requests queued for admission")
        self.running = gauge("supernet_requests_running", "Sequences admitted (prefilling or decoding)")
        self.cache_used = gauge(
            "supernet_cache_reserved_bytes", "Cache bytes held by admitted sequences (blocks x block bytes)"
        )
        self.cache_free = gauge("supernet_cache_free_bytes", "Cache bytes not held by any sequence")
        self.cache_budget = gauge("supernet_cache_budget_bytes", "Cache memory budget (whole blocks)")
        self.cache_usage = gauge("supernet_cache_usage_ratio", "Reserved / budget (0..1)")
        self.blocks_used = gauge("supernet_cache_blocks_used", "Cache blocks held by sequences")
        self.blocks_free = gauge("supernet_cache_blocks_free", "Cache blocks free")
        self.block_bytes = gauge(
            "supernet_cache_block_bytes", "Bytes per cache block (one FA layer's KV for block_size tokens)"
        )
        self.peak_batch = gauge(
            "supernet_decode_batch_peak", "Most sequences decoded together in one step since start"
        )
        self.preemptions = counter(
            "supernet_preemptions",
            "Requests preempted when the cache pool ran out (recomputed when readmitted)",
            "preset",
        )
        # automatic prefix caching, vLLM's counters (in tokens): hits / queries is the hit rate
        self.prefix_queries = counter(
            "supernet_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "preset"
        )
        self.prefix_hits = counter(
            "supernet_prefix_cache_hits", "Prompt tokens served from the prefix cache (not prefilled)", "preset"
        )
        self.prefix_blocks = gauge(
            "supernet_prefix_cache_blocks", "Cache blocks held by prefix-cache entries (counted free: evictable)"
        )
        self._spec_totals: dict[str, list[int]] = {}
        # self-speculative decoding, by target preset (vLLM's spec_decode counters, plus the two ratios)
        self.spec_drafted = counter("supernet_spec_decode_draft_tokens", "Tokens drafted", "preset")
        self.spec_accepted = counter(
            "supernet_spec_decode_accepted_tokens", "Drafted tokens the target accepted", "preset"
        )
        self.spec_steps = counter(
            "supernet_spec_decode_verify_steps", "Target forwards that verified a draft", "preset"
        )
        self.spec_acceptance = gauge(
            "supernet_spec_decode_acceptance_rate", "Accepted / drafted tokens since start", "preset"
        )
        self.spec_tokens_per_step = gauge(
            "supernet_spec_decode_tokens_per_verify_step",
            "Tokens emitted per verify step since start (accepted drafts + the target's own token)",
            "preset",
        )

    # hooks called by serving.engine.LLMEngine
    def first_token(self, preset: str, seconds: float) -> None:
        self.ttft.labels(preset).observe(seconds)

    def inter_token(self, preset: str, seconds: float) -> None:
        self.itl.labels(preset).observe(seconds)

    def request_finished(
        self, preset: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None:
        self.requests.labels(preset, finish_reason).inc()
        self.prompt_tokens.labels(preset).inc(prompt_tokens)
        self.generation_tokens.labels(preset).inc(completion_tokens)
        self.e2e.labels(preset).observe(seconds)

    def speculation(self, preset: str, drafted: int, accepted: int) -> None:
        """One verify step of one sequence: ``drafted`` tokens proposed, ``accepted`` of them kept."""
        self.spec_drafted.labels(preset).inc(drafted)
        self.spec_accepted.labels(preset).inc(accepted)
        self.spec_steps.labels(preset).inc()
        totals = self._spec_totals.setdefault(preset, [0, 0, 0])  # engine thread only
        totals[0] += drafted
        totals[1] += accepted
        totals[2] += 1
        drafted_total, accepted_total, steps = totals
        self.spec_acceptance.labels(preset).set(accepted_total / drafted_total)
        self.spec_tokens_per_step.labels(preset).set((accepted_total + steps) / steps)

    def prefix_cache(self, preset: str, queried: int, hit: int) -> None:
        self.prefix_queries.labels(preset).inc(queried)
        self.prefix_hits.labels(preset).inc(hit)

    def preempted(self, preset: str) -> None:
        self.preemptions.labels(preset).inc()

    def scheduler(
        self,
        waiting: int,
        running: int,
        blocks_used: int,
        blocks_total: int,
        block_bytes: int,
        peak_batch: int,
        prefix_blocks: int = 0,
    ) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.blocks_used.set(blocks_used)
        self.blocks_free.set(blocks_total - blocks_used)
        self.block_bytes.set(block_bytes)
        self.cache_used.set(blocks_used * block_bytes)
        self.cache_free.set((blocks_total - blocks_used) * block_bytes)
        self.cache_budget.set(blocks_total * block_bytes)
        self.cache_usage.set(blocks_used / blocks_total if blocks_total else 0.0)
        self.peak_batch.set(peak_batch)
        self.prefix_blocks.set(prefix_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
