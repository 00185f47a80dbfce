"""Process-group helpers for data-parallel training under ``torchrun`` (one process = world 1, no group), and
the FSDP2 wrapping of the stochastic stage (``run.parallel: fsdp2``)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

# The warm start trains whole layers between collectives; on a busy CPU one chunk can take many minutes, so
# the default 30-minute collective timeout would kill healthy runs.
TIMEOUT = timedelta(hours=6)

if TYPE_CHECKING:
    from supernet.model import SupernetForCausalLM


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: Tensor) -> Tensor:
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK. Always gloo: the trainer keeps its tensors on the CPU (docs/training.md),
    which nccl cannot reduce, even on a machine that has GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size())


# ------------------------------------------------------------------------------------------ FSDP2


class _Sink:
    """Stands in for the list a decoder layer appends its (mixer input, mixer output) pair to (the model's
    ``return_mixer_io``). Before a sharded module runs with grad enabled, FSDP2 rebuilds every list among its
    arguments that holds tensors needing grad (to route them through its post-backward hook): the layer would
    append to a copy and the caller would never see it. An object that is not a list passes through as is."""

    def __init__(self, target: list) -> None:
        self.target = target

    def append(self, item: Any) -> None:
        self.target.append(item)


def _prepare_layer_inputs(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook on each sharded layer, run before FSDP2's own.

    1. The hidden state gets ``requires_grad`` when it lacks it (a frozen embedding's output, or a rank whose
       rows all took frozen FA in the layers before). FSDP2 reduce-scatters a layer's gradients when the
       gradient of the layer's input is done, and, for an input without grad, only at the end of backward. A
       rank that defers one layer that way reduces the layers in a different order from a rank that does not:
       layers of equal shapes then sum each other's gradients, silently. A leaf input that asks for a gradient
       keeps every rank on the same order (last layer first).
    2. ``mixer_io`` is handed over as a _Sink."""
    if torch.is_grad_enabled() and args and torch.is_tensor(args[0]) and not args[0].requires_grad:
        args = (args[0].detach().requires_grad_(), *args[1:])
    names = list(inspect.signature(module.forward).parameters)
    if "mixer_io" in kwargs and isinstance(kwargs["mixer_io"], list):
        kwargs = {**kwargs, "mixer_io": _Sink(kwargs["mixer_io"])}
    elif "mixer_io" in names and len(args) > names.index("mixer_io"):
        i = names.index("mixer_io")
        if isinstance(args[i], list):
            args = (*args[:i], _Sink(args[i]), *args[i + 1 :])
    return args, kwargs


class Fsdp2:
    """The stochastic stage sharded with FSDP2 (``fully_shard``): every decoder layer is one all-gather /
    reduce-scatter unit and the root holds the embeddings, final norm and head.

    Why ``set_reduce_scatter_unused_params``: each batch row runs its own sampled mixer at every layer, so in
    one step a mixer can be used on one rank and not on another. FSDP2 reduce-scatters, per layer, the
    gradients that exist; with a mixer missing on one rank the ranks' flat buffers hold different parameters
    of the same sizes and get summed together, silently (no error, wrong gradients). With the flag every
    trainable parameter of a layer enters the reduce-scatter on every rank (a zero gradient where unused):
    FSDP2's counterpart of DDP's ``find_unused_parameters``. The same sampling can also leave a layer's input
    without grad on one rank only (all its rows on frozen FA before it), which reorders the reduce-scatters
    across ranks: _prepare_layer_inputs closes that hole. Both were seen as silently wrong gradients (with no
    error) in 2-process runs before the fixes; tests/training/test_fsdp.py compares against one process.

    Checkpoints stay the unsharded format of single-process and DDP runs (any one resumes under the others):
    full tensors are gathered with torch.distributed.checkpoint's state-dict helpers, onto rank 0's CPU only
    (``cpu_offload``), which writes them."""

    def __init__(self, model: SupernetForCausalLM, names: list[str]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.model, self.names = model, names
        # The mesh lives where the weights are (the trainer keeps the model on CPU with gloo).
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
            # prepend: runs before the pre-forward hook fully_shard just registered
            layer.register_forward_pre_hook(_prepare_layer_inputs, prepend=True, with_kwargs=True)
        self.sharded = fully_shard(model, mesh=mesh)  # the same object as `model`, typed as an FSDPModule
        self.sharded.set_reduce_scatter_unused_params(True)

    def params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters after sharding (``fully_shard`` replaces them with DTensor parameters)."""
        keep = set(self.names)
        return {n: p for n, p in self.model.named_parameters() if n in keep}

    def _options(self, cpu_offload: bool = False, ignore_frozen_params: bool = False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(
            full_state_dict=True, cpu_offload=cpu_offload, ignore_frozen_params=ignore_frozen_params
        )

    def full_state(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
        """(trainable weights, optimiser state dict in ``optimizer.state_dict()``'s index-keyed layout) as full
        CPU tensors on rank 0; empty on the other ranks. Every rank must call it (it gathers)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        params = get_model_state_dict(
            self.model, options=self._options(cpu_offload=True, ignore_frozen_params=True)
        )
        optim = cast(
            dict[str, Any], get_optimizer_state_dict(self.model, optimizer, options=self._options(cpu_offload=True))
        )
        if not params:
            return {}, None
        index = {n: i for i, n in enumerate(self.names)}
        return cast(dict[str, Tensor], params), {
            "state": {index[n]: s for n, s in optim["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]
            ],
        }

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full, index-keyed optimiser state (as a checkpoint holds it, read by every rank): each rank
        keeps its own shards."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        named = {
            "state": {self.names[i]: s for i, s in state["state"].items()},
            "param_groups": [
                {**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.model, optimizer, cast(Any, named), options=self._options())

    def gather(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The whole model unsharded into ``build()``'s fresh copy on rank 0 (None elsewhere): what evaluation
        and the final ``save_supernet`` run on. Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.model, options=self._options(cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        plain = build()
        plain.load_state_dict(full)
        return plain.train(self.model.training)
