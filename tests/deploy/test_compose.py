"""The compose stack (server + Prometheus + Grafana): schema-valid files that point at each other correctly, and a
dashboard that loads with Grafana's schema models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import COMPOSE_FILES, DASHBOARD, DEPLOY, dashboard_queries

CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")


def check_compose(*paths: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with the compose-spec schema it ships (vendor.compose-spec): no network needed."""
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_files_are_valid_against_the_compose_spec():
    result = check_compose(*COMPOSE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_validator_rejects_a_broken_file(tmp_path):
    broken = compose()
    broken["services"]["supernet"]["healthcheck"]["intervall"] = "30s"  # unknown key
    broken["services"]["prometheus"]["ports"] = "9090:9090"  # a string where a list belongs
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = check_compose(path)
    assert result.returncode != 0 and "intervall" in result.stdout + result.stderr


def test_compose_wiring_points_at_real_files_and_the_server_port():
    spec = compose()
    services = spec["services"]
    assert set(services) == {"supernet", "prometheus", "grafana"}
    build = services["supernet"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["supernet"]
    assert (DEPLOY / gpu["build"]["context"] / gpu["build"]["dockerfile"]).is_file()
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for service in services.values():  # every bind mount names a file or folder of this repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    assert "/health" in " ".join(services["supernet"]["healthcheck"]["test"])
    assert services["supernet"]["ports"] == ["8000:8000"]
    # Prometheus scrapes the compose service by name on the server's port; Grafana reads that Prometheus
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["supernet:8000"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/supernet.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    host_dir = {container: host for host, container in mounts.items()}[providers["providers"][0]["options"]["path"]]
    assert (DEPLOY / host_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    # every panel queries the provisioned data source
    board = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in board["panels"]} == {source["uid"]}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_prometheus_config_passes_promtool():
    result = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query (Grafana's variables filled in) as a recording rule: a PromQL syntax check."""
    from tests.deploy.helpers import for_prometheus

    exprs = [for_prometheus(e) for e in dashboard_queries() if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and f"{len(exprs)} rules found" in result.stdout, result.stdout + result.stderr


def test_dashboard_json_is_what_the_generator_writes():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import dashboard as generator
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == generator.render(), "regenerate: python deploy/grafana/dashboard.py"


def test_dashboard_loads_with_grafana_schema_models():
    """Grafana's foundation SDK models are generated from Grafana's dashboard schema: the dashboard decodes into
    them (panels and Prometheus queries included) and encodes back without losing a field, so every field is one
    the schema knows."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.models import prometheus
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    data = json.loads(DASHBOARD.read_text())
    board = Dashboard.from_json(data)
    assert board.uid == "supernet-serving" and len(board.panels) == len(data["panels"]) >= 10
    assert all(isinstance(t, prometheus.Dataquery) for p in board.panels for t in p.targets)
    assert lost(data, round_trip(data)) == []
    data["panels"][0]["gridpos"] = data["panels"][0].pop("gridPos")  # the check bites on a misspelt field
    assert "/panels[0]/gridpos" in lost(data, round_trip(data))


def round_trip(data: dict) -> dict:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    return json.loads(json.dumps(Dashboard.from_json(data).to_json(), cls=JSONEncoder))


def lost(a, b, path: str = "") -> list[str]:
    """Where ``b`` lacks a key of ``a`` or differs from it."""
    if isinstance(a, dict):
        return [f"{path}/{k}" for k in a if k not in b] + [
            x for k in a if k in b for x in lost(a[k], b[k], f"{path}/{k}")
        ]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: length"]
        return [x for i, (u, v) in enumerate(zip(a, b, strict=True)) for x in lost(u, v, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_dashboard_covers_throughput_latency_queue_and_cache_per_preset():
    joined = "\n".join(dashboard_queries())
    for metric in (
        "supernet_generation_tokens_total",
        "supernet_time_to_first_token_seconds_bucket",
        "supernet_inter_token_latency_seconds_bucket",
        "supernet_requests_waiting",
        "supernet_cache_usage_ratio",
    ):
        assert metric in joined, metric
    assert "by (le, preset)" in joined and "histogram_quantile(0.99" in joined
