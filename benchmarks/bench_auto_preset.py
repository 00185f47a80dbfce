"""Load test of the auto preset: concurrency rises in steps and falls again; every request asks for
``<model>:auto``, and the preset that served it (the response's model id) is tallied per step.

Expected: the mix shifts to faster presets as the number of concurrent clients rises and back to the faithful
preset as it falls, and no request ever runs on a preset below the quality floor (checked against presets.yaml
when --model is given).

    python benchmarks/bench_auto_preset.py --model supernet/demo --latency-target-ms 150 --min-quality -3.8
    python benchmarks/bench_auto_preset.py --url http://127.0.0.1:8000 --steps 1,8,32,8,1

Numbers depend on the machine and what else runs on it: measure on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import serve_client
from openai import AsyncOpenAI

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Describe a sunrise over the mountains.",
]


async def client_loop(client: AsyncOpenAI, model: str, worker: int, deadline: float, args, step: dict) -> None:
    i = worker
    while time.monotonic() < deadline:
        i += 1
        t0 = time.monotonic()
        try:
            r = await client.chat.completions.create(
                model=f"{model}:auto",
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=args.max_tokens,
                temperature=0.7,
                seed=i,
            )
        except Exception as err:  # counted, reported, never hidden
            step["errors"].append(f"{type(err).__name__}: {err}"[:200])
            continue
        chosen = r.model.split(":", 1)[1]
        step["mix"][chosen] = step["mix"].get(chosen, 0) + 1
        if r.usage and r.usage.completion_tokens > 1:
            step["s_per_token"].append((time.monotonic() - t0) / r.usage.completion_tokens)


async def run(url: str, args) -> list[dict]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=600)
    ids = [m.id for m in (await client.models.list()).data]
    if not any(i.endswith(":auto") for i in ids):
        raise SystemExit("this server does not offer the auto preset (docs/serving.md, The auto preset)")
    model = ids[0]
    steps = []
    for clients in (int(c) for c in args.steps.split(",")):
        step: dict = {"clients": clients, "mix": {}, "errors": [], "s_per_token": []}
        deadline = time.monotonic() + args.step_seconds
        await asyncio.gather(*(client_loop(client, model, w, deadline, args, step) for w in range(clients)))
        times = step.pop("s_per_token")
        step["ms_per_token_p50"] = round(1000 * statistics.median(times), 1) if times else None
        step["errors"] = step["errors"][:3] + ([f"... {len(step['errors'])} in all"] if step["errors"] else [])
        steps.append(step)
        print(json.dumps(step), flush=True)
    steps.append({"metrics": [ln for ln in httpx.get(url + "/metrics").text.splitlines() if "auto_preset" in ln]})
    return steps


def check_floor(steps: list[dict], model_dir: Path, floor: float | None) -> list[str]:
    """Presets served below the floor (must be empty)."""
    from supernet.presets import read_presets

    if floor is None:
        return []
    quality = {p.name: p.measured_quality for p in read_presets(model_dir / "presets.yaml").presets}
    return sorted({p for s in steps for p in s.get("mix", {}) if (quality.get(p) or float("-inf")) < floor})


def start_server(args) -> tuple[subprocess.Popen, str]:
    flags = ["--log-level", "warning", "--latency-target-ms", str(args.latency_target_ms)]
    if args.min_quality is not None:
        flags += ["--min-quality", str(args.min_quality)]
    return serve_client.start_server(args.model, args.port, *flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (else one is started with --model)")
    ap.add_argument("--model", type=Path, help="checkpoint with a scored presets.yaml (default: the demo)")
    ap.add_argument("--port", type=int, default=8013)
    ap.add_argument("--steps", default="1,4,16,4,1", help="concurrent clients per step, comma-separated")
    ap.add_argument("--step-seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-target-ms", type=float, default=100.0, help="when this script starts the server")
    ap.add_argument("--min-quality", type=float, help="when this script starts the server")
    ap.add_argument("--api-key")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    proc, url = None, args.url
    if url is None:
        import supernet

        args.model = args.model or Path(supernet.DEMO_DIR)
        proc, url = start_server(args)
    try:
        steps = asyncio.run(run(url.rstrip("/"), args))
    finally:
        if proc is not None:
            proc.send_signal(2)
            proc.wait(60)
    if args.model is not None:
        below = check_floor(steps, args.model, args.min_quality)
        steps.append({"presets_below_floor": below})
        if below:
            print(f"FLOOR CROSSED: {below}", file=sys.stderr)
    print(json.dumps(steps[-2:], indent=2))
    if args.json:
        args.json.write_text(json.dumps(steps, indent=2))


if __name__ == "__main__":
    main()
