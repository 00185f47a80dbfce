"""The CPU image's entry command, run outside a container, serves requests; the dashboard's metrics are the ones a
live server exports, and a real Prometheus scraping that server with deploy/prometheus/prometheus.yml evaluates
every dashboard query."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import httpx
import openai
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import DEPLOY, DOCKERFILES, dashboard_queries, dockerfile, for_prometheus, metric_names
from tests.serving.conftest import build_tiny_checkpoint, free_port

API_KEY = "deploy-test-key"


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{url} did not answer within {seconds} s:\n{proc.communicate(timeout=30)[0]}")


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """`python deploy/entrypoint.py` -- the image's ENTRYPOINT -- configured only by SUPERNET_* variables."""
    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny-supernet")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERNET_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        SUPERNET_MODEL=str(model_dir),
        SUPERNET_HOST="127.0.0.1",
        SUPERNET_PORT=str(port),
        SUPERNET_SERVED_MODEL_NAME="tiny",
        SUPERNET_THREADS="1",
        SUPERNET_MAX_NUM_SEQS="4",
        SUPERNET_SHUTDOWN_TIMEOUT="10",
        SUPERNET_API_KEY=API_KEY,
        SUPERNET_CACHE=str(tmp_path_factory.mktemp("cache")),
    )
    proc = subprocess.Popen(
        [sys.executable, str(DEPLOY / "entrypoint.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc, 300)  # ~15 s idle; minutes on a saturated 2-core box
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def run_healthchecks(port: int) -> list[int]:
    """Each image's HEALTHCHECK command (exec form, `python` being the image's venv), run here against ``port``."""
    codes = []
    for path in DOCKERFILES:
        (health,) = [i["value"] for i in dockerfile(path).structure if i["instruction"] == "HEALTHCHECK"]
        argv = json.loads(health.split(" CMD ", 1)[1])
        assert argv[0] == "python"
        env = {**os.environ, "SUPERNET_PORT": str(port)}
        codes.append(subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode)
    return codes


def client(url: str, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_entry_command_serves_requests(entry):
    proc, url = entry
    assert run_healthchecks(int(url.rsplit(":", 1)[1])) == [0, 0]  # the images' health checks pass
    api = client(url)
    ids = [m.id for m in api.models.list().data]
    assert "tiny" in ids and any(i.startswith("tiny:") for i in ids)  # every preset is a model id
    chat = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Call me Ishmael."}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
    spec = api.completions.create(  # self-speculative decoding, forced on: its counters get samples
        model="tiny", prompt="It is a truth", max_tokens=12, temperature=0, extra_body={"speculative": True}
    )
    assert spec.usage.completion_tokens >= 1
    preset = next(i for i in ids if i.startswith("tiny:"))
    text = api.completions.create(model=preset, prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert text.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):  # SUPERNET_API_KEY reached the server
        client(url, "wrong").models.list()
    with pytest.raises(openai.NotFoundError):  # counted in supernet_requests_rejected_total
        api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}], max_tokens=2)


def live_metrics(url: str) -> dict[str, list]:
    """sample name -> samples, from the server's /metrics as Prometheus' text parser reads it."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_every_dashboard_metric_is_exported_by_the_live_server(entry):
    _, url = entry
    samples = live_metrics(url)
    queried = set().union(*(metric_names(e) for e in dashboard_queries()))
    assert len(queried) >= 10
    missing = sorted(queried - set(samples))
    assert missing == [], f"dashboard queries metrics the server does not export: {missing}"
    # the labels the panels group by are labels of those metrics
    for expr in dashboard_queries():
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                for name in metric_names(expr):
                    assert all(label in s.labels for s in samples[name]), (label, name)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian package) not installed")
def test_prometheus_scrapes_the_server_and_evaluates_every_panel(entry, tmp_path):
    proc, url = entry
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    prom_url = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list:
        with urllib.request.urlopen(f"{prom_url}/api/v1/query?" + httpx.QueryParams(query=expr).__str__()) as r:
            body = json.load(r)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    try:
        wait_for(prom_url + "/-/ready", prom, 120)
        api = client(url)
        deadline = time.monotonic() + 120
        while True:  # traffic between scrapes, until Prometheus has several scrapes of a busy server
            api.completions.create(
                model="tiny",
                prompt="To be, or not to be",
                max_tokens=6,
                temperature=0,
                extra_body={"speculative": True},
            )
            scrapes = query('count_over_time(up{job="supernet"}[1m])')
            if scrapes and float(scrapes[0]["value"][1]) >= 4 and query("up") and query("up")[0]["value"][1] == "1":
                break
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.3)
        for expr in dashboard_queries():
            promql = for_prometheus(expr)
            promql = re.sub(r"label_values\((\w+), (\w+)\)", r"group by (\2) (\1)", promql)
            assert query(promql), f"no series for dashboard query: {promql}"
    finally:
        prom.terminate()
        prom.wait(timeout=30)


def test_sigterm_drains_in_flight_requests_then_exits(entry):
    """What `docker stop` and Kubernetes send: a request in flight finishes, then the server exits (uvicorn
    re-raises SIGTERM after its graceful shutdown, so the status is the signal's, 143 in a container)."""
    proc, url = entry
    chunks, finish = 0, None
    for chunk in client(url).completions.create(
        model="tiny",
        prompt="Call me Ishmael.",
        max_tokens=100,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        chunks += 1
        if chunks == 1:
            proc.send_signal(signal.SIGTERM)  # mid-stream
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length" and chunks >= 50  # the stream ran to max_tokens after the signal
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    output = proc.stdout.read()
    assert "Finished server process" in output
    assert "supernet serve" in output and API_KEY not in output  # the resolved command, secret not shown
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    assert all(code != 0 for code in run_healthchecks(int(url.rsplit(":", 1)[1])))  # and now fail
