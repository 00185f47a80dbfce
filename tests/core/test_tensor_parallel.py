"""Tensor parallelism (supernet.tensor_parallel), simulated in one process: ``world`` sharded copies of a model
run side by side in threads, and their ``DecoderLayer.reduce`` is a real all-reduce between those threads (every
rank sums the same partials in the same order, as a collective does). The sharded run must reproduce the
unsharded model's logits -- full-sequence forward, prefill with states and decode steps -- for every mixer, a
mixed placement and rows on different placements in one batch. Every parameter is randomised first, so a wrong
split of any of them (even ones that start at zero or one) changes the output."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from supernet.cache import DeltaState, KVCache, layer_state_bytes
from supernet.config import AttentionConfig, DeltaConfig, SupernetConfig
from supernet.model import SupernetForCausalLM
from supernet.tensor_parallel import check_tensor_parallel, local_config, shard_layer, shard_model

PLACEMENTS = ["all-fa", "all-swa", "all-gdn", "all-kda", "fa,swa,gdn,kda"]


def tiny_config(mode: str, heads: int = 4, kv_heads: int = 2) -> SupernetConfig:
    """The tiny teacher's layout (64 wide, 4 heads of 16) with biases everywhere they can be."""
    return SupernetConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        fa=AttentionConfig(heads, kv_heads, 16, bias=True),
        swa=AttentionConfig(heads, kv_heads, 16, bias=True, window=4, sinks=1),
        gdn=DeltaConfig(heads, 16, gate_rank=8), kda=DeltaConfig(heads, 16, gate_rank=8),
        mlp_bias=True, mixer_weights=mode, lora_rank=4,
    )


def random_model(config: SupernetConfig, seed: int = 0) -> SupernetForCausalLM:
    torch.manual_seed(seed)
    model = SupernetForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 if p.dim() == 1 or "conv" in name else 0.15)
    return model


class ThreadAllReduce:
    """An all-reduce among ``world`` threads: each contributes its tensor, all get the same rank-ordered sum."""

    def __init__(self, world: int) -> None:
        self.barrier, self.slots = threading.Barrier(world, timeout=60), [torch.empty(0)] * world
        self.calls = 0

    def for_rank(self, rank: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)
            if rank == 0:
                self.calls += 1
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total

        return reduce


def sharded(model: SupernetForCausalLM, world: int) -> tuple[list[SupernetForCausalLM], ThreadAllReduce]:
    net = ThreadAllReduce(world)
    return [shard_model(copy.deepcopy(model), r, world, net.for_rank(r)) for r in range(world)], net


def run_ranks(ranks, fn):
    """fn(rank, model) on every rank at once (collectives need all of them); the results in rank order."""

    def call(r):
        with torch.no_grad():
            return fn(r, ranks[r])

    with ThreadPoolExecutor(len(ranks)) as pool:
        return list(pool.map(call, range(len(ranks))))


def assert_same(ranks_out: list[torch.Tensor], reference: torch.Tensor) -> None:
    for out in ranks_out[1:]:  # every rank ends with the same (replicated) logits
        assert torch.equal(out, ranks_out[0])
    torch.testing.assert_close(ranks_out[0], reference, atol=2e-5, rtol=1e-4)


def check_model(model: SupernetForCausalLM, world: int) -> None:
    ranks, net = sharded(model, world)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    for placement in PLACEMENTS:
        with torch.no_grad():
            want = model(ids, placement).logits
        got = run_ranks(ranks, lambda r, m, p=placement: m(ids, p).logits)
        assert_same(got, want)
        assert net.calls > 0
    # Incremental: two rows on different placements in one batch, a 5-token prefill, then decode steps.
    rows = ["fa,swa,gdn,kda", "kda,gdn,swa,fa"]
    with torch.no_grad():
        ref_states = [model.new_state(p) for p in rows]
        want = [model(ids[:, :5], states=ref_states).logits]
        want += [model(ids[:, t : t + 1], states=ref_states).logits for t in range(5, 11)]
    states = [[m.new_state(p) for p in rows] for m in ranks]

    def incremental(r, m):
        outs = [m(ids[:, :5], states=states[r]).logits]
        return outs + [m(ids[:, t : t + 1], states=states[r]).logits for t in range(5, 11)]

    got = run_ranks(ranks, incremental)
    for step in range(len(want)):
        assert_same([g[step] for g in got], want[step])
    # Each rank's states hold its own heads only.
    gdn, fa = states[0][0].layers[2], states[0][0].layers[0]
    assert isinstance(gdn, DeltaState) and isinstance(fa, KVCache)
    assert gdn.recurrent.shape[0] == model.config.gdn.num_heads // world
    assert fa.k.shape[0] == model.config.fa.num_kv_heads // world


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_match_the_unsharded_model(mode):
    check_model(random_model(tiny_config(mode)), world=2)


def test_one_kv_head_per_rank_with_grouped_queries():
    """world = the KV-head count: every rank holds one KV head and the two query heads that read it."""
    check_model(random_model(tiny_config("lora", heads=8, kv_heads=4)), world=4)


def test_shards_hold_their_slice_and_world_one_changes_nothing():
    model = random_model(tiny_config("lora"))
    layer = copy.deepcopy(model.layer(0))
    shard_layer(layer, 1, 2)
    full = model.layer(0)
    # rank 1 holds the second half of the heads: query heads 2-3, KV head 1, the q|k|v conv channels of heads 2-3
    torch.testing.assert_close(layer.attn.q_proj.weight, full.attn.q_proj.weight[32:])
    torch.testing.assert_close(layer.attn.k_proj.weight, full.attn.k_proj.weight[16:])
    torch.testing.assert_close(layer.attn.o_proj.weight, full.attn.o_proj.weight[:, 32:])
    conv = full.mixers["gdn"].conv_weight
    torch.testing.assert_close(layer.mixers["gdn"].conv_weight, torch.cat([conv[32:64], conv[96:128], conv[160:]]))
    assert torch.count_nonzero(layer.mlp.down_proj.bias) == 0  # the row-parallel bias is added on rank 0 only
    assert layer.attn.q_proj.out_features == 32 and layer.mlp.down_proj.in_features == 64
    same = copy.deepcopy(model)
    shard_model(same, 0, 1)
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_local_config_sizes_states_like_a_sharded_model():
    """A rank's states hold its heads only, and local_config's layer_state_bytes says exactly how much."""
    config = tiny_config("lora")
    rank = shard_model(random_model(config), 0, 2)  # run alone (no all-reduce): only the shapes matter here
    local = local_config(config, 2)
    for name in ("fa", "swa", "gdn", "kda"):
        state = rank.new_state(f"all-{name}")
        with torch.no_grad():
            rank(torch.zeros(1, 6, dtype=torch.long), states=[state])
        assert state.layers[0].nbytes() == layer_state_bytes(local, name, 6) < layer_state_bytes(config, name, 6)


def test_a_world_that_does_not_divide_the_kv_heads_is_refused():
    config = tiny_config("lora")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tensor parallel size 4 .*fa\.num_kv_heads=2"):
        check_tensor_parallel(config, 4)
    model = random_model(config)
    with pytest.raises(ValueError, match=r"tensor parallel size 3 .*num_kv_heads=2"):
        shard_model(model, 0, 3)
    with pytest.raises(ValueError, match=r"tensor parallel size 3"):
        shard_layer(model.layer(0), 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard_layer(model.layer(0), 2, 2)
