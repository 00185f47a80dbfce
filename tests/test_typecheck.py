"""Lint and types are part of the suite, so the one test command (`.venv/bin/python -m pytest -q`) also keeps
`ruff check` and `mypy` clean. Both read their settings from pyproject.toml ([tool.ruff], [tool.mypy]); mypy
keeps its incremental cache in .mypy_cache, so reruns take seconds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean():
    out = run_tool("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.skipif(shutil.which("mypy", path=str(Path(sys.executable).parent)) is None, reason="mypy not installed")
def test_mypy_is_clean():
    out = run_tool("mypy")  # packages and per-module settings: [tool.mypy] in pyproject.toml
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Success" in out.stdout
