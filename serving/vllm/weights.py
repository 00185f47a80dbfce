"""Loading a supernet checkpoint into the vLLM model: full, delta (trunk from the teacher) or thin exports.

The checkpoint is read with supernet.checkpoint.read_tensors (CRC-verified, the same reader the embedded engine
uses), not vLLM's generic iterator, because a delta checkpoint names its teacher in ``config.base_model`` and the
trunk must come from there first (in ``full`` mode the teacher's projections seed every mixer, which the
checkpoint then overwrites). The model is loaded whole, on the CPU, before tensor parallelism cuts it
(serving.vllm.model), so the checkpoint's full shapes are checked as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from supernet.checkpoint import CheckpointError, read_tensors
from supernet.export import mixer_of
from supernet.model import SupernetForCausalLM


@torch.no_grad()
def load_supernet_weights(
    net: SupernetForCausalLM, model_dir: str | Path, layer_mixers: Sequence[Sequence[str]]
) -> None:
    """Fill ``net`` (whose unused mixers were already removed) from ``model_dir``; every missing, unexpected or
    mis-shaped tensor is reported by name."""
    tensors, _ = read_tensors(model_dir)
    own = net.state_dict()
    trunk = [k for k in own if mixer_of(k) is None]
    if any(k not in tensors for k in trunk):
        base = net.config.base_model
        if not base:
            missing = [k for k in trunk if k not in tensors]
            raise CheckpointError(f"{model_dir}: missing trunk tensor(s) {missing[:5]} and no config.base_model")
        from supernet.convert import load_trunk_from_teacher
        from supernet.teacher import load_teacher

        teacher, _ = load_teacher(base)
        load_trunk_from_teacher(net, teacher)
        del teacher
    for key, tensor in tensors.items():
        where = mixer_of(key)
        if key not in own:
            if where is not None and where[1] not in layer_mixers[where[0]]:
                continue  # a mixer no served preset uses at that layer
            raise CheckpointError(f"{model_dir}: unexpected tensor {key!r} for this config")
        if tensor.shape != own[key].shape:
            raise CheckpointError(
                f"{model_dir}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}"
            )
        own[key].copy_(tensor)
    missing = [k for k in own if mixer_of(k) is not None and k not in tensors]
    if missing:
        raise CheckpointError(
            f"{model_dir}: the served presets need tensor(s) the checkpoint lacks, e.g. {missing[:3]} "
            "(a thin export holds only its own presets' mixers)"
        )
