"""Paths and readers shared by the deployment tests: the files under deploy/ as their tools would read them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
COMPOSE_FILES = (DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml")
K8S_FILES = tuple(sorted((DEPLOY / "k8s").rglob("*.yaml")))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "supernet.json"


def load_entrypoint():
    """deploy/entrypoint.py as a module (it is copied into the images, not installed as a package)."""
    spec = importlib.util.spec_from_file_location("supernet_entrypoint", DEPLOY / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def k8s_resources() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers(resource: dict) -> list[dict]:
    return resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def dockerfile(path: Path):
    """Parsed by dockerfile-parse (ENV/ARG resolved per stage, continuation lines joined)."""
    import io

    from dockerfile_parse import DockerfileParser

    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def environment() -> dict[str, dict[str, str | None]]:
    """Every environment variable the deploy files set, by file, with its literal value (None when it comes from
    elsewhere: a Secret, the shell): Dockerfile ENV, compose `environment`, Kubernetes container `env`."""
    found: dict[str, dict[str, str | None]] = {}
    for path in DOCKERFILES:
        found[path.name] = dict(dockerfile(path).envs)
    for path in COMPOSE_FILES:
        values: dict[str, str | None] = {}
        for service in yaml.safe_load(path.read_text())["services"].values():
            env = service.get("environment", {})
            items = env if isinstance(env, list) else [f"{k}={v}" if v is not None else k for k, v in env.items()]
            values |= {i.split("=", 1)[0]: (i.split("=", 1)[1] if "=" in i else None) for i in items}
        found[path.name] = values
    for path, resource in k8s_resources():
        for container in containers(resource):
            values = found.setdefault(str(path.relative_to(DEPLOY)), {})
            values |= {e["name"]: e.get("value") for e in container.get("env", [])}
    return found


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"] for v in board.get("templating", {}).get("list", []) if isinstance(v.get("query"), str)]
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bsupernet_[a-zA-Z0-9_]+", expr))


def for_prometheus(expr: str) -> str:
    """A dashboard query as Prometheus itself evaluates it once Grafana has filled in its variables."""
    return expr.replace("$__rate_interval", "1m").replace('"$preset"', '".*"')
