"""GDN and KDA delta rules: chunked (prefill/training), recurrent (decode), naive (reference)."""

from kernels.delta_rule.chunk import chunk_gated_delta_rule, chunk_kda
from kernels.delta_rule.naive import naive_delta_rule
from kernels.delta_rule.recurrent import recurrent_gated_delta_rule, recurrent_kda

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_kda",
    "naive_delta_rule",
    "recurrent_gated_delta_rule",
    "recurrent_kda",
]
