"""Automatic prefix caching, per preset: requests that share a prompt prefix skip prefilling it again.

What users of vLLM's ``--enable-prefix-caching`` expect, on per-sequence states instead of shared KV blocks.

* **Keys**: a hash chain over block-aligned prompt prefixes, as in vLLM: ``h_0`` hashes the preset name and its
  placement, ``h_d = H(h_{d-1}, tokens of block d)`` (blake2b, 128 bits). A key therefore names the preset and the
  exact tokens before it, and two presets never share an entry, even on an identical placement.
* **Values**: an ``Entry`` is what one request's prefill left behind: its FA keys/values up to the last
  block-aligned length before the prompt's end (``final``), and for the fixed-size layers (SWA rings, GDN/KDA
  recurrent and convolution states) *snapshots* taken at chosen block-aligned lengths. FA keys at a position
  depend only on the tokens before it, so an FA-only preset's entry serves every block-aligned prefix up to
  ``final`` (truncated). A fixed-size state cannot be truncated, so a preset with any SWA/GDN/KDA layer is served
  only at its snapshot points: every multiple of ``interval`` tokens (absolute, so prompts that share a prefix
  share the points), ``final``, and the end of the longest block-aligned prefix the prompt shares with a cached
  one (its branch point: the second request behind a shared system prompt snapshots the prompt's exact end, so
  the third and later ones reuse all of it, not just up to a multiple of ``interval``). The prefill pauses at
  those points (engine chunks end there) to copy the fixed-size layers, which costs a few extra, shorter
  forwards; FA-only presets record at the prompt's end and their chunking is unchanged.
* **Lookup**, at admission: the longest prefix of the prompt that has a cached state on the request's preset,
  at most ``len(prompt) - 1`` tokens so that one token is left to produce the first logits. Its state is
  *copied* into the new sequence's caches (FA keys truncated to that length, fixed-size layers cloned) and only
  the rest of the prompt is prefilled. Copying is simple and safe (nothing is shared, so nothing needs
  reference counts or copy-on-write); sharing FA blocks copy-on-write, as vLLM does, is a possible later
  optimisation that would save the copy and the duplicated keys of entries with a common prefix.
* **Memory**: entries are charged to the same block pool as running sequences (serving.memory: one FA block per
  ``block_size`` cached positions per FA layer, the fixed blocks of the placement per snapshot), and their
  blocks count as *free* for sequences: whenever a sequence needs blocks the pool evicts entries, least recently
  used first, before the scheduler preempts anyone. So the cache only ever fills memory nobody else wants and
  the server never exceeds its budget. A snapshot that does not fit is skipped.
* **Not cached**: requests with ``prompt_logprobs`` (they need the logits of every prompt position), requests
  that speculate (their draft keeps caches of its own, which are not snapshotted), and the recomputation of a
  preempted request (it prefills its prompt and output again from scratch; the prompt's entry, if any, is used
  only when a request preempted during its prompt is readmitted).
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from serving.memory import BlockPool, CacheLayout
from supernet.cache import KVCache, LayerState, SequenceState

# Tokens between snapshots of fixed-size states (a block multiple). Each snapshot point ends a prefill forward: at
# 64 a 1k-token prompt on the demo's linear-4.7x took about a quarter more prefill compute than uncached, at 128 a
# few percent (process CPU time); a hit then falls at most 127 tokens short of the shared prefix.
DEFAULT_INTERVAL = 128


def root_hash(preset: str, placement: Sequence[str]) -> bytes:
    """``h_0``: the preset and its placement, so that no two presets ever share a key."""
    return hashlib.blake2b(f"{preset}\0{','.join(placement)}".encode(), digest_size=16).digest()


def block_hashes(root: bytes, tokens: Sequence[int], block_size: int, blocks: int) -> list[bytes]:
    """``[h_1 .. h_blocks]`` with ``h_d = H(h_{d-1}, tokens[(d-1)B : dB])``: each names its whole prefix."""
    out, parent = [], root
    for d in range(blocks):
        block = array("q", tokens[d * block_size : (d + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        out.append(parent)
    return out


@dataclass
class Entry:
    """What one prefill left in the cache (see the module docstring)."""

    id: int
    kv: list[tuple[Tensor, Tensor] | None]  # per layer: FA keys/values [Hkv, final, D]; None for the others
    final: int  # FA positions held (a block multiple)
    snapshots: dict[int, list[LayerState]]  # length -> the fixed-size layers' states there; {} for FA-only
    keys: list[bytes]  # the hashes it is indexed under (the lengths it can serve)
    prompt: list[bytes]  # every block hash of its prompt up to ``final`` (branch points of later prompts)
    blocks: int


@dataclass
class Recording:
    """A prefilling request's plan: where its chunks stop for a snapshot, and the snapshots taken so far (their
    blocks already charged to the pool)."""

    hashes: list[bytes]  # h_1 .. h_{final / block_size} of its prompt
    final: int
    stops: list[int]  # lengths where the prefill pauses to snapshot fixed-size layers (ascending)
    snapshots: dict[int, list[LayerState]] = field(default_factory=dict)
    blocks: int = 0


class PrefixCache:
    def __init__(self, pool: BlockPool, layout: CacheLayout, interval: int = DEFAULT_INTERVAL) -> None:
        bs = layout.block_size
        if interval < bs or interval % bs:
            raise ValueError(f"prefix cache interval must be a multiple of the block size ({bs}), got {interval}")
        self.pool, self.layout, self.interval = pool, layout, interval
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.index: dict[bytes, dict[int, Entry]] = {}  # prefix hash -> entries that can serve it
        self.seen: dict[bytes, int] = {}  # prefix hash -> entries whose prompt has it (servable or not)
        self._ids = itertools.count()
        self.stored = self.evicted = 0  # entries since start
        pool.reclaim = self.evict

    @property
    def blocks(self) -> int:
        return sum(e.blocks for e in self.entries.values())

    # ---- admission --------------------------------------------------------------------------------------

    def start(
        self, preset: str, placement: Sequence[str], prompt: Sequence[int], state: SequenceState
    ) -> tuple[int, Recording | None]:
        """Fill ``state`` (fresh, with room for the prompt) with the longest cached prefix of ``prompt`` on this
        preset; return its length and the plan for recording the rest (None when there is nothing new)."""
        bs = self.layout.block_size
        last = (len(prompt) - 1) // bs
        hashes = block_hashes(root_hash(preset, placement), prompt, bs, last)
        hit = 0
        for d in range(last, 0, -1):
            found = self.index.get(hashes[d - 1])
            if found:
                entry = next(reversed(found.values()))
                hit = d * bs
                self._restore(entry, hit, state)
                self.entries.move_to_end(entry.id)
                break
        final = last * bs
        if final <= hit:
            return hit, None
        stops = []
        if any(m != "fa" for m in placement):
            branch = next((d * bs for d in range(last, hit // bs, -1) if hashes[d - 1] in self.seen), hit)
            points = range((hit // self.interval + 1) * self.interval, final, self.interval)
            stops = sorted({*points, final} | ({branch} if branch > hit else set()))
        return hit, Recording(hashes, final, stops)

    def _restore(self, entry: Entry, length: int, state: SequenceState) -> None:
        fixed = iter(SequenceState(state.placement, entry.snapshots.get(length, []), length).clone().layers)
        with torch.no_grad():
            for i, kv in enumerate(entry.kv):
                if kv is None:
                    state.layers[i] = next(fixed)
                    continue
                layer = state.layers[i]
                assert isinstance(layer, KVCache)
                layer.reserve(length)
                layer.k[:, :length] = kv[0][:, :length]
                layer.v[:, :length] = kv[1][:, :length]
                layer.length = length
        state.length = length

    # ---- recording during the prefill -------------------------------------------------------------------

    @staticmethod
    def chunk_end(rec: Recording, start: int, end: int) -> int:
        """Where a prompt chunk ``[start, end)`` must end instead so that the prefill stops at the next point."""
        return min([end] + [p for p in rec.stops if p > start])

    def after_chunk(self, rec: Recording, state: SequenceState, done: bool) -> bool:
        """After a prompt chunk: snapshot the fixed-size layers at a stop; at the prompt's end, store the entry.
        True when the recording is over (stored or dropped)."""
        if state.length in rec.stops and state.length not in rec.snapshots:
            cost = self.layout.shape(state.placement)[1]
            if self.pool.try_cache(cost):
                fixed = [layer for layer, m in zip(state.layers, state.placement, strict=True) if m != "fa"]
                rec.snapshots[state.length] = SequenceState(state.placement, fixed, state.length).clone().layers
                rec.blocks += cost
        if not done:
            return False
        self._store(rec, state)
        return True

    def _store(self, rec: Recording, state: SequenceState) -> None:
        n_fa = state.placement.count("fa")
        fa_blocks = n_fa * rec.final // self.layout.block_size
        fixed_only = n_fa < len(state.placement)
        if (fixed_only and not rec.snapshots) or not self.pool.try_cache(fa_blocks):
            self.discard(rec)
            return
        kv: list[tuple[Tensor, Tensor] | None] = [
            (layer.k[:, : rec.final].clone(), layer.v[:, : rec.final].clone()) if isinstance(layer, KVCache) else None
            for layer in state.layers
        ]
        bs = self.layout.block_size
        depths = [p // bs for p in rec.snapshots] if fixed_only else range(1, rec.final // bs + 1)
        keys = [rec.hashes[d - 1] for d in depths]
        entry = Entry(next(self._ids), kv, rec.final, rec.snapshots, keys, rec.hashes, rec.blocks + fa_blocks)
        rec.snapshots, rec.blocks = {}, 0
        self.entries[entry.id] = entry
        self.stored += 1
        for key in keys:
            self.index.setdefault(key, {})[entry.id] = entry
        for key in entry.prompt:
            self.seen[key] = self.seen.get(key, 0) + 1

    def discard(self, rec: Recording) -> None:
        """A recording that will not be stored (its request was preempted, aborted or failed mid-prompt)."""
        self.pool.uncache(rec.blocks)
        rec.snapshots, rec.blocks = {}, 0

    # ---- eviction ---------------------------------------------------------------------------------------

    def evict(self, blocks: int) -> None:
        """Drop least recently used entries until ``blocks`` blocks are free again (or the cache is empty)."""
        freed = 0
        while self.entries and freed < blocks:
            _, entry = self.entries.popitem(last=False)
            for key in entry.keys:
                found = self.index[key]
                del found[entry.id]
                if not found:
                    del self.index[key]
            for key in entry.prompt:
                self.seen[key] -= 1
                if not self.seen[key]:
                    del self.seen[key]
            self.pool.uncache(entry.blocks)
            freed += entry.blocks
            self.evicted += 1
