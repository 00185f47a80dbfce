"""Tensor parallelism for the supernet: every rank holds a slice of each layer's heads (Megatron-style).

``shard_model(model, rank, world, reduce)`` cuts a loaded ``SupernetForCausalLM`` in place into rank ``rank``'s
slice of ``world``; the vLLM plugin does this on every tensor-parallel worker and passes vLLM's all-reduce. The
math stays the mixers' own: a sharded mixer is the same module with fewer heads.

How each parameter of a decoder layer is cut (``PLAN``; a parameter no rule names is an error, so a new one
cannot be replicated by accident):

* column-parallel (output rows split by head, each rank computes its heads): q/k/v of the layer's teacher
  attention (``attn``) and of mixers that own theirs, the LoRA ``B`` factors of q/k/v (their ``A`` factors
  are replicated: every rank needs the whole rank-r projection), the MLP's gate and up projections, and
  everything GDN/KDA keep per head or per head channel: the short-convolution channels (q|k|v, each third
  split), ``A_log``, ``dt_bias``, beta's ``b_proj`` rows, GDN's ``a_proj`` rows, KDA's decay up-projection
  rows and the output gate's up-projection rows (their low-rank down projections are replicated).
* row-parallel (input columns split): o_proj, the LoRA ``A`` factor of o (its ``B`` replicated) and the MLP's
  down projection. Each rank's output is a partial sum; ``DecoderLayer.reduce`` (an all-reduce under
  tensor parallelism, the identity otherwise) adds them up once after the mixer and once after the MLP. A
  row-parallel bias (the MLP's, with ``mlp_bias``) stays on rank 0 and is zero elsewhere, so it is added
  once.
* replicated: the norms (``norm_weight`` of GDN/KDA is per head_dim, shared by every head), embeddings and the
  LM head. Replicating the embeddings and head costs ``2 * vocab * hidden`` parameters on every rank (one
  copy when tied); vocab-parallel embeddings would save that but need a gather of the logits.

Query and KV heads are split together (rank r holds KV heads ``r*Hkv/world ...`` and exactly the query heads
that read them: GQA's grouping is contiguous, see ``supernet.layers.repeat_heads``), so ``world`` must divide
every KV-head count, and therefore every query-head count, and the MLP's intermediate size; anything else is
refused by ``check_tensor_parallel`` naming the counts. GDN/KDA tile the teacher's KV heads over their query
heads (``kv_repeat``), which keeps working on the local heads. Recurrent states and KV caches then hold local
heads only: ``new_state`` of a sharded model, and ``local_config`` for anything that sizes caches from a config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from supernet.config import SupernetConfig
from supernet.mixers.attention import Attention
from supernet.mixers.delta import DeltaMixer
from supernet.model import DecoderLayer, SupernetForCausalLM, no_reduce


@dataclass(frozen=True)
class Split:
    """How one parameter is cut: along ``dim`` (None: replicated), as ``groups`` equal blocks each split
    (GDN/KDA's conv channels are q|k|v), or kept whole on rank 0 only (a row-parallel bias)."""

    dim: int | None
    groups: int = 1
    first_rank_only: bool = False


REPLICATED, COLUMN, ROW = Split(None), Split(0), Split(1)
ROW_BIAS = Split(None, first_rank_only=True)

_PROJ = r"(?:attn|mixers\.\w+\.proj\.own)"  # the teacher's shared projections, or a mixer's own
_DELTA_PER_HEAD = r"b_proj\.(?:weight|bias)|A_log|dt_bias|a_proj\.weight|f_proj\.up\.weight|gate\.up\.(?:weight|bias)"
PLAN: tuple[tuple[re.Pattern[str], Split], ...] = tuple(
    (re.compile(pattern), split)
    for pattern, split in (
        (r"(?:input|post_attention)_layernorm\.weight", REPLICATED),
        (r"mlp\.(?:gate|up)_proj\.(?:weight|bias)", COLUMN),
        (r"mlp\.down_proj\.weight", ROW),
        (r"mlp\.down_proj\.bias", ROW_BIAS),
        (rf"{_PROJ}\.[qkv]_proj\.(?:weight|bias)", COLUMN),
        (rf"{_PROJ}\.o_proj\.weight", ROW),
        (rf"{_PROJ}\.o_proj\.bias", ROW_BIAS),
        (r"mixers\.\w+\.proj\.lora\.[qkv]\.A", REPLICATED),
        (r"mixers\.\w+\.proj\.lora\.[qkv]\.B", COLUMN),
        (r"mixers\.\w+\.proj\.lora\.o\.A", ROW),
        (r"mixers\.\w+\.proj\.lora\.o\.B", REPLICATED),
        (r"mixers\.\w+\.conv_weight", Split(0, groups=3)),
        (rf"mixers\.\w+\.(?:{_DELTA_PER_HEAD})", COLUMN),
        (r"mixers\.\w+\.(?:norm_weight|gate\.down\.weight|f_proj\.down\.weight)", REPLICATED),
    )
)


def split_of(name: str) -> Split:
    """The rule for a decoder-layer parameter (``name`` relative to the layer, e.g. ``mlp.down_proj.weight``)."""
    for pattern, split in PLAN:
        if pattern.fullmatch(name):
            return split
    raise ValueError(f"no tensor-parallel rule for decoder-layer parameter {name!r}")


def shard_tensor(name: str, tensor: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s slice of the full layer parameter ``name`` (a new contiguous tensor, or ``tensor`` itself
    when replicated)."""
    split = split_of(name)
    if split.first_rank_only:
        return tensor if rank == 0 else torch.zeros_like(tensor)
    if split.dim is None or world == 1:
        return tensor
    size = tensor.shape[split.dim]
    if size % (split.groups * world):
        raise ValueError(f"{name}: dimension {split.dim} ({size}) does not split into {split.groups} x {world}")
    blocks = tensor.chunk(split.groups, dim=split.dim)
    return torch.cat([b.chunk(world, dim=split.dim)[rank] for b in blocks], dim=split.dim).contiguous()


def _check(counts: Iterable[tuple[str, int]], world: int) -> None:
    if world < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {world}")
    bad = {name: n for name, n in counts if n % world}
    if bad:
        raise ValueError(
            f"tensor parallel size {world} must divide every head count it splits (query and KV heads are split "
            f"together, so at most the number of KV heads) and the MLP's intermediate size; "
            f"it does not divide {', '.join(f'{k}={v}' for k, v in bad.items())}"
        )


def check_tensor_parallel(config: SupernetConfig, world: int) -> None:
    """Refuse a tensor-parallel size the model cannot be split into, naming the counts it does not divide."""
    _check(
        [
            ("fa.num_heads", config.fa.num_heads),
            ("fa.num_kv_heads", config.fa.num_kv_heads),
            ("swa.num_heads", config.swa.num_heads),
            ("swa.num_kv_heads", config.swa.num_kv_heads),
            ("gdn.num_heads", config.gdn.num_heads),
            ("kda.num_heads", config.kda.num_heads),
            ("intermediate_size", config.intermediate_size),
        ],
        world,
    )


def local_config(config: SupernetConfig, world: int) -> SupernetConfig:
    """The config as one rank sees it (head counts and intermediate size divided by ``world``): what sizes its
    caches and states (``supernet.cache.layer_state_bytes``, vLLM's cache specs). Not a model to build."""
    check_tensor_parallel(config, world)

    def heads(section, **more):
        return dataclasses.replace(section, num_heads=section.num_heads // world, **more)

    return dataclasses.replace(
        config,
        intermediate_size=config.intermediate_size // world,
        fa=heads(config.fa, num_kv_heads=config.fa.num_kv_heads // world),
        swa=heads(config.swa, num_kv_heads=config.swa.num_kv_heads // world),
        gdn=heads(config.gdn),
        kda=heads(config.kda),
    )


def _layer_counts(layer: DecoderLayer) -> list[tuple[str, int]]:
    counts = [("intermediate_size", layer.mlp.gate_proj.out_features)]
    for name, mixer in layer.mixers.items():
        if isinstance(mixer, Attention):
            counts += [(f"{name}.num_heads", mixer.num_heads), (f"{name}.num_kv_heads", mixer.num_kv_heads)]
        elif isinstance(mixer, DeltaMixer):
            counts.append((f"{name}.num_heads", mixer.num_heads))
        else:
            raise ValueError(f"no tensor-parallel rule for mixer {name!r} ({type(mixer).__name__})")
    if layer.attn is not None:  # lora mode: the shared teacher projections carry the KV heads
        head_dim = next(m.head_dim for m in layer.mixers.values() if isinstance(m, Attention | DeltaMixer))
        counts.append(("fa.num_kv_heads", layer.attn.k_proj.out_features // head_dim))
    return counts


@torch.no_grad()
def shard_layer(
    layer: DecoderLayer, rank: int, world: int, reduce: Callable[[Tensor], Tensor] | None = None
) -> None:
    """Cut ``layer`` in place into rank ``rank``'s slice of ``world`` (see the module docstring); ``reduce``
    becomes the layer's all-reduce of row-parallel partial sums (identity when None, e.g. at world 1)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    _check(_layer_counts(layer), world)
    for module_name, module in layer.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full_name = f"{module_name}.{pname}" if module_name else pname
            data = param.data
            local = shard_tensor(full_name, data, rank, world)
            if local is not data:
                setattr(module, pname, nn.Parameter(local, requires_grad=param.requires_grad))
        if isinstance(module, nn.Linear):  # callers split packed outputs by out_features
            module.out_features, module.in_features = module.weight.shape
    for mixer in layer.mixers.values():
        if isinstance(mixer, Attention):
            mixer.num_heads, mixer.num_kv_heads = mixer.num_heads // world, mixer.num_kv_heads // world
        elif isinstance(mixer, DeltaMixer):
            mixer.num_heads //= world
    layer.reduce = reduce or no_reduce


def shard_model(
    model: SupernetForCausalLM, rank: int, world: int, reduce: Callable[[Tensor], Tensor] | None = None
) -> SupernetForCausalLM:
    """Cut every decoder layer of ``model`` in place (embeddings, final norm and LM head stay replicated);
    returns ``model``. ``reduce`` must sum a tensor over the ``world`` ranks (e.g. vLLM's
    ``tensor_model_parallel_all_reduce``), identically on every rank."""
    check_tensor_parallel(model.config, world)
    for i in range(model.config.num_hidden_layers):
        shard_layer(model.layer(i), rank, world, reduce)
    return model
