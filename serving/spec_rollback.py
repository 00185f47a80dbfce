"""Undo the last tokens fed to a sequence's state: what speculative decoding does with rejected drafts.

A ``Checkpoint`` opens a window on a ``SequenceState``; every token fed while it is open can be taken back with
``rollback(keep)``, per layer and without recomputing anything before the window:

* FA (``KVCache``): the cache is truncated (later appends overwrite the rest);
* SWA (``WindowKVCache``): the ring slots the window can overwrite are copied when it opens (at most
  ``span`` of them, never the whole window) and written back;
* GDN/KDA (``DeltaState``): while the window is open the mixer steps token by token and records the recurrent
  state after every position (``DeltaState.history``), so rolling back picks one; the conv state is rebuilt
  from the raw inputs it recorded.

The same mechanism serves both rejected drafts (the verify pass fed ``k + 1`` tokens, ``j + 1`` are kept) and
padding (rows of a batched forward are padded to one length; each row rolls back to its real tokens).
"""

from __future__ import annotations

import torch

from supernet.cache import DeltaState, KVCache, RingSnapshot, SequenceState, WindowKVCache


class Checkpoint:
    # Caches are written in inference mode (the runner's forwards); restoring them in place must be too.
    @torch.inference_mode()
    def __init__(self, state: SequenceState, span: int) -> None:
        """``span``: the most tokens fed before the window closes (bounds the SWA copy; <= the SWA window)."""
        self.state, self.start, self.span = state, state.length, span
        self.rings: dict[int, RingSnapshot] = {}
        for i, layer in enumerate(state.layers):
            if isinstance(layer, WindowKVCache):
                self.rings[i] = layer.snapshot(self.start, span)
            elif isinstance(layer, DeltaState):
                layer.open_history()

    @property
    def fed(self) -> int:
        return self.state.length - self.start

    @torch.inference_mode()
    def rollback(self, keep: int) -> None:
        """Keep the first ``keep`` tokens fed since the checkpoint, forget the others; the window stays open."""
        if not 0 <= keep <= self.fed:
            raise ValueError(f"cannot keep {keep} of the {self.fed} tokens fed since the checkpoint")
        if self.fed > self.span:
            raise ValueError(f"{self.fed} tokens fed into a checkpoint that spans {self.span}")
        if keep == self.fed:
            return
        for i, layer in enumerate(self.state.layers):
            if isinstance(layer, KVCache):
                layer.truncate(self.start + keep)
            elif isinstance(layer, WindowKVCache):
                layer.restore(self.rings[i], keep)
            else:
                layer.rollback(keep)
        self.state.length = self.start + keep

    def close(self) -> None:
        """Commit what was kept: recording stops and the copies are dropped."""
        for layer in self.state.layers:
            if isinstance(layer, DeltaState):
                layer.history = None
        self.rings.clear()
