"""Per-sequence decoding state, one object per layer, shaped by the mixer the sequence uses there.

The math lives in the mixers (and kernels/); this module only stores and bounds what they carry between calls:

* ``KVCache``       FA: every key/value so far; grows with the sequence.
* ``WindowKVCache`` SWA: the first ``sinks`` positions plus a ring of the last ``window``; never larger.
* ``DeltaState``    GDN/KDA: the short-convolution tail and the fp32 recurrent state; fixed size.

Keys are stored after rotary embedding, so a cached key never needs its position again except for masking.

``layer_state_bytes`` / ``state_bytes`` are the one formula for what these hold (serving admission and the
placement cost model call them; a test checks them against the tensors really allocated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from supernet.config import SupernetConfig


def layer_state_bytes(config: SupernetConfig, mixer: str, length: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one layer's state holds after ``length`` tokens in cache dtype ``dtype``.

    FA: keys and values of every token. SWA: the ring of sinks + window slots (allocated whole at the start)
    plus its int64 position per slot. GDN/KDA: the short-convolution tail of q/k/v in ``dtype`` plus the fp32
    recurrent state, each from its own config section (KDA and GDN may differ)."""
    elt = torch.empty((), dtype=dtype).element_size()
    if mixer in ("fa", "swa"):
        a = getattr(config, mixer)
        slots = length if mixer == "fa" else a.sinks + (a.window or 0)
        return 2 * a.num_kv_heads * a.head_dim * slots * elt + (8 * slots if mixer == "swa" else 0)
    if mixer in ("gdn", "kda"):
        d = getattr(config, mixer)
        width = d.num_heads * d.head_dim
        return 3 * width * (d.conv_kernel - 1) * elt + d.num_heads * d.head_dim * d.head_dim * 4
    raise ValueError(f"unknown mixer {mixer!r}")


def state_bytes(
    config: SupernetConfig, placement: Sequence[str], length: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of one sequence's ``SequenceState`` after ``length`` tokens (what ``SequenceState.nbytes()`` says)."""
    return sum(layer_state_bytes(config, name, length, dtype) for name in placement)


@dataclass
class KVCache:
    k: Tensor  # [Hkv, capacity, D]
    v: Tensor
    length: int = 0

    @classmethod
    def empty(
        cls, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int = 64
    ) -> KVCache:
        shape = (num_kv_heads, capacity, head_dim)
        return cls(
            torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)
        )

    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Add [Hkv, T, D] keys/values; return views of everything cached so far (no copy)."""
        end = self.length + k_new.shape[1]
        self.ensure(end)
        self.k[:, self.length : end] = k_new
        self.v[:, self.length : end] = v_new
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def ensure(self, end: int) -> None:
        """Room for positions up to ``end``, doubling when it grows (appends stay amortised O(1))."""
        if end > self.k.shape[1]:
            self.reserve(max(end, 2 * self.k.shape[1]))

    def reserve(self, capacity: int) -> None:
        """Grow storage (doubling keeps appends amortised O(1)); callers that know the final length reserve it."""
        if capacity <= self.k.shape[1]:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], capacity, old.shape[2]))
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def nbytes(self) -> int:
        return 2 * self.length * self.k.shape[0] * self.k.shape[2] * self.k.element_size()

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative rollback): later appends overwrite them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


@dataclass
class WindowKVCache:
    """Sinks in slots [0, sinks), the sliding window as a ring in slots [sinks, sinks + window)."""

    k: Tensor  # [Hkv, sinks + window, D]
    v: Tensor
    pos: Tensor  # [sinks + window] absolute position held by each slot, -1 = empty
    sinks: int
    window: int

    @classmethod
    def empty(
        cls,
        num_kv_heads: int,
        head_dim: int,
        sinks: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> WindowKVCache:
        shape = (num_kv_heads, sinks + window, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.full((sinks + window,), -1, dtype=torch.long, device=device),
            sinks,
            window,
        )

    def gather(self, k_new: Tensor, v_new: Tensor, pos_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cached entries followed by the new ones (what the new queries may attend to, before masking)."""
        return (
            torch.cat((self.k, k_new), dim=1),
            torch.cat((self.v, v_new), dim=1),
            torch.cat((self.pos, pos_new)),
        )

    def store(self, k_new: Tensor, v_new: Tensor, pos_new: Tensor) -> None:
        """Keep what future queries can still see: sink positions, and the newest ``window`` positions."""
        keep = (pos_new < self.sinks) | (pos_new > pos_new.max() - self.window)
        k_new, v_new, pos_new = k_new[:, keep], v_new[:, keep], pos_new[keep]
        slots = torch.where(pos_new < self.sinks, pos_new, self.sinks + (pos_new - self.sinks) % self.window)
        self.k[:, slots] = k_new
        self.v[:, slots] = v_new
        self.pos[slots] = pos_new

    def slot(self, pos: int) -> int:
        """The ring slot absolute position ``pos`` is written to (``slots`` for a run of positions)."""
        return pos if pos < self.sinks else self.sinks + (pos - self.sinks) % self.window

    def store_one(self, k_new: Tensor, v_new: Tensor, pos: int) -> int:
        """Decode fast path of ``store`` for one token ([Hkv, 1, D]) at absolute position ``pos``."""
        slot = self.slot(pos)
        self.k[:, slot] = k_new[:, 0]
        self.v[:, slot] = v_new[:, 0]
        self.pos[slot] = pos
        return pos

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size() + self.pos.numel() * self.pos.element_size()

    def slots(self, start: int, count: int) -> Tensor:
        """Ring slots that positions ``start .. start + count - 1`` are written to."""
        pos = torch.arange(start, start + count, device=self.pos.device)
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)

    def snapshot(self, start: int, count: int) -> RingSnapshot:
        """Copy what the next ``count`` positions (from ``start``) will overwrite, so ``restore`` can undo them.
        Only those slots are copied, not the whole window; ``count`` <= window keeps them distinct."""
        if count > self.window:
            raise ValueError(f"cannot snapshot {count} positions of a {self.window}-token window")
        slots = self.slots(start, count)
        return RingSnapshot(start, slots, self.k[:, slots].clone(), self.v[:, slots].clone(), self.pos[slots].clone())

    def restore(self, snap: RingSnapshot, keep: int) -> None:
        """Undo every position written since ``snap`` except the first ``keep`` (speculative rollback)."""
        slots = snap.slots[keep:]
        self.k[:, slots] = snap.k[:, keep:]
        self.v[:, slots] = snap.v[:, keep:]
        self.pos[slots] = snap.pos[keep:]


