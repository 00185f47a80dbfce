"""Per preset, side by side: the supernet on the embedded engine vs on vLLM (the serving.vllm plugin).

Both run behind the same HTTP layer (``supernet serve --backend embedded`` and ``--backend vllm``), one after the
other on this machine, serving the same presets; the same streaming ``openai`` client measures each preset by
model id ``sn:<preset>`` -- time to first token, inter-token latency and decode tok/s over the window in which
the whole batch is decoding (the method and helpers of benchmarks/bench_vs_vllm.py). The table at the end puts
the two backends' decode tok/s next to each other, with the ratio vLLM / embedded.

vLLM runs eager (no torch.compile: minutes of start-up on CPU) in the checkpoint's dtype (fp32 here), with the
same thread count as the embedded engine (OMP_NUM_THREADS, no core pinning). Numbers are only meaningful on an
otherwise idle machine.

Full run (an idle machine, ~20-30 min):
    python benchmarks/bench_vllm.py --json bench_vllm.json
Smoke check:
    python benchmarks/bench_vllm.py --presets all-fa,all-gdn --contexts 64 --batches 1 --new-tokens 4 \
        --stagger 8 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_vllm import Server, free_port, measure, started  # noqa: E402 - the shared measuring method


def serve_cmd(backend: str, model_dir: Path, port: int, presets: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "supernet.cli", "serve", "--backend", backend, "--model", str(model_dir),
           "--port", str(port), "--served-model-name", "sn", "--presets", str(presets),
           "--max-model-len", str(args.max_model_len), "--cache-budget-gib", str(args.cache_gib),
           "--log-level", "warning"]  # fmt: skip
    if backend == "embedded":
        return [*cmd, "--threads", str(args.threads)]
    return [*cmd, "--dtype", "float32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="supernet checkpoint (default: the demo)")
    ap.add_argument("--presets", default="all-fa,all-swa,all-gdn,all-kda", help="comma list of placements")
    ap.add_argument("--contexts", default="1024", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per request measured in the window")
    ap.add_argument("--stagger", type=int, default=128, help="extra tokens a request may need while others prefill")
    ap.add_argument("--rounds", type=int, default=2, help="batches per cell (median)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of each backend")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--cache-gib", type=float, default=4.0)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import supernet
    from supernet.config import SupernetConfig

    model_dir = (args.model or supernet.DEMO_DIR).resolve()
    vocab = SupernetConfig.load(model_dir).vocab_size
    presets = args.presets.split(",")
    logs = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    presets_file = logs / "presets.yaml"
    presets_file.write_text(json.dumps({"presets": [{"name": p, "placement": p} for p in presets]}))
    print(f"# {model_dir.name}: presets {presets}, contexts {args.contexts}, batches {args.batches}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; logs in {logs}")  # fmt: skip
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads),
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL="WARNING")  # fmt: skip
    results: list[dict] = []
    for backend in ("embedded", "vllm"):
        port = free_port()
        cmd = serve_cmd(backend, model_dir, port, presets_file, args)
        with started(cmd, env, port, logs / f"{backend}.log", args.start_timeout):
            for preset in presets:
                url = f"http://127.0.0.1:{port}/v1"
                measure(Server(f"{backend} {preset}", url, f"sn:{preset}", {}), args, vocab, args.max_model_len,
                        results)  # fmt: skip
    print(f"\n{'preset':<16} {'ctx':>6} {'B':>3} {'embedded tok/s':>15} {'vllm tok/s':>11} {'vllm/emb':>9}")
    for row in results:
        backend, preset = row["server"].split(" ", 1)
        if backend != "embedded" or "error" in row:
            continue
        other = next((r for r in results if r["server"] == f"vllm {preset}" and r["context"] == row["context"]
                      and r["batch"] == row["batch"] and r.get("decode_tok_s")), None)  # fmt: skip
        theirs = f"{other['decode_tok_s']:.1f}" if other else "-"
        ratio = f"{other['decode_tok_s'] / row['decode_tok_s']:.2f}x" if other else "-"
        print(f"{preset:<16} {row['context']:>6} {row['batch']:>3} {row['decode_tok_s']:>15.1f} {theirs:>11} "
              f"{ratio:>9}")  # fmt: skip
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
