"""pytest-benchmark suite for the reference kernel ops on CPU (small shapes).

python -m pytest benchmarks/bench_kernels_cpu.py --benchmark-enable -q
"""

from __future__ import annotations

import math

import pytest
import torch

from m2la.kernels import decode_attention, prefill_attention, write_latent_cache
from m2la.quantization import quantize_rows

BLOCK_SIZE = 64


def paged_cache(batch, context, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = batch * math.ceil(context / BLOCK_SIZE)
    cache = torch.randn(blocks, BLOCK_SIZE, width, generator=gen)
    table = torch.randperm(blocks, generator=gen).view(batch, -1).to(torch.int32)
    return cache, table


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32-cache", "fp8-cache"])
@pytest.mark.parametrize("kv_rank,rope_dim", [(448, 64), (896, 128)])
@pytest.mark.parametrize("batch,context", [(1, 1024), (4, 2048)])
def test_bench_decode_reference(benchmark, batch, context, kv_rank, rope_dim, fp8):
    cache, table = paged_cache(batch, context, kv_rank + rope_dim)
    kv_scale = None
    if fp8:
        cache, kv_scale = quantize_rows(cache, torch.float8_e4m3fn)
    q = torch.randn(batch, 32, kv_rank + rope_dim)
    lens = torch.full((batch,), context, dtype=torch.int32)
    out, _ = benchmark(decode_attention, q, cache, lens, 0.06, kv_rank, table, kv_scale=kv_scale, backend="reference")
    assert out.shape == (batch, 32, kv_rank)


@pytest.mark.parametrize("chunk,prefix", [(128, 0), (64, 512)])
def test_bench_prefill_reference(benchmark, chunk, prefix):
    kv_rank, rope_dim, heads = 448, 64, 8
    cache, table = paged_cache(1, chunk + prefix, kv_rank + rope_dim)
    q_nope, q_rope = torch.randn(chunk, heads, 128), torch.randn(chunk, heads, rope_dim)
    w_uk, w_uv = torch.randn(heads, kv_rank, 128) * 0.05, torch.randn(heads, kv_rank, 128) * 0.05
    cu = torch.tensor([0, chunk], dtype=torch.int32)
    lens = torch.tensor([chunk + prefix], dtype=torch.int32)
    out, _ = benchmark(prefill_attention, q_nope, q_rope, cache, w_uk, w_uv, cu, lens, 0.08, table, backend="reference")
    assert out.shape == (chunk, heads, 128)


def test_bench_cache_write_reference(benchmark):
    tokens, kv_rank, pairs = 512, 448, 32
    cache = torch.zeros(16, BLOCK_SIZE, kv_rank + 2 * pairs)
    latent, k_rope = torch.randn(tokens, kv_rank), torch.randn(tokens, 2 * pairs)
    angles = torch.rand(tokens, pairs)
    slots = torch.randperm(16 * BLOCK_SIZE)[:tokens]
    benchmark(write_latent_cache, cache, latent, k_rope, angles.cos(), angles.sin(), slots, backend="reference")
