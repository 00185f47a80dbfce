"""`supernet place ...` bad inputs fail with exit code 2 and a message naming the bad value (before any model
load)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from supernet.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["place", *map(str, args)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--placement", "fa,mamba,fa,fa"], "unknown mixer 'mamba'"),
        (["eval", "--placement", "fa,gdn"], "placement has 2 layer(s) but the model has 4"),
        (["eval", "--placement", "all-fa", "--metrics", "ppl"], "unknown metric 'ppl'"),
        (["profile", "--placement", "gdn*5"], "placement has 5 layer(s) but the model has 4"),
        (["profile", "--cost-model", "analytic:tpu"], "unknown GPU 'tpu'"),
        (
            ["search", "--out", "OUT", "--budget", "0.01"],
            "--budget 0.01 (cost relative to all-FA) is infeasible",
        ),
        (
            ["search", "--out", "OUT", "--min-fa", "5"],
            "--min-fa 5: must be between 0 and the number of layers (4)",
        ),
        (
            ["search", "--out", "OUT", "--min-fa", "2", "--budget", "0.3"],
            "is infeasible: the cheapest placement",
        ),
        (["search", "--out", "OUT", "--allowed", "fa,any"], "--allowed lists 2 layer(s) but the model has 4"),
        (["search", "--out", "OUT", "--allowed", "fa,kimi2,any*2"], "unknown mixer 'kimi2'"),
        (["search", "--out", "OUT", "--kv-budget", "1KiB"], "no placement satisfies the constraints"),
        (["eval", "--placement", "all-fa", "--device", "tpu"], "--device 'tpu'"),
        (["eval", "--placement", "all-fa", "--dtype", "fp8"], "--dtype 'fp8'"),
        (["search", "--out", "OUT", "--kv-budget", "lots"], "--kv-budget 'lots'"),
        (["search", "--out", "OUT", "--quality", "ppl=1"], "unknown metric 'ppl'"),
        (["search", "--out", "OUT", "--cost-model", "guess"], "expected 'measured' or 'analytic:<gpu>'"),
        (["search", "--out", "OUT", "--needle-lengths", "1k"], "--needle-lengths '1k'"),
    ],
)
def test_bad_inputs_are_clear_errors(tiny_ckpt, tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "p.yaml")) for a in args]
    result = run(*args[:1], "--model", tiny_ckpt, *args[1:])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "p.yaml").exists()


def test_missing_checkpoint(tmp_path):
    result = run("search", "--model", tmp_path / "nope", "--out", tmp_path / "p.yaml")
    assert result.exit_code == 2 and "no config.json" in result.output


def test_profile_prints_speedups(tiny_ckpt, tmp_path):
    result = run(
        "profile",
        "--model",
        tiny_ckpt,
        "--cost-model",
        "analytic:h100-sxm",
        "--context",
        4096,
        "--placement",
        "fa,gdn,gdn,fa",
        "--out",
        tmp_path / "c.json",
    )
    assert result.exit_code == 0, result.output
    assert "all-gdn" in result.output and "fa,gdn*2,fa: speed-up" in result.output
    assert (tmp_path / "c.json").is_file()


def test_eval_prints_metrics_and_caches(tiny_ckpt, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("SUPERNET_CACHE", str(tmp_path / "cache"))
    args = ["eval", "--model", tiny_ckpt, "--placement", "all-fa", "--placement", "swa,gdn,kda,fa",
            "--metrics", "trace_loglik,kl,needle_acc", "--trace-length", 48, "--needle-lengths", 300,
            "--sources", "demo:shakespeare", "--db", tmp_path / "r.sqlite"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in first.output.splitlines() if line.startswith("{")]
    assert [r["placement"] for r in rows] == ["fa*4", "swa,gdn,kda,fa"]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and 0 <= rows[1]["needle_acc"] <= 1
    again = run(*args)  # served from the database: identical numbers
    assert [json.loads(line) for line in again.output.splitlines() if line.startswith("{")] == rows


def test_eval_in_bf16_is_stored_apart_from_fp32(tiny_ckpt, tmp_path, monkeypatch):
    """--dtype bf16 scores the placement in bf16 and stores it under its own key: the fp32 row in the same
    database is neither reused for it nor overwritten by it."""
    import json
    import sqlite3

    monkeypatch.setenv("SUPERNET_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "r.sqlite"
    base = ["eval", "--model", tiny_ckpt, "--placement", "swa,gdn,kda,fa", "--metrics", "trace_loglik",
            "--trace-length", 48, "--sources", "demo:shakespeare", "--db", db]
    scores = {}
    for dtype in ("fp32", "bf16"):
        result = run(*base, "--dtype", dtype)
        assert result.exit_code == 0, result.output
        scores[dtype] = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert scores["fp32"]["trace_loglik"] != scores["bf16"]["trace_loglik"]
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        keys = {r[0] for t in tables for r in con.execute(f"select * from {t}") if isinstance(r[0], str)}
    assert any(k.endswith("@cpu-bfloat16") for k in keys) and any("@" not in k for k in keys)
