"""A search killed with SIGKILL resumes from the results database without re-evaluating finished placements,
and ends with the same presets as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import yaml
from typer.testing import CliRunner

from supernet.cli import app

runner = CliRunner()


def search_args(ckpt, out, db) -> list[str]:
    return ["place", "search", "--model", str(ckpt), "--out", str(out), "--db", str(db), "--no-baseline",
            "--no-measure-cpu", "--evals", "12", "--init-random", "4", "--per-round", "2", "--presets", "3",
            "--distance", "1", "--trace-sequences", "2", "--trace-length", "64",
            "--needle-lengths", "300,500", "--sources", "demo:shakespeare", "--context", "1024",
            "--batch", "2"]


def count(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM computations").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_search_resumes_after_sigkill(tiny_ckpt, tmp_path, monkeypatch):
    env = {**os.environ, "SUPERNET_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    monkeypatch.setenv("SUPERNET_CACHE", env["SUPERNET_CACHE"])
    db, out = tmp_path / "r.sqlite", tmp_path / "presets.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "supernet.cli", *search_args(tiny_ckpt, out, db)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while count(db) < 9 and proc.poll() is None and time.time() < deadline:  # 3 placements x 3 metrics
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # killed mid-way
    with sqlite3.connect(db) as c:
        first = c.execute("SELECT checkpoint, placement, metric, data FROM computations").fetchall()
    assert len(first) >= 9

    # resume with the same command line (in this process, through the same CLI entry point)
    done = runner.invoke(app, search_args(tiny_ckpt, out, db))
    assert done.exit_code == 0, done.output[-2000:]
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT checkpoint, placement, metric, data, pid FROM computations").fetchall()
        n_results = c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    keys = [r[:4] for r in rows]
    assert len(keys) == len(set(keys)) == n_results  # nothing computed twice
    second = [r[:4] for r in rows if r[4] == os.getpid()]
    assert second and not set(second) & set(first)  # the resumed run only computed what was missing
    resumed = yaml.safe_load(out.read_text())

    # an uninterrupted run on a fresh database makes the same choices
    fresh_out = tmp_path / "fresh.yaml"
    fresh = runner.invoke(app, search_args(tiny_ckpt, fresh_out, tmp_path / "fresh.sqlite"))
    assert fresh.exit_code == 0, fresh.output[-2000:]
    fresh = yaml.safe_load(fresh_out.read_text())
    assert [p["placement"] for p in resumed["presets"]] == [p["placement"] for p in fresh["presets"]]
    assert resumed["presets"][0]["name"] == resumed["default"] == "all-fa"
    assert set(resumed["presets"][0]["needle_acc_by_length"]) == {300, 500}
    quality = [p["measured_quality"] for p in resumed["presets"]]
    assert quality == [p["measured_quality"] for p in fresh["presets"]]
