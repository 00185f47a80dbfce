"""Prefill(n) then decode one token at a time gives the logits of prefill(n+m), for every mixer and hybrids."""

from __future__ import annotations

import pytest
import torch

from tests.core.helpers import perturbed

PLACEMENTS = ["all-fa", "all-swa", "all-gdn", "all-kda", "fa,swa,gdn,kda", "gdn,kda,swa,fa", "fa-every-2:gdn"]


@pytest.fixture(scope="module")
def model(tiny_supernet):
    return perturbed(tiny_supernet)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_prefill_then_decode_equals_full_prefill(model, placement: str) -> None:
    n, m = 21, 12  # window 8 + 2 sinks: decode runs well past the SWA window
    ids = torch.randint(0, model.config.vocab_size, (2, n + m), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, placement).logits
        states = [model.new_state(placement) for _ in range(2)]
        steps = [model(ids[:, :n], states=states).logits]
        steps += [model(ids[:, i : i + 1], states=states).logits for i in range(n, n + m)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    assert all(s.length == n + m for s in states)


@pytest.mark.parametrize("placement", ["all-gdn", "all-kda", "all-swa", "fa,swa,gdn,kda"])
def test_chunked_prefill_equals_one_prefill(model, placement: str) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, placement).logits
        state = model.new_state(placement)
        pieces = [model(ids[:, a:b], states=[state]).logits for a, b in ((0, 5), (5, 37), (37, 38), (38, 70))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_mixed_presets_in_one_batch_equal_each_alone(model) -> None:
    """Rows grouped by mixer run the same ops on fewer rows; only matmul blocking may reorder the fp32 sums
    (measured <= 8.3e-7 on logits of magnitude ~2.4, so 1e-5 leaves > 10x; a row routed to the wrong mixer
    moves logits by 1e-1 or more). Decoding after a prefill adds the cache path: 1e-4, as in the tests above."""
    placements = ["all-fa", "all-gdn", "swa,kda,gdn,fa"]
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = model(ids, placements).logits
        for row, placement in enumerate(placements):
            torch.testing.assert_close(
                mixed[row], model(ids[row : row + 1], placement).logits[0], atol=1e-5, rtol=0
            )
        # and with caches: prefill separately, then decode all three rows in one batched step
        states = [model.new_state(p) for p in placements]
        for row, state in enumerate(states):
            model(ids[row : row + 1, :10], states=[state])
        step = model(ids[:, 10:11], states=states).logits
        for row, placement in enumerate(placements):
            torch.testing.assert_close(
                step[row, 0], model(ids[row : row + 1, :11], placement).logits[0, -1], atol=1e-4, rtol=0
            )


def test_state_sizes_follow_the_placement(model) -> None:
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    sizes = {}
    for placement in ("all-fa", "all-swa", "all-gdn"):
        state = model.new_state(placement)
        with torch.no_grad():
            model(ids[:, :20], states=[state])
            first = state.nbytes()
            model(ids[:, 20:], states=[state])
        sizes[placement] = (first, state.nbytes())
    assert sizes["all-fa"][1] == 2 * sizes["all-fa"][0]  # FA grows with the sequence
    assert sizes["all-swa"][0] == sizes["all-swa"][1]  # SWA bounded by sinks + window
    assert sizes["all-gdn"][0] == sizes["all-gdn"][1]  # GDN fixed-size state
    window_state = model.new_state("all-swa").layers[0]
    assert window_state.k.shape[1] == cfg.swa.window + cfg.swa.sinks
