"""Builders for kernel test inputs (paged caches with NaN in every unused slot, permuted tables),
and a call recorder for the tests that check which route ran."""

from __future__ import annotations

import math

import torch

NAN = float("nan")


def record_calls(monkeypatch, module, name: str, calls: list) -> None:
    """Wrap `module.name` so that each call appends `name` to `calls`, then runs it."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))


def random_paged_cache(
    seqlens: list[int],
    width: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    extra_blocks: int = 3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kv_cache [num_blocks, block_size, width]`, `block_table [b, max_blocks]` int32.

    Blocks come from a random permutation (so tables are scattered and interleaved across
    sequences); every slot past a sequence's length and every unused block holds NaN; the table's
    unused tail points at real (NaN or other sequences') blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / block_size) for n in seqlens) + 1)
    num_blocks = len(seqlens) * max_blocks + extra_blocks
    cache = torch.full((num_blocks, block_size, width), NAN, dtype=torch.float32)
    order = torch.randperm(num_blocks, generator=gen)
    table = order[: len(seqlens) * max_blocks].view(len(seqlens), max_blocks).to(torch.int32)
    for seq, length in enumerate(seqlens):
        for pos in range(length):
            cache[table[seq, pos // block_size], pos % block_size] = torch.randn(width, generator=gen)
    return cache.to(dtype), table


def quantize_cache(cache: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-poisoned paged cache `[blocks, block_size, width]` in fp8 with per-token scales ->
    (fp8 cache, `kv_scale [blocks, block_size]`); unused (NaN) slots stay NaN in both."""
    from m2la.quantization import quantize_rows

    unused = torch.isnan(cache).any(-1)  # [blocks, block_size]
    quantized, scale = quantize_rows(cache.float().nan_to_num(0.0), fp8_dtype)
    nan_bits = torch.tensor([NAN]).to(fp8_dtype).view(torch.uint8)
    quantized.view(torch.uint8)[unused] = nan_bits  # fp8 has no masked_fill on CPU
    scale[unused] = NAN
    return quantized, scale


def random_quantized_paged_cache(
    seqlens: list[int], width: int, block_size: int, fp8_dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`random_paged_cache` quantized to fp8 (`quantize_cache`) -> (fp8 cache, `kv_scale
    [blocks, block_size]`, block table, the fp32 cache)."""
    cache, table = random_paged_cache(seqlens, width, block_size, torch.float32, seed=seed)
    return *quantize_cache(cache, fp8_dtype), table, cache


def random_contiguous_cache(
    seqlens: list[int], width: int, s_max: int, dtype: torch.dtype, kv_start: list[int] | None = None, seed: int = 0
) -> torch.Tensor:
    """`kv_cache [b, s_max, width]` with NaN outside `[kv_start, seqlen)`."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.full((len(seqlens), s_max, width), NAN, dtype=torch.float32)
    for seq, length in enumerate(seqlens):
        first = 0 if kv_start is None else kv_start[seq]
        cache[seq, first:length] = torch.randn(length - first, width, generator=gen)
    return cache.to(dtype)


def rows_of(cache: torch.Tensor, table: torch.Tensor | None, seq: int, length: int) -> torch.Tensor:
    """Plain Python gather of one sequence's first `length` rows -> `[length, width]` (fp64)."""
    if table is None:
        return cache[seq, :length].double()
    block_size = cache.shape[1]
    rows = [cache[int(table[seq, pos // block_size]), pos % block_size].double() for pos in range(length)]
    return torch.stack(rows) if rows else cache.new_zeros(0, cache.shape[-1], dtype=torch.float64)


def dense_attention_fp64(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, visible):
    """Softmax attention in fp64: `q [h, t, d]`, `keys [h|1, s, d]`, `values [h|1, s, v]`, bool `[t, s]`."""
    scores = (q.double() @ keys.double().transpose(-1, -2)) * scale  # [h, t, s]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [h, t]
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return weights @ values.double(), lse


def assert_close_with_lse(out, lse, ref_out, ref_lse, atol: float, rtol: float = 0.0) -> None:
    """Compare outputs and LSEs; -inf LSE (empty) must match exactly and pair with a zero output."""
    assert torch.isfinite(out).all(), "output has non-finite values"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "empty-sequence pattern differs"
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse[~empty].float(), ref_lse[~empty].float(), atol=atol, rtol=rtol)
    if empty.any():
        assert (out.float()[empty] == 0).all()
