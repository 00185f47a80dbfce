"""`supernet serve` as a user runs it: a real process, presets.yaml from the checkpoint, Ctrl-C draining."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from openai import OpenAI
from typer.testing import CliRunner

from tests.serving.conftest import free_port, wait_until_healthy

PRESETS_YAML = """\
default: hybrid
presets:
  - name: hybrid
    placement: "fa,gdn,swa,kda"
    predicted_quality: -2.31   # extra keys written by the placement optimiser are ignored
    speedup: 1.7
  - name: fast
    placement: "gdn*4"
"""


def test_serve_without_weights_says_how_to_get_them(tmp_path):
    from supernet.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "no supernet checkpoint here" in result.output and "supernet build --out DIR" in result.output


def test_serve_rejects_bad_flags(tiny_dir):
    from supernet.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--port", "70000"])
    assert result.exit_code == 2 and "--port 70000" in result.output


def test_bad_presets_file_is_named(tiny_dir, tmp_path):
    from serving.presets import PresetError, load_presets

    (tmp_path / "presets.yaml").write_text("presets:\n  - name: x\n    placement: 'fa*3'\n")
    with pytest.raises(PresetError, match=r"presets.yaml: preset 'x': placement has 3 layer\(s\)"):
        load_presets(tmp_path, 4)


@pytest.fixture(scope="module")
def served_process(tiny_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served") / "tiny-hybrid"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "presets.yaml").write_text(PRESETS_YAML)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supernet.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url)
    yield proc, url
    if proc.poll() is None:
        proc.kill()


def test_ctrl_c_drains_in_flight_requests_then_exits(served_process):
    proc, url = served_process
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-hybrid", "tiny-hybrid:hybrid", "tiny-hybrid:fast"]  # presets.yaml, default first

    started = threading.Barrier(4)
    results: dict[int, tuple[int, str | None]] = {}

    def stream(i: int) -> None:
        chunks, finish = 0, None
        for chunk in client.completions.create(
            model="tiny-hybrid" if i % 2 else "tiny-hybrid:fast",
            prompt="Call me Ishmael.",
            max_tokens=120,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            chunks += 1
            if chunks == 1:
                started.wait()
            finish = chunk.choices[0].finish_reason or finish
        results[i] = (chunks, finish)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait()  # every stream is mid-flight
    proc.send_signal(signal.SIGINT)
    for t in threads:
        t.join(60)
    assert proc.wait(60) == 0
    log = proc.stdout.read()
    assert all(results[i][1] == "length" and results[i][0] >= 2 for i in range(3)), (results, log)
    assert "Finished server process" in log or "Shutting down" in log
    with pytest.raises(httpx.TransportError):  # and it is really gone
        httpx.get(url + "/health", timeout=2)


def test_default_model_name():
    import supernet
    from serving.server import default_model_name

    assert default_model_name(supernet.DEMO_DIR) == "supernet-demo"
    assert default_model_name("runs/sn_serve") == "sn_serve"
