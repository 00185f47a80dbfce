"""Bounded load test: N concurrent streaming clients (official openai client) for D seconds against a server.

Every client loops: pick the next preset (round-robin over /v1/models, so presets mix inside the server's
batches), stream a completion, check it ended with a finish_reason. At the end it reports errors, lost
requests (started but never finished), latency and time-to-first-token percentiles, and tokens/s.

    python benchmarks/load_test.py --model runs/sn-serve            # starts `supernet serve` itself
    python benchmarks/load_test.py --url http://127.0.0.1:8000      # or drives a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import serve_client
from openai import AsyncOpenAI
from serve_client import percentile, read_chat_stream

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "What is the capital of France? Answer briefly.",
    "Give one tip for writing clean Python code.",
    "Describe a sunrise over the mountains.",
]


async def client_loop(
    client: AsyncOpenAI, models: list[str], worker: int, deadline: float, args, stats: dict
) -> None:
    i = worker
    while time.monotonic() < deadline:
        model = models[i % len(models)]
        i += 1
        stats["started"] += 1
        t0 = time.monotonic()
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=args.max_tokens,
                temperature=0.7,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
            )
            ttft, finish, tokens = await read_chat_stream(stream, t0)
        except Exception as err:  # counted, reported, never hidden
            stats["errors"].append(f"{type(err).__name__}: {err}"[:200])
            continue
        if finish is None:
            stats["lost"] += 1
            continue
        stats["finished"] += 1
        stats["latency"].append(time.monotonic() - t0)
        if ttft is not None:
            stats["ttft"].append(ttft)
        stats["tokens"] += tokens
        stats["per_model"][model] = stats["per_model"].get(model, 0) + 1


async def run(url: str, args) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=600)
    models = [m.id for m in (await client.models.list()).data if ":" in m.id]
    if args.presets:
        models = [m for m in models if m.split(":", 1)[1] in args.presets.split(",")]
    stats = {
        "started": 0,
        "finished": 0,
        "lost": 0,
        "errors": [],
        "latency": [],
        "ttft": [],
        "tokens": 0,
        "per_model": {},
    }
    t0 = time.monotonic()
    deadline = t0 + args.duration
    await asyncio.gather(
        *(client_loop(client, models, w, deadline, args, stats) for w in range(args.clients))
    )
    wall = time.monotonic() - t0
    metrics = httpx.get(url + "/metrics", timeout=10).text
    return {
        "clients": args.clients,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "max_tokens": args.max_tokens,
        "presets": models,
        "requests_started": stats["started"],
        "requests_finished": stats["finished"],
        "errors": len(stats["errors"]),
        "lost": stats["lost"],
        "error_samples": stats["errors"][:5],
        "latency_p50_s": round(percentile(stats["latency"], 50), 2),
        "latency_p99_s": round(percentile(stats["latency"], 99), 2),
        "ttft_p50_s": round(percentile(stats["ttft"], 50), 2),
        "ttft_p99_s": round(percentile(stats["ttft"], 99), 2),
        "generated_tokens": stats["tokens"],
        "tokens_per_s": round(stats["tokens"] / wall, 1),
        "mean_tokens_per_request": round(statistics.mean([stats["tokens"] / max(1, stats["finished"])]), 1),
        "requests_per_model": stats["per_model"],
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "server_cache_budget_bytes": next(
            (
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("supernet_cache_budget_bytes")
            ),
            None,
        ),
    }


def start_server(args) -> tuple[subprocess.Popen, str]:
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return serve_client.start_server(args.model, args.port, *flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (else one is started with --model)")
    ap.add_argument("--model", type=Path, help="checkpoint to serve (default: the demo, supernet/demo)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument(
        "--duration", type=float, default=60.0, help="seconds during which clients start requests"
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--presets", help="comma list of presets to use (default: every preset)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--api-key")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        import supernet

        args.model = args.model or supernet.DEMO_DIR
        proc, url = start_server(args)
    try:
        report = asyncio.run(run(url.rstrip("/"), args))
    finally:
        if proc is not None:
            proc.send_signal(2)
            proc.wait(60)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report["errors"] or report["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
