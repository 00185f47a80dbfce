"""Generates deploy/grafana/dashboards/supernet.json, the dashboard Grafana provisions from that folder.

Written with Grafana's foundation SDK (the builders generated from Grafana's own dashboard schema) rather than by
hand, so field names and shapes are the schema's; tests/deploy regenerate it and compare, and check every metric
a panel queries against the /metrics of a live server. Regenerate after editing:

    .venv/bin/python deploy/grafana/dashboard.py

Panels follow what the server exports (serving/metrics.py), per preset where the metric has the label: token
throughput, request rate by finish reason, time-to-first-token / inter-token / end-to-end latency percentiles
(from the Prometheus histograms), queue and running sequences, rejected requests by status, self-speculative
decoding (acceptance and tokens per verify step, per target preset), cache reservation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

OUT = Path(__file__).parent / "dashboards" / "supernet.json"
# The provisioned Prometheus data source (deploy/grafana/provisioning/datasources/prometheus.yaml).
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")
PRESET = 'preset=~"$preset"'
RATE = "[$__rate_interval]"


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def quantiles(metric: str) -> list[prometheus.Dataquery]:
    """p50/p95/p99 per preset from a Prometheus histogram's buckets."""
    return [
        query(
            f"histogram_quantile({q}, sum by (le, preset) (rate({metric}_bucket{{{PRESET}}}{RATE})))",
            f"p{int(q * 100)} {{{{preset}}}}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def spec(counter: str) -> str:
    """Per-preset rate of one of the self-speculative decoding counters."""
    return f"sum by (preset) (rate(supernet_spec_decode_{counter}_total{{{PRESET}}}{RATE}))"


def series(title: str, unit: str, targets: list[prometheus.Dataquery], description: str) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    for target in targets:
        panel = panel.with_target(target)
    return panel.height(8).span(12)


def single(title: str, unit: str, expr: str, description: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .with_target(query(expr, title))
        .height(4)
        .span(6)
    )


def build() -> dict:
    preset_variable = (
        dashboard.QueryVariable("preset")
        .label("preset")
        .datasource(DATASOURCE)
        .query("label_values(supernet_generation_tokens_total, preset)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    board = (
        dashboard.Dashboard("Supernet serving")
        .uid("supernet-serving")
        .description("supernet serve: per-preset throughput and latency, queue, cache (serving/metrics.py)")
        .tags(["supernet", "llm"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .with_variable(preset_variable)
        .with_panel(single("Running sequences", "short", "sum(supernet_requests_running)", "Admitted now"))
        .with_panel(single("Queued requests", "short", "sum(supernet_requests_waiting)", "Waiting for admission"))
        .with_panel(single("Cache reserved", "percentunit", "max(supernet_cache_usage_ratio)", "Reserved / budget"))
        .with_panel(
            single(
                "Generated tokens/s",
                "short",
                f"sum(rate(supernet_generation_tokens_total{RATE}))",
                "All presets together",
            )
        )
        .with_panel(
            series(
                "Generation throughput per preset",
                "short",
                [query(f"sum by (preset) (rate(supernet_generation_tokens_total{{{PRESET}}}{RATE}))", "{{preset}}")],
                "Generated tokens per second",
            )
        )
        .with_panel(
            series(
                "Prompt throughput per preset",
                "short",
                [query(f"sum by (preset) (rate(supernet_prompt_tokens_total{{{PRESET}}}{RATE}))", "{{preset}}")],
                "Prompt tokens processed per second",
            )
        )
        .with_panel(
            series(
                "Time to first token",
                "s",
                quantiles("supernet_time_to_first_token_seconds"),
                "Arrival to first generated token (queueing and prefill)",
            )
        )
        .with_panel(
            series(
                "Inter-token latency",
                "s",
                quantiles("supernet_inter_token_latency_seconds"),
                "Time between consecutive tokens of a sequence (decode speed per preset)",
            )
        )
        .with_panel(
            series(
                "End-to-end request latency",
                "s",
                quantiles("supernet_e2e_request_latency_seconds"),
                "Arrival to last token",
            )
        )
        .with_panel(
            series(
                "Finished requests per preset",
                "reqps",
                [
                    query(
                        f"sum by (preset, finish_reason) (rate(supernet_requests_total{{{PRESET}}}{RATE}))",
                        "{{preset}} {{finish_reason}}",
                    )
                ],
                "Requests finished per second, by finish reason (stop, length, abort)",
            )
        )
        .with_panel(
            series(
                "Queue and running sequences",
                "short",
                [
                    query("sum(supernet_requests_waiting)", "waiting", "A"),
                    query("sum(supernet_requests_running)", "running", "B"),
                ],
                "Waiting requests grow when the cache budget or --max-num-seqs is the limit (scale out on this)",
            )
        )
        .with_panel(
            series(
                "Rejected requests",
                "reqps",
                [query(f"sum by (status) (rate(supernet_requests_rejected_total{RATE}))", "HTTP {{status}}")],
                "Refused before admission; 429 means the queue (--max-queue) was full",
            )
        )
        .with_panel(
            series(
                "Speculation: draft acceptance",
                "percentunit",
                [query(f"{spec('accepted_tokens')} / {spec('draft_tokens')}", "{{preset}}")],
                "Self-speculative decoding, by target preset: drafted tokens the target accepted",
            )
        )
        .with_panel(
            series(
                "Speculation: tokens per verify step",
                "short",
                [query(f"({spec('accepted_tokens')} + {spec('verify_steps')}) / {spec('verify_steps')}", "{{preset}}")],
                "Tokens emitted per target forward that verified a draft (1 = no gain)",
            )
        )
        .with_panel(
            series(
                "Cache memory",
                "bytes",
                [
                    query("sum(supernet_cache_reserved_bytes)", "reserved", "A"),
                    query("sum(supernet_cache_budget_bytes)", "budget", "B"),
                ],
                "Per-request cache memory reserved against --cache-budget-gib",
            )
        )
    )
    return without_nulls(json.loads(json.dumps(board.build(), cls=JSONEncoder)))


def without_nulls(value):
    """Drop the SDK's ``null`` placeholders (unset panel options): Grafana then applies each plugin's defaults."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
