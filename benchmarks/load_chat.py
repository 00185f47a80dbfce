"""N concurrent chats (official openai client, streaming) against a running server, all started at once.

With no --max-tokens each chat may run to the end of the context, as a client that leaves max_tokens unset does
(chats that ramble on can take an hour on a CPU: ``--deadline`` closes those still running after that many
seconds and reports them as cut; the peak of what ran at once is already known by then).
Reports how many sequences ran at once (the server's ``supernet_decode_batch_peak`` and the most
``supernet_requests_running`` seen while polling /metrics), latency and time to first token, and the
preemptions and cache blocks from /metrics (docs/serving.md, Cache memory and preemption).

    supernet serve --max-num-seqs 64 &
    python benchmarks/load_chat.py --url http://127.0.0.1:8000 --chats 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

import httpx
from openai import AsyncOpenAI
from serve_client import percentile, read_chat_stream


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets (0 when absent)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def chat(client: AsyncOpenAI, model: str, i: int, args) -> dict:
    t0 = time.monotonic()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{args.prompt} (#{i})"}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
    )
    ttft, finish, tokens = await read_chat_stream(stream, t0)
    return {"latency": time.monotonic() - t0, "ttft": ttft, "finish": finish, "tokens": tokens}


async def run(args) -> dict:
    url = args.url.rstrip("/")
    client = AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=3600)
    model = args.model or (await client.models.list()).data[0].id
    async with httpx.AsyncClient(timeout=10) as http:
        before = (await http.get(url + "/metrics")).text
        peak_running, done = 0.0, False

        async def poll() -> None:
            nonlocal peak_running
            while not done:
                text = (await http.get(url + "/metrics")).text
                peak_running = max(peak_running, metric(text, "supernet_requests_running"))
                await asyncio.sleep(args.poll)

        poller = asyncio.create_task(poll())
        t0 = time.monotonic()
        tasks = [asyncio.create_task(chat(client, model, i, args)) for i in range(args.chats)]
        _, pending = await asyncio.wait(tasks, timeout=args.deadline)
        for task in pending:  # still generating at the deadline: closed by the client, reported as cut
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        results = [t.exception() or t.result() for t in tasks if t not in pending]
        wall = time.monotonic() - t0
        done = True
        await poller
        after = (await http.get(url + "/metrics")).text
    ok = [r for r in results if isinstance(r, dict) and r["finish"] is not None]
    errors = [f"{type(r).__name__}: {r}"[:200] for r in results if isinstance(r, BaseException)]
    latency = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "model": model,
        "chats": args.chats,
        "max_tokens": args.max_tokens,
        "completed": len(ok),
        "cut_at_deadline": len(pending),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 2),
        "ran_at_once_peak_decode_batch": metric(after, "supernet_decode_batch_peak"),
        "ran_at_once_peak_running_polled": peak_running,
        "latency_p50_s": round(percentile(latency, 50), 3),
        "latency_p99_s": round(percentile(latency, 99), 3),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "completion_tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "preemptions": metric(after, "supernet_preemptions_total") - metric(before, "supernet_preemptions_total"),
        "cache_blocks_total": metric(after, "supernet_cache_blocks_used") + metric(after, "supernet_cache_blocks_free"),
        "cache_budget_bytes": metric(after, "supernet_cache_budget_bytes"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    ap.add_argument("--model", help="model id (default: the server's first, its default preset)")
    ap.add_argument("--chats", type=int, default=64, help="concurrent chats, all started at once")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: unset (the rest of the context)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--prompt", default="Tell me a short story about a lighthouse keeper.")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between /metrics polls")
    ap.add_argument("--api-key")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds; chats still generating then are closed and counted as cut (default: wait for all)")
    args = ap.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    if report["errors"] or report["completed"] + report["cut_at_deadline"] < args.chats:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
