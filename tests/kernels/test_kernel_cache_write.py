"""write_latent_cache: reference vs a per-token fp64 loop, Triton (interpreter) vs reference."""

from __future__ import annotations

import math

import pytest
import torch

from m2la.kernels import write_latent_cache


def make_inputs(num_tokens, kv_rank, num_pairs, num_blocks, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(num_tokens, kv_rank, generator=gen).to(dtype)
    k_rope = torch.randn(num_tokens, 2 * num_pairs, generator=gen).to(dtype)
    angles = torch.rand(num_tokens, num_pairs, generator=gen) * 2 * math.pi
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::4] = -1  # padding tokens are skipped
    cache = torch.full((num_blocks, block_size, kv_rank + 2 * num_pairs), float("nan"), dtype=dtype)
    return cache, latent, k_rope, angles.cos(), angles.sin(), slots.long()


def write_fp64_loop(cache, latent, k_rope, cos, sin, slots):
    expected = cache.double().clone()
    block_size, num_pairs = cache.shape[1], cos.shape[1]
    for tok, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        x, y = k_rope[tok, :num_pairs].double(), k_rope[tok, num_pairs:].double()
        c, s = cos[tok].double(), sin[tok].double()
        row = torch.cat([latent[tok].double(), x * c - y * s, x * s + y * c])
        expected[slot // block_size, slot % block_size] = row
    return expected


@pytest.mark.parametrize("kv_rank,num_pairs", [(48, 8), (96, 16)])
def test_reference_matches_loop(kv_rank, num_pairs):
    cache, *inputs = make_inputs(21, kv_rank, num_pairs, 5, 8, torch.float32)
    expected = write_fp64_loop(cache, *inputs)
    write_latent_cache(cache, *inputs, backend="reference")
    torch.testing.assert_close(cache.double(), expected, atol=1e-6, rtol=0, equal_nan=True)
    assert torch.isnan(cache).any()  # untouched slots stay as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens,kv_rank,num_pairs", [(1, 48, 8), (37, 48, 8), (21, 96, 16), (0, 48, 8)])
def test_triton_matches_reference(num_tokens, kv_rank, num_pairs, dtype):
    cache, *inputs = make_inputs(num_tokens, kv_rank, num_pairs, 6, 8, dtype, seed=num_tokens)
    expected = cache.clone()
    write_latent_cache(expected, *inputs, backend="reference")
    write_latent_cache(cache, *inputs, backend="triton")
    # fp32 rotation then one rounding in both paths: fp16 may differ by one ulp at most.
    atol = 0.0 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(cache, expected, atol=atol, rtol=1e-6 if atol == 0 else 1e-3, equal_nan=True)
