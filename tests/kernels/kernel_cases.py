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


def random_layer(
    heads: int, rank: int, nope: int, rope_pairs: int, v_dim: int, std: float, q_rank: int | None = None,
    kv_b_bias: bool = True,
):  # fmt: skip
    """An fp32 `M2LAttention` (hidden size 24, query and kv_a biases) with N(0, std) weights; seed first."""
    import m2la

    config = m2la.M2LAConfig(
        hidden_size=24, num_heads=heads, kv_rank=rank, rope_dim=2 * rope_pairs, qk_nope_dim=nope, v_head_dim=v_dim,
        softmax_scale=0.3, q_rank=q_rank, kv_b_bias=kv_b_bias, q_bias=True, kv_a_bias=True,
        rope_inv_freq=[1.0 / (i + 1) for i in range(rope_pairs)], rope_axis=[0] * rope_pairs,
        rope_source_column=list(range(rope_pairs)),
    )  # fmt: skip
    module = m2la.M2LAttention(config)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    return module


def module_errors_vs_fp32(
    layout: tuple[int, int, int, int, int], chunks: list[int], dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> tuple[float, float]:
    """A random `M2LAttention` of `layout` = (heads, kv_rank, qk_nope_dim, rope pairs, v_head_dim),
    with biases, run over one cache in `chunks` of new tokens (decode for one, chunked prefill
    otherwise) in `dtype` on both backends -> max errors (torch in `dtype`, Triton in `dtype`) against
    the fp32 module on the reference backend."""
    import m2la
    from m2la.backends import use_backend

    torch.manual_seed(seed)
    module = random_layer(*layout, std=0.3)
    lowp = m2la.M2LAttention(module.config)
    lowp.load_state_dict(module.state_dict())
    module, lowp = module.to(device), lowp.to(device, dtype)
    hidden = torch.randn(2, sum(chunks), 24).to(device)
    cos, sin = module.rope_cos_sin(torch.arange(sum(chunks), device=device)[None].expand(2, -1))

    def run(layer, backend, run_dtype):
        cache, outs, done = m2la.LatentCache(1), [], 0
        with use_backend(backend), torch.no_grad():
            for t in chunks:
                new = slice(done, done + t)
                outs.append(layer.attend(hidden[:, new].to(run_dtype), cos[:, new], sin[:, new], cache=cache).float())
                done += t
        return torch.cat(outs, dim=1)

    expected = run(module, "reference", torch.float32)
    torch_error = (run(lowp, "reference", dtype) - expected).abs().max().item()
    triton_error = (run(lowp, "triton", dtype) - expected).abs().max().item()
    return torch_error, triton_error