@dataclass
class RingSnapshot:
    """The ring slots a speculative window overwrites, as they were before it (see WindowKVCache.snapshot)."""

    start: int
    slots: Tensor
    k: Tensor
    v: Tensor
    pos: Tensor


@dataclass
class DeltaHistory:
    """Every position's state since a checkpoint, kept while a speculative window is open so the state can go
    back to any of them without recomputing anything. The mixer appends to it (``DeltaState.history``)."""

    conv: Tensor  # conv state at the checkpoint [C, W - 1]
    recurrent: Tensor  # recurrent state at the checkpoint (a copy) [H, K, V]
    inputs: Tensor  # raw conv inputs fed since, [n, C]
    states: list[Tensor] = field(default_factory=list)  # recurrent state after each of those n tokens


@dataclass
class DeltaState:
    conv: Tensor  # [C, conv_kernel - 1]: the last inputs of the short causal convolution
    recurrent: Tensor  # [H, K, V] fp32
    # open speculative window: the mixer steps token by token and records every position (see DeltaHistory)
    history: DeltaHistory | None = field(default=None, repr=False, compare=False)

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4

    def open_history(self) -> None:
        self.history = DeltaHistory(self.conv, self.recurrent.clone(), self.conv.new_empty(0, self.conv.shape[0]))

    def record(self, inputs: Tensor, states: list[Tensor]) -> None:
        """Called by the mixer after a recorded forward: raw conv inputs [T, C], the state after each token."""
        h = cast(DeltaHistory, self.history)  # only called while a window is open (open_history)
        h.inputs = torch.cat((h.inputs, inputs))
        h.states.extend(states)

    def rollback(self, keep: int) -> None:
        """Back to the state after the first ``keep`` tokens since ``open_history`` (the window stays open)."""
        h = cast(DeltaHistory, self.history)  # only called while a window is open (open_history)
        if not 0 <= keep <= len(h.states):
            raise ValueError(f"cannot keep {keep} of {len(h.states)} recorded positions")
        # the conv state is the last W - 1 raw inputs: the checkpoint's, shifted by the kept tokens
        tail = torch.cat((h.conv.transpose(0, 1), h.inputs[:keep].to(h.conv.dtype)))[keep:]
        self.conv = tail.transpose(0, 1).contiguous()
        self.recurrent = h.states[keep - 1] if keep else h.recurrent.clone()
        h.inputs, h.states = h.inputs[:keep], h.states[:keep]


LayerState = KVCache | WindowKVCache | DeltaState


def batched_rows(holder: dict, states: Sequence[LayerState], fields: tuple[str, ...]) -> list[Tensor]:
    """Batch tensors ``[N, ...]`` whose row i *is* ``states[i].<field>`` (a view), for decode steps that update
    fixed-size states (ring caches, recurrent states) in place for the whole batch at once.

    While the same states come back in the same order with the very views handed out last time (steady-state
    decoding) the held batch tensors are returned as they are: nothing is copied. Any other batch -- a row
    joined or left, a state cloned, rolled back or prefilled in between (all of which assign new tensors) --
    is stacked once and its rows' fields are replaced by views of the new batch tensors. So a tensor that
    someone else holds is never written through a batch tensor. ``holder`` is the caller's (one per mixer).
    """
    held = holder.get("rows")
    if held is not None and held[0] == fields and len(held[2]) == len(states):
        if all(
            getattr(s, f) is view
            for s, views in zip(states, held[2], strict=True)
            for f, view in zip(fields, views, strict=True)
        ):
            return held[1]
    batch = [torch.stack([getattr(s, f) for s in states]) for f in fields]
    views = list(zip(*(b.unbind(0) for b in batch), strict=True))
    for s, row in zip(states, views, strict=True):
        for f, view in zip(fields, row, strict=True):
            setattr(s, f, view)
    holder["rows"] = (fields, batch, views)
    return batch


@dataclass
class SequenceState:
    """Everything one sequence carries between forward calls: its placement and one state per layer."""

    placement: tuple[str, ...]
    layers: list[LayerState] = field(default_factory=list)
    length: int = 0  # tokens consumed so far (= position of the next token)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of every tensor the layers hold, spare FA capacity included (what memory really holds)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for f in dataclasses.fields(layer)
            if isinstance(t := getattr(layer, f.name), Tensor)
        )

    def clone(self) -> SequenceState:
        """An independent copy (tensors copied): forks n samples off one prefill, or snapshots a state before
        speculative tokens so rejected ones can be rolled back."""
        layers = [
            dataclasses.replace(
                layer,
                **{
                    f.name: getattr(layer, f.name).clone()
                    for f in dataclasses.fields(layer)
                    if isinstance(getattr(layer, f.name), Tensor)
                },
            )
            for layer in self.layers
        ]
        return SequenceState(self.placement, layers, self.length)
