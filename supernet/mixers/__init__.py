"""The four token mixers behind one interface (see base.Mixer)."""

from __future__ import annotations

from supernet.config import SupernetConfig
from supernet.mixers.attention import Attention
from supernet.mixers.base import Mixer, MixerContext
from supernet.mixers.delta import GatedDeltaNet, KimiDeltaAttention

__all__ = ["Mixer", "MixerContext", "build_mixer"]


def build_mixer(name: str, config: SupernetConfig) -> Mixer:
    """One mixer of one layer. In ``lora`` mode FA holds no weights (it is the layer's teacher attention)."""
    own = config.mixer_weights == "full"
    rank = 0 if own else config.lora_rank
    if name == "fa":
        return Attention("fa", config, config.fa, own=own, lora_rank=0)
    if name == "swa":
        return Attention("swa", config, config.swa, own=own, lora_rank=rank)
    if name == "gdn":
        return GatedDeltaNet("gdn", config, config.gdn, own=own, lora_rank=rank)
    if name == "kda":
        return KimiDeltaAttention("kda", config, config.kda, own=own, lora_rank=rank)
    raise ValueError(f"unknown mixer {name!r}")
