"""The decode program (supernet/decode_program.py): when it serves a step, and that what it computes stays the
reference path's when weights change under it or a mixer group needs its own path. Its step-by-step equality
with the reference path for every placement, mixed batches and forks runs in test_fast_decode.py (its
``c-kernels`` variant decodes through the program)."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu as cpu_kernels
from kernels.linear import BLOCKED_MAX_ROWS
from supernet import decode_program
from supernet.fastpath import reference_path
from tests.core.helpers import perturbed
from tests.threads import torch_threads

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the C kernels do not build here")


@pytest.fixture(scope="module")
def model(tiny_supernet):
    return perturbed(tiny_supernet, seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """The thread count the program serves (see test_serves_only_what_its_kernels_cover)."""
    with torch_threads(1):
        yield


def _states(model, placements, prompt_len=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (len(placements), prompt_len), generator=gen)
    states = [model.new_state(p) for p in placements]
    with torch.no_grad():
        for row, state in enumerate(states):
            model(ids[row : row + 1], states=[state])
    return states


def test_serves_only_what_its_kernels_cover(model) -> None:
    states = _states(model, ["all-fa", "all-kda"])
    one = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        assert decode_program.serves(model, one, states)
        assert not decode_program.serves(model, torch.zeros(2, 2, dtype=torch.long), states)  # two tokens a row
        many = torch.zeros(BLOCKED_MAX_ROWS + 1, 1, dtype=torch.long)
        assert not decode_program.serves(model, many, states * (BLOCKED_MAX_ROWS // 2 + 1))
        with reference_path():
            assert not decode_program.serves(model, one, states)
        torch.set_num_threads(2)  # the product kernel is single-threaded: oneDNN's threads serve instead
        assert not decode_program.serves(model, one, states)
        torch.set_num_threads(1)
        previous = cpu_kernels.set_enabled(False)
        try:
            assert not decode_program.serves(model, one, states)
        finally:
            cpu_kernels.set_enabled(previous)
    assert not decode_program.serves(model, one, states)  # autograd on


def test_weights_changed_between_steps_are_picked_up(tiny_supernet) -> None:
    """The program keeps prepared weights between steps; a weight trained or loaded in place (its version
    moves) or replaced (its storage moves) must reach the next step."""
    model = perturbed(tiny_supernet, seed=4)
    placements = ["fa,swa,gdn,kda", "all-kda"]
    fast = _states(model, placements)
    ref = [s.clone() for s in fast]
    tok = torch.tensor([[5], [9]])
    layer = model.layer(1)
    with torch.no_grad():
        model(tok, states=fast)
        with reference_path():
            model(tok, states=ref)
        layer.mlp.down_proj.weight.mul_(1.5)  # trunk, in place
        layer.mixers["kda"].proj.lora["o"].B.add_(0.1)  # a mixer's LoRA delta, in place
        layer.post_attention_layernorm.weight.data = layer.post_attention_layernorm.weight * 0.5  # new storage
        model.embed_tokens.weight.mul_(1.1)  # the tied head
        assert decode_program.serves(model, tok, fast)
        got = model(tok, states=fast).logits
        with reference_path():
            want = model(tok, states=ref).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_an_open_speculative_window_takes_the_mixers_own_path(model) -> None:
    """GDN/KDA states recording a speculative window (DeltaState.history) go through the mixer's forward,
    which records every position; the other rows' mixers still run on the kernels."""
    placements = ["all-gdn", "all-fa"]
    fast = _states(model, placements, seed=1)
    ref = [s.clone() for s in fast]
    for state in (fast[0], ref[0]):
        for layer in state.layers:
            layer.open_history()
    tok = torch.tensor([[3], [4]])
    with torch.no_grad():
        assert decode_program.serves(model, tok, fast)
        got = model(tok, states=fast).logits
        with reference_path():
            want = model(tok, states=ref).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    recorded = fast[0].layers[0].history
    assert recorded is not None and recorded.inputs.shape[0] == 1  # the step was recorded
