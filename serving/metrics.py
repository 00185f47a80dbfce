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
        self.requests = Counter(
            "supernet_requests",
            "Finished requests by preset and finish reason",
            ["preset", "finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "supernet_requests_rejected",
            "Requests refused before admission, by HTTP status",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "supernet_prompt_tokens", "Prompt tokens processed", ["preset"], registry=r
        )
        self.generation_tokens = Counter(
            "supernet_generation_tokens", "Tokens generated", ["preset"], registry=r
        )
        self.ttft = Histogram(
            "supernet_time_to_first_token_seconds",
            "Arrival to first generated token",
            ["preset"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "supernet_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            ["preset"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "supernet_e2e_request_latency_seconds",
            "Arrival to last token",
            ["preset"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("supernet_requests_waiting", "Requests queued for admission", registry=r)
        self.running = Gauge(
            "supernet_requests_running", "Sequences admitted (prefilling or decoding)", registry=r
        )
        self.cache_used = Gauge(
            "supernet_cache_reserved_bytes", "Cache bytes held by admitted sequences (blocks x block bytes)", registry=r
        )
        self.cache_free = Gauge("supernet_cache_free_bytes", "Cache bytes not held by any sequence", registry=r)
        self.cache_budget = Gauge("supernet_cache_budget_bytes", "Cache memory budget (whole blocks)", registry=r)
        self.cache_usage = Gauge("supernet_cache_usage_ratio", "Reserved / budget (0..1)", registry=r)
        self.blocks_used = Gauge("supernet_cache_blocks_used", "Cache blocks held by sequences", registry=r)
        self.blocks_free = Gauge("supernet_cache_blocks_free", "Cache blocks free", registry=r)
        self.block_bytes = Gauge(
            "supernet_cache_block_bytes", "Bytes per cache block (one FA layer's KV for block_size tokens)", registry=r
        )
        self.peak_batch = Gauge(
            "supernet_decode_batch_peak", "Most sequences decoded together in one step since start", registry=r
        )
        self.preemptions = Counter(
            "supernet_preemptions",
            "Requests preempted when the cache pool ran out (recomputed when readmitted)",
            ["preset"],
            registry=r,
        )
        self._spec_totals: dict[str, list[int]] = {}
        # self-speculative decoding, by target preset (vLLM's spec_decode counters, plus the two ratios)
        self.spec_drafted = Counter(
            "supernet_spec_decode_draft_tokens", "Tokens drafted", ["preset"], registry=r
        )
        self.spec_accepted = Counter(
            "supernet_spec_decode_accepted_tokens", "Drafted tokens the target accepted", ["preset"], registry=r
        )
        self.spec_steps = Counter(
            "supernet_spec_decode_verify_steps", "Target forwards that verified a draft", ["preset"], registry=r
        )
        self.spec_acceptance = Gauge(
            "supernet_spec_decode_acceptance_rate", "Accepted / drafted tokens since start", ["preset"], registry=r
        )
        self.spec_tokens_per_step = Gauge(
            "supernet_spec_decode_tokens_per_verify_step",
            "Tokens emitted per verify step since start (accepted drafts + the target's own token)",
            ["preset"],
            registry=r,
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

    def preempted(self, preset: str) -> None:
        self.preemptions.labels(preset).inc()

    def scheduler(
        self, waiting: int, running: int, blocks_used: int, blocks_total: int, block_bytes: int, peak_batch: int
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
