"""Cost of a placement: per-mixer decode/prefill cost, measured here or estimated for a target GPU.

A placement's cost is ``shared + sum over layers of cost[mixer of that layer]``: every layer has the same
shapes, so one layer's mixer costs stand for all layers, and the shared part (MLPs, norms, embedding, LM head)
does not depend on the placement. The optimiser needs exactly this additive form (search.py).

Two sources, both for one decode step of ``batch`` sequences at ``context`` tokens (and a prefill of
``context``):

* ``measured``: timing one layer's mixers on this device with synthetic caches of the right size (a KV cache
  really holding ``context`` keys, a full SWA window, a delta-rule state), medians of interleaved repeats so
  that slow phases of a shared machine hit every mixer alike.
* ``analytic:<gpu>``: a roofline per component, ``max(bytes / bandwidth, flops / peak)``, from the
  configuration: weights read once per step (bf16), each sequence's KV cache or recurrent state read (and for
  delta rules written) once per step, 2 FLOPs per weight per token plus the mixer's own math (attention ~4 C H
  D per token). GPU figures are the vendors' dense bf16 numbers; see ``GPUS``.

KV/state memory per sequence at ``context`` is part of both (bf16 caches for the analytic model, fp32 delta
state).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from supernet.cache import layer_state_bytes
from supernet.config import MIXER_NAMES, SupernetConfig


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s (HBM)
    flops: float  # dense bf16 FLOP/s


GPUS = {
    "h100-sxm": GPU("NVIDIA H100 SXM", 3.35e12, 989e12),
    "h100-pcie": GPU("NVIDIA H100 PCIe", 2.0e12, 756e12),
    "h200": GPU("NVIDIA H200", 4.8e12, 989e12),
    "a100-sxm": GPU("NVIDIA A100 SXM 80GB", 2.039e12, 312e12),
    "l40s": GPU("NVIDIA L40S", 0.864e12, 362e12),
}


@dataclass
class CostModel:
    """Per-layer mixer costs (seconds per decode step of the whole batch) plus the shared part."""

    model: str  # "measured" or "analytic:<gpu>"
    device: str
    context: int
    batch: int
    mixer: dict[str, float]  # seconds per layer
    shared: float  # seconds per step, everything outside the mixers
    num_layers: int
    kv_bytes: dict[str, int]  # per layer, per sequence, at `context`
    prefill: dict[str, float] = field(default_factory=dict)  # seconds per layer for one `prefill_context` prefill
    prefill_shared: float = 0.0
    prefill_context: int = 0

    def cost(self, placement: Sequence[str]) -> float:
        self._check(placement)
        return self.shared + sum(self.mixer[m] for m in placement)

    def speedup(self, placement: Sequence[str]) -> float:
        return self.cost(("fa",) * self.num_layers) / self.cost(placement)

    def prefill_speedup(self, placement: Sequence[str]) -> float | None:
        if not self.prefill:
            return None
        self._check(placement)
        total = lambda p: self.prefill_shared + sum(self.prefill[m] for m in p)  # noqa: E731
        return total(("fa",) * self.num_layers) / total(placement)

    def kv_bytes_per_seq(self, placement: Sequence[str]) -> int:
        self._check(placement)
        return int(sum(self.kv_bytes[m] for m in placement))

    def relative(self) -> dict[str, float]:
        """Mixer costs in FA-layer units (the units Super Apriel quotes its costs in: FA 1.00, SWA 0.48, ...)."""
        return {m: self.mixer[m] / self.mixer["fa"] for m in self.mixer}

    def _check(self, placement: Sequence[str]) -> None:
        if len(placement) != self.num_layers:
            raise ValueError(f"placement has {len(placement)} layers, cost model {self.num_layers}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls(**data)

    def describe(self) -> str:
        return f"{self.model} on {self.device}, decode step at context {self.context}, batch {self.batch}"


# ----------------------------------------------------------------------------------------------- analytic


def _param_counts(config: SupernetConfig) -> tuple[dict[str, int], int, int]:
    """(weights each mixer reads per layer, shared weights per layer, head/embedding weights), counted on the
    real module tree built on the meta device (no memory, always in step with the model code)."""
    from supernet.model import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(config)
    base = sum(p.numel() for p in layer.attn.parameters()) if layer.attn is not None else 0
    per_mixer = {name: base + sum(p.numel() for p in layer.mixers[name].parameters()) for name in MIXER_NAMES}
    shared = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith(("attn.", "mixers.")))
    head = config.vocab_size * config.hidden_size
    return per_mixer, shared, head


def swa_keys(config: SupernetConfig) -> int:
    """Keys an SWA layer keeps at most: its window plus the attention sinks."""
    if config.swa.window is None:
        raise ValueError("this config's SWA mixer has no window")
    return config.swa.window + config.swa.sinks


_CACHE_DTYPES = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def state_bytes(config: SupernetConfig, context: int, cache_dtype_bytes: int) -> dict[str, int]:
    """Per layer, per sequence: what each mixer keeps at ``context`` tokens (``supernet.cache``'s formula)."""
    if cache_dtype_bytes not in _CACHE_DTYPES:
        raise ValueError(f"cache element size {cache_dtype_bytes} bytes: expected one of {sorted(_CACHE_DTYPES)}")
    dtype = _CACHE_DTYPES[cache_dtype_bytes]
    return {name: layer_state_bytes(config, name, context, dtype) for name in MIXER_NAMES}


def analytic_cost_model(
    config: SupernetConfig,
    context: int,
    batch: int,
    gpu: str = "h100-sxm",
    weight_bytes: int = 2,
    cache_bytes: int = 2,
    prefill_context: int | None = None,
) -> CostModel:
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    g = GPUS[gpu]
    params, shared_params, head = _param_counts(config)
    states = state_bytes(config, context, cache_bytes)
    fa, dn = config.fa, config.gdn
    roof = lambda nbytes, flops: max(nbytes / g.bandwidth, flops / g.flops)  # noqa: E731
    delta_flops = 6 * dn.num_heads * dn.head_dim * dn.head_dim  # decay, k^T S, rank-1 update, q^T S per token

    def decode(name: str) -> float:
        w = params[name]
        if name in ("fa", "swa"):
            seen = context if name == "fa" else min(context, swa_keys(config))
            return roof(
                w * weight_bytes + batch * states[name],
                batch * (2 * w + 4 * seen * fa.num_heads * fa.head_dim),
            )
        # recurrent state is read and written back each step
        return roof(w * weight_bytes + 2 * batch * states[name], batch * (2 * w + delta_flops))

    def prefill(name: str, n: int) -> float:
        w = params[name]
        if name in ("fa", "swa"):
            span = n / 2 if name == "fa" else min(n / 2, swa_keys(config))
            flops = 2 * w * n + 4 * n * span * fa.num_heads * fa.head_dim
            return roof(w * weight_bytes + 2 * n * fa.num_kv_heads * fa.head_dim * cache_bytes, flops)
        chunk = 64
        flops = 2 * w * n + n * (delta_flops + 4 * chunk * dn.num_heads * dn.head_dim)
        return roof(w * weight_bytes + states[name], flops)

    shared = config.num_hidden_layers * roof(shared_params * weight_bytes, 2 * shared_params * batch) + roof(
        head * weight_bytes, 2 * head * batch
    )
    n = prefill_context or context
    return CostModel(
        model=f"analytic:{gpu}",
        device=f"{g.name} ({g.bandwidth / 1e12:.2f} TB/s, {g.flops / 1e12:.0f} TFLOP/s bf16)",
        context=context,
        batch=batch,
        mixer={m: decode(m) for m in MIXER_NAMES},
        shared=shared,
        num_layers=config.num_hidden_layers,
        kv_bytes=states,
        prefill={m: prefill(m, n) for m in MIXER_NAMES},
        prefill_shared=config.num_hidden_layers * roof(shared_params * weight_bytes, 2 * shared_params * n)
        + roof(head * weight_bytes, 2 * head),
        prefill_context=n,
    )


# ----------------------------------------------------------------------------------------------- measured


def _synthetic_state(mixer, name: str, context: int, dtype: torch.dtype):
    """A state as it would be after ``context`` tokens, filled with random values (timing depends on sizes
    only)."""
    state = mixer.new_state(dtype, torch.device("cpu"))
    if name == "fa":
        state.reserve(context + 1)
        state.k[:, :context].normal_()
        state.v[:, :context].normal_()
        state.length = context
    elif name == "swa":
        state.k.normal_()
        state.v.normal_()
        n = state.pos.numel()
        state.pos[:] = torch.arange(n) if context >= n else torch.where(torch.arange(n) < context, torch.arange(n), -1)
    else:
        state.recurrent.normal_(std=0.01)
        state.conv.normal_()
    return state


@torch.inference_mode()
def measure_cost_model(
    model,
    context: int,
    batch: int,
    repeats: int = 7,
    prefill_context: int | None = 1024,
    device_name: str | None = None,
) -> CostModel:
    """Time one layer's four mixers (decode step at ``context``, batch ``batch``; prefill of
    ``prefill_context``) and the shared part, interleaving the candidates in every repeat; medians."""
    from supernet.mixers import MixerContext

    config = model.config
    layer = model.layers[0]
    dtype = model.embed_tokens.weight.dtype
    h = config.hidden_size
    x = torch.randn(batch, 1, h, dtype=dtype)
    positions = torch.full((batch, 1), context, dtype=torch.long)
    cos, sin = model.rotary(positions)
    ctx = MixerContext(positions, cos, sin)
    kv = {
        name: sum(_synthetic_state(layer.mixers[name], name, context, dtype).nbytes() for _ in range(1))
        for name in MIXER_NAMES
    }

    def decode_once(name: str) -> float:
        states = [_synthetic_state(layer.mixers[name], name, context, dtype) for _ in range(batch)]
        t0 = time.perf_counter()
        layer.mixers[name](x, layer.attn, ctx, states)
        return time.perf_counter() - t0

    def shared_once() -> float:
        t0 = time.perf_counter()
        y = layer.post_attention_layernorm(x)
        layer.mlp(y)
        layer.input_layernorm(x)
        return time.perf_counter() - t0

    def head_once() -> float:
        t0 = time.perf_counter()
        y = model.norm(x)
        if model.lm_head is not None:
            model.lm_head(y)
        else:
            y @ model.embed_tokens.weight.T
        return time.perf_counter() - t0

    jobs: dict[str, Callable[[], float]] = {
        **{m: functools.partial(decode_once, m) for m in MIXER_NAMES},
        "_shared": shared_once,
        "_head": head_once,
    }
    if prefill_context:
        xp = torch.randn(1, prefill_context, h, dtype=dtype)
        pos = torch.arange(prefill_context)[None]
        pcos, psin = model.rotary(pos)
        pctx = MixerContext(pos, pcos, psin)

        def prefill_once(name: str) -> float:
            t0 = time.perf_counter()
            layer.mixers[name](xp, layer.attn, pctx, None)
            return time.perf_counter() - t0

        def prefill_shared_once() -> float:
            t0 = time.perf_counter()
            layer.mlp(layer.post_attention_layernorm(xp))
            return time.perf_counter() - t0

        jobs.update({f"prefill_{m}": functools.partial(prefill_once, m) for m in MIXER_NAMES})
        jobs["prefill_shared"] = prefill_shared_once
    for job in jobs.values():  # warm-up
        job()
    samples: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, job in jobs.items():
            samples[k].append(job())
    med = {k: statistics.median(v) for k, v in samples.items()}
    return CostModel(
        model="measured",
        device=device_name or f"CPU ({torch.get_num_threads()} threads, {dtype})".replace("torch.", ""),
        context=context,
        batch=batch,
        mixer={m: med[m] for m in MIXER_NAMES},
        shared=config.num_hidden_layers * med["_shared"] + med["_head"],
        num_layers=config.num_hidden_layers,
        kv_bytes=kv,
        prefill={m: med[f"prefill_{m}"] for m in MIXER_NAMES} if prefill_context else {},
        prefill_shared=config.num_hidden_layers * med["prefill_shared"] if prefill_context else 0.0,
        prefill_context=prefill_context or 0,
    )


def parse_cost_model_name(name: str) -> tuple[str, str | None]:
    """``measured`` or ``analytic:<gpu>`` (``analytic`` alone = H100 SXM)."""
    if name == "measured":
        return "measured", None
    kind, _, gpu = name.partition(":")
    if kind != "analytic":
        raise ValueError(f"cost model {name!r}: expected 'measured' or 'analytic:<gpu>' (gpus: {', '.join(GPUS)})")
    gpu = gpu or "h100-sxm"
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r} in cost model {name!r}; known: {', '.join(GPUS)}")
    return "analytic", gpu
