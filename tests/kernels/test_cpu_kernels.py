"""The C kernels (kernels/cpu) against torch: decode attention (vs rotary + SDPA, and through the mixers), one-row
products, RMSNorm. The GDN/KDA step is pinned through the model in tests/core/test_fast_decode.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu as cpu_kernels
from supernet.cache import KVCache
from supernet.fastpath import reference_path
from supernet.layers import apply_rotary


def test_the_kernels_build_on_this_machine() -> None:
    # The CPU path is the one the suite proves: if the kernels stopped building here, every decode test below
    # would silently test torch's fallback instead.
    assert cpu_kernels.library() is not None


def test_switched_off_by_the_environment() -> None:
    code = "from kernels import cpu; print(cpu.library() is None)"
    env = {**os.environ, "SUPERNET_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def _rotary_tables(position: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat((position * inv, position * inv)).float()
    return emb.cos(), emb.sin()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "length"),
    [(9, 3, 64, 0), (9, 3, 64, 1), (9, 3, 64, 517), (8, 8, 64, 40), (8, 2, 128, 300), (6, 2, 32, 33), (4, 1, 48, 9)],
)
@pytest.mark.parametrize("rotary", [True, False])
def test_kernel_equals_rotary_then_attention(heads, kv_heads, d, length, rotary) -> None:
    gen = torch.Generator().manual_seed(length + heads + d)
    capacity = length + 5  # spare capacity: heads sit capacity * d apart, not length * d
    k_cache = torch.randn(kv_heads, capacity, d, generator=gen)
    v_cache = torch.randn(kv_heads, capacity, d, generator=gen)
    q = 3 * torch.randn(heads * d, generator=gen)  # large logits: the softmax's max subtraction matters
    k_new, v_new = torch.randn(kv_heads * d, generator=gen), torch.randn(kv_heads * d, generator=gen)
    cos, sin = _rotary_tables(length, d) if rotary else (None, None)

    qk = torch.cat((q.view(heads, d), k_new.view(kv_heads, d)))[None, None]
    if rotary:
        qk = apply_rotary(qk, cos[None, None], sin[None, None])
    q_rot, k_rot = qk[0, 0, :heads], qk[0, 0, heads:]
    keys = torch.cat((k_cache[:, :length], k_rot[:, None]), dim=1)
    values = torch.cat((v_cache[:, :length], v_new.view(kv_heads, 1, d)), dim=1)
    want = F.scaled_dot_product_attention(q_rot.view(1, kv_heads, heads // kv_heads, d), keys[None], values[None])

    out = torch.empty(1, heads * d)
    rope = (None, None) if cos is None else (cos[None], sin[None])
    cpu_kernels.attention_decode(
        cpu_kernels.library(), q[None], k_new[None], v_new[None], *rope, [(k_cache, v_cache, length, length + 1)],
        d**-0.5, out,
    )
    torch.testing.assert_close(out[0], want.reshape(-1), atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, length], k_rot, atol=1e-6, rtol=0)  # the new key, rotated, in its slot
    assert torch.equal(v_cache[:, length], v_new.view(kv_heads, d))


def test_fa_decode_grows_a_full_cache_like_append(tiny_supernet) -> None:
    """A KVCache at capacity doubles before the kernel writes past it, and decoding stays equal to the reference."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, tiny_supernet.config.vocab_size, (1, 6), generator=gen)
    steps = torch.randint(0, tiny_supernet.config.vocab_size, (1, 5), generator=gen)
    with torch.no_grad():
        fast = tiny_supernet.new_state("all-fa")
        tiny_supernet(ids, states=[fast])
        for layer in fast.layers:  # shrink every cache to exactly its contents: the next token must grow it
            assert isinstance(layer, KVCache)
            layer.k, layer.v = layer.k[:, : layer.length].clone(), layer.v[:, : layer.length].clone()
        ref = fast.clone()
        for i in range(steps.shape[1]):
            got = tiny_supernet(steps[:, i : i + 1], states=[fast]).logits
            with reference_path():
                want = tiny_supernet(steps[:, i : i + 1], states=[ref]).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    first = fast.layers[0]
    assert isinstance(first, KVCache) and first.length == 11 and first.k.shape[1] >= 11


def test_rows_of_one_call_keep_their_own_caches_and_lengths() -> None:
    """A batch call: rows with different lengths, capacities and strided inputs each equal their solo call."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, d = 6, 2, 64
    lengths, capacities = [0, 37, 300, 5], [8, 40, 301, 64]
    caches = [
        (torch.randn(kv_heads, cap, d, generator=gen), torch.randn(kv_heads, cap, d, generator=gen))
        for cap in capacities
    ]
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d, generator=gen)  # q, k, v as strided views of one tensor
    q, k_new, v_new = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    rope = torch.stack([torch.cat(_rotary_tables(n, d)) for n in lengths])
    cos, sin = rope[:, :d], rope[:, d:]  # strided too
    solo = []
    for i, n in enumerate(lengths):
        k_cache, v_cache = caches[i][0].clone(), caches[i][1].clone()
        out = torch.empty(1, heads * d)
        cpu_kernels.attention_decode(
            cpu_kernels.library(), q[i : i + 1], k_new[i : i + 1], v_new[i : i + 1], cos[i : i + 1],
            sin[i : i + 1], [(k_cache, v_cache, n, n + 1)], d**-0.5, out,
        )
        solo.append((out[0], k_cache))
    out = torch.empty(4, heads * d)
    cpu_kernels.attention_decode(
        cpu_kernels.library(), q, k_new, v_new, cos, sin,
        [(kc, vc, n, n + 1) for (kc, vc), n in zip(caches, lengths, strict=True)], d**-0.5, out,
    )
    for i in range(4):
        assert torch.equal(out[i], solo[i][0])
        assert torch.equal(caches[i][0], solo[i][1])


@pytest.mark.parametrize(
    ("shape", "out_features"),
    [((1, 576), 960), ((1, 1, 37), 5), ((1, 1, 1, 64), 200), ((8, 1, 576), 3072), ((3, 7), 33), ((21, 40), 16)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows_equal_f_linear(shape, out_features, bias) -> None:
    """Every row count of linear.c's specialised loops (1-8, and 21 = 8 + 8 + 5), widths that are not a whole
    number of 16-channel blocks, with and without bias."""
    gen = torch.Generator().manual_seed(out_features)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(out_features, shape[-1], generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    blocked = cpu_kernels.block_weight(weight)
    assert blocked.shape == (-(-out_features // 16), shape[-1], 16)
    got = cpu_kernels.linear_rows(cpu_kernels.library(), x, blocked, b, out_features)
    assert got.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-5)


def test_linear_rows_read_strided_rows() -> None:
    """Rows of a wider tensor (a split of a fused projection's output) are read in place."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 100, generator=gen)
    x = wide[:, 10:74]
    weight = torch.randn(40, 64, generator=gen)
    got = cpu_kernels.linear_rows(cpu_kernels.library(), x, cpu_kernels.block_weight(weight), None, 40)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_equals_torch(weighted) -> None:
    gen = torch.Generator().manual_seed(2)
    x = 5 * torch.randn(3, 4, 576, generator=gen)
    weight = torch.randn(576, generator=gen) if weighted else None
    got = cpu_kernels.rms_norm(cpu_kernels.library(), x, weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (576,), weight, 1e-5), atol=1e-5, rtol=1e-5)
