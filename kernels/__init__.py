"""Pure-PyTorch kernels for the hybrid supernet's linear mixers (GDN, KDA) and their helpers.

Layout follows flash-linear-attention's ops: each op has a naive reference beside its fast form. Every op
runs on CPU; the delta-rule ops route to fla's Triton kernels when given CUDA tensors and ``fla`` imports
(see :mod:`kernels.fla`, untested here).
"""

from kernels.conv import causal_conv1d, causal_conv1d_update
from kernels.delta_rule import (
    chunk_gated_delta_rule,
    chunk_kda,
    naive_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_kda,
)
from kernels.norm import gated_rms_norm, l2_norm, rms_norm

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "chunk_kda",
    "gated_rms_norm",
    "l2_norm",
    "naive_delta_rule",
    "recurrent_gated_delta_rule",
    "recurrent_kda",
    "rms_norm",
]
