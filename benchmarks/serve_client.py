"""What the load scripts share: start `supernet serve` and wait for /health, read a streamed chat completion,
and percentiles. (Scripts run as `python benchmarks/<name>.py`, so this sits beside them on sys.path.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_server(model: Path, port: int, *flags: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`supernet serve --model MODEL --port PORT FLAGS...` in a subprocess; returns once /health answers 200."""
    cmd = [sys.executable, "-m", "supernet.cli", "serve", "--model", str(model), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start within {timeout:.0f} s")


async def read_chat_stream(stream, t0: float) -> tuple[float | None, str | None, int]:
    """(time to first content token since t0, finish reason, completion tokens from the usage chunk)."""
    ttft, finish, tokens = None, None, 0
    async for chunk in stream:
        if chunk.choices:
            if ttft is None and chunk.choices[0].delta.content:
                ttft = time.monotonic() - t0
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, finish, tokens


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]
