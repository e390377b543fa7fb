"""decode_attention: reference vs fp64 dense attention, Triton (interpreter) vs reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import (
    assert_close_with_lse,
    dense_attention_fp64,
    random_contiguous_cache,
    random_paged_cache,
    rows_of,
)

from m2la.kernels import decode_attention

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def decode_fp64(q, cache, table, seqlens, scale, kv_rank, kv_start=None):
    """Per-sequence gather + fp64 softmax: an oracle independent of the reference's vectorised gather."""
    outs, lses = [], []
    for seq, length in enumerate(seqlens):
        first = 0 if kv_start is None else kv_start[seq]
        rows = rows_of(cache, table, seq, length)[first:]  # [s, r+2p]
        visible = torch.ones(1, rows.shape[0], dtype=torch.bool)
        out, lse = dense_attention_fp64(q[seq][:, None], rows[None], rows[None, :, :kv_rank], scale, visible)
        outs.append(out[:, 0])
        lses.append(lse[:, 0])
    return torch.stack(outs), torch.stack(lses)


def make_case(heads, kv_rank, rope_dim, seqlens, block_size, dtype, seed=0):
    cache, table = random_paged_cache(seqlens, kv_rank + rope_dim, block_size, dtype, seed=seed)
    q = torch.randn(len(seqlens), heads, kv_rank + rope_dim, generator=torch.Generator().manual_seed(seed + 1))
    return q.to(dtype), cache, table, torch.tensor(seqlens, dtype=torch.int32)


@pytest.mark.parametrize("kv_rank,rope_dim", [(48, 16), (96, 32)])
@pytest.mark.parametrize("kv_start", [None, [0, 0, 5, 20]])
def test_reference_matches_fp64_dense(kv_rank, rope_dim, kv_start):
    seqlens = [0, 1, 63, 37]
    q, cache, table, lens = make_case(3, kv_rank, rope_dim, seqlens, 16, torch.float32)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32)
    out, lse = decode_attention(q, cache, lens, 0.125, kv_rank, table, start, backend="reference")
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.125, kv_rank, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-5)


def test_reference_oracle_can_fail():
    """A cache row changed inside the visible range must move the result beyond tolerance."""
    q, cache, table, lens = make_case(3, 48, 16, [5, 9], 16, torch.float32)
    out, _ = decode_attention(q, cache, lens, 0.5, 48, table, backend="reference")
    cache[table[1, 0], 3] += 1.0
    ref_out, _ = decode_fp64(q, cache, table, [5, 9], 0.5, 48)
    assert not torch.allclose(out[1].double(), ref_out[1], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads", [1, 3, 16, 32, 63])
def test_triton_paged_heads(heads, dtype):
    seqlens = [0, 1, 63, 37]  # empty, single token, not a page multiple
    q, cache, table, lens = make_case(heads, 48, 16, seqlens, 16, dtype, seed=heads)
    out, lse = decode_attention(q, cache, lens, 0.2, 48, table, backend="triton")
    ref_out, ref_lse = decode_attention(q, cache, lens, 0.2, 48, table, backend="reference")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "kv_rank,rope_dim,block_size,num_splits",
    [
        (96, 32, 16, 1),  # two value tiles, one split
        (96, 32, 8, 3),  # page smaller than the token tile
        (48, 16, 24, 40),  # more splits than blocks/tiles: empty splits must weigh zero
        (64, 8, 16, 2),  # rope narrower than the minimum dot width
    ],
)
def test_triton_paged_shapes(kv_rank, rope_dim, block_size, num_splits, dtype):
    seqlens = [1, 63, 50]
    q, cache, table, lens = make_case(5, kv_rank, rope_dim, seqlens, block_size, dtype, seed=kv_rank)
    out, lse = decode_attention(q, cache, lens, 0.15, kv_rank, table, num_splits=num_splits, backend="triton")
    ref_out, ref_lse = decode_attention(q, cache, lens, 0.15, kv_rank, table, backend="reference")
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_contiguous_left_padded(dtype):
    seqlens, kv_start = [40, 17, 3, 0], [7, 0, 3, 0]  # third sequence: everything padded out
    cache = random_contiguous_cache(seqlens, 48 + 16, 40, dtype, kv_start)
    q = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    lens, start = torch.tensor(seqlens, dtype=torch.int32), torch.tensor(kv_start, dtype=torch.int32)
    out, lse = decode_attention(q, cache, lens, 0.2, 48, None, start, num_splits=2, backend="triton")
    ref_out, ref_lse = decode_fp64(q, cache, None, seqlens, 0.2, 48, kv_start)
    assert_close_with_lse(out, lse, ref_out.to(dtype), ref_lse.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_paged_kv_start():
    seqlens, kv_start = [30, 63], [17, 1]
    q, cache, table, lens = make_case(4, 48, 16, seqlens, 16, torch.float32)
    for seq, first in enumerate(kv_start):  # hidden prefix holds NaN too
        for pos in range(first):
            cache[table[seq, pos // 16], pos % 16] = float("nan")
    start = torch.tensor(kv_start, dtype=torch.int32)
    out, lse = decode_attention(q, cache, lens, 0.2, 48, table, start, num_splits=3, backend="triton")
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.2, 48, kv_start)
    assert_close_with_lse(out, lse, ref_out.float(), ref_lse.float(), atol=2e-5)


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_D=64, BLOCK_V=64),  # q resident for the whole loop, values reuse the key tile
        dict(BLOCK_D=64, BLOCK_V=32),  # q resident, two value tiles loaded separately
        dict(BLOCK_D=64, BLOCK_V=64, BLOCK_H=16, BLOCK_N=32),
        dict(BLOCK_D=64, BLOCK_V=64, HEADS_ON_N=True),  # transposed: heads on the MMA N dimension
        dict(BLOCK_D=64, BLOCK_V=64, HEADS_ON_N=True, BLOCK_H=16, BLOCK_N=32, PAGE_TILE=False),
        dict(HEADS_ON_N=True, LATENT_PIECES=True),  # r = 60 as pieces 32 + 16 + 16 (4 columns masked)
        dict(HEADS_ON_N=True, LATENT_PIECES=True, BLOCK_H=16, BLOCK_N=32, PAGE_TILE=False),
        dict(HEADS_ON_N=False, LATENT_PIECES=True),  # heads on M, pieces with accumulators of their own
        dict(HEADS_ON_N=False, LATENT_PIECES=True, BLOCK_H=16, BLOCK_N=32, PAGE_TILE=False),
        dict(BLOCK_D=64, BLOCK_V=64, TRANSPOSED_KEYS=True),  # scores from a second, [D, N] load of the keys
        dict(HEADS_ON_N=False, LATENT_PIECES=True, TRANSPOSED_KEYS=True, BLOCK_N=32, PAGE_TILE=False),
    ],
    ids=[
        "values-from-keys",
        "resident-q",
        "small-h",
        "heads-on-n",
        "heads-on-n-gather",
        "pieces",
        "pieces-gather",
        "pieces-heads-on-m",
        "pieces-heads-on-m-gather",
        "transposed-keys",
        "transposed-keys-pieces-gather",
    ],  # fmt: skip
)
@pytest.mark.parametrize("kv_start", [None, [0, 3, 40, 0]])
def test_triton_single_d_variants(config, kv_start):
    """The `BLOCK_D >= r` variants of the split kernel (picked by tuning) against the fp64 oracle."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens = [0, 5, 63, 100]
    q, cache, table, lens = make_case(7, 60, 16, seqlens, 16, torch.float32, seed=5)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32)
    out, lse = latent_decode_triton(q, cache, lens, 0.2, 60, table, start, num_splits=3, config=config)
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.2, 60, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "config",
    [
        None,  # the interpreter default: latent chunks of BLOCK_D
        dict(BLOCK_D=64, BLOCK_V=32),  # resident, two value tiles loaded separately: no latent key tile
        dict(BLOCK_D=64, BLOCK_V=64),  # resident, values from the latent tile
        dict(HEADS_ON_N=True, LATENT_PIECES=True),
        dict(HEADS_ON_N=False, LATENT_PIECES=True),
        dict(HEADS_ON_N=False, LATENT_PIECES=True, TRANSPOSED_KEYS=True),
    ],
    ids=["chunked", "resident-q", "values-from-keys", "pieces-heads-on-n", "pieces-heads-on-m", "transposed-keys"],
)
def test_rope_only_query_scores_the_rope_key_alone(config, dtype):
    """An n = 0 layer passes its RoPE query `[b, h, 2p]` alone: through every tiling, the result of
    the zero-padded full query (fp64 oracle), NaN in the unused slots."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens, kv_rank = [0, 1, 63, 37], 60
    q, cache, table, lens = make_case(7, kv_rank, 16, seqlens, 16, dtype, seed=17)
    q[..., :kv_rank] = 0.0
    q_rope = q[..., kv_rank:].contiguous()
    start = torch.tensor([0, 0, 9, 30], dtype=torch.int32)
    out, lse = latent_decode_triton(q_rope, cache, lens, 0.2, kv_rank, table, start, num_splits=3, config=config)
    ref_out, ref_lse = decode_fp64(q.double(), cache.double(), table, seqlens, 0.2, kv_rank, start)
    tol = TOL[dtype]
    assert_close_with_lse(out.float(), lse, ref_out.float(), ref_lse.float(), atol=tol, rtol=tol)
    if config is None:  # the op, both backends
        for backend in ("reference", "triton"):
            out_op, lse_op = decode_attention(q_rope, cache, lens, 0.2, kv_rank, table, start, backend=backend)
            assert_close_with_lse(out_op.float(), lse_op, ref_out.float(), ref_lse.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "config",
    [None, dict(HEADS_ON_N=False, LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True)],
    ids=["widened", "fp8-as-fp16"],
)
def test_rope_only_query_over_an_fp8_cache(config):
    """RoPE-only queries over an fp8 cache (a scale a token), the MMAs in q's dtype or in fp16 with
    the query shifted by a power of two near its max (taken over the RoPE query alone)."""
    from kernel_cases import random_quantized_paged_cache

    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens, kv_rank, rope = [0, 1, 63, 37], 60, 16
    cache, scale, table, _ = random_quantized_paged_cache(seqlens, kv_rank + rope, 16, torch.float8_e4m3fn, seed=3)
    rows = cache.float() * scale[..., None]  # what the fp8 cache holds
    q = torch.randn(len(seqlens), 7, kv_rank + rope, generator=torch.Generator().manual_seed(3)) * 8
    q[..., :kv_rank] = 0.0
    lens = torch.tensor(seqlens, dtype=torch.int32)
    out, lse = latent_decode_triton(q[..., kv_rank:].contiguous(), cache, lens, 0.2, kv_rank, table, num_splits=3,
                                    config=config, kv_scale=scale)  # fmt: skip
    ref_out, ref_lse = decode_fp64(q, rows, table, seqlens, 0.2, kv_rank)
    tol = 4e-3 if config else 3e-5
    assert_close_with_lse(out, lse, ref_out.float(), ref_lse.float(), atol=tol, rtol=tol / 3)


def test_decode_refuses_a_query_of_neither_width():
    q, cache, table, lens = make_case(3, 48, 16, [5, 9], 16, torch.float32)
    for width in (63, 15, 17):
        with pytest.raises(ValueError, match=r"expected q \[b, h, r\+2p\] = \[.., .., 64\] or its RoPE part"):
            decode_attention(q[..., :width], cache, lens, 0.2, 48, table, backend="reference")
    with pytest.raises(ValueError, match=r"kv_rank=65 must be in \(0, 64\]"):
        decode_attention(q, cache, lens, 0.2, 65, table, backend="reference")


@pytest.mark.parametrize("heads_on_n", [False, True], ids=["heads-on-m", "heads-on-n"])
def test_triton_head_tiles_match_fp64(heads_on_n):
    """33 heads in 16-head tiles (the two-programs-per-SM sweep tile): three head tiles, the last
    holding one head; every tile must write only its own heads' outputs and LSEs."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens = [0, 5, 63, 100]
    q, cache, table, lens = make_case(33, 60, 16, seqlens, 16, torch.float32, seed=8)
    config = dict(HEADS_ON_N=heads_on_n, LATENT_PIECES=True, BLOCK_H=16, BLOCK_N=32)
    out, lse = latent_decode_triton(q, cache, lens, 0.2, 60, table, num_splits=2, config=config)
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.2, 60)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)


@pytest.fixture
def fresh_decode_plans():
    """Tile plans are cached per shape: a test that patches the tile defaults or the split kernel
    starts and ends with an empty cache."""
    from m2la.kernels.latent_decode import triton as decode

    decode._tile_plan.cache_clear()
    yield
    decode._tile_plan.cache_clear()


def test_launcher_halves_block_n_when_shared_memory_runs_out(monkeypatch, fresh_decode_plans):
    """A default tile that does not fit shared memory is retried with half the BLOCK_N (and the
    choice is remembered); an explicit BLOCK_N in `config` is never changed."""
    from triton.runtime.errors import OutOfResources

    from m2la.kernels.latent_decode import triton as decode

    tried = []
    real_kernel = decode._decode_split_kernel

    class TooBigAbove32:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, **kwargs):
                tried.append(BLOCK_N)
                if BLOCK_N > 32:
                    raise OutOfResources(237568, 232448, "shared memory")
                return real_kernel[grid](*args, BLOCK_N=BLOCK_N, **kwargs)

            return launch

    monkeypatch.setattr(decode, "_decode_split_kernel", TooBigAbove32())
    monkeypatch.setattr(decode, "_BLOCK_N_THAT_FITS", {})
    default_config = decode.decode_config
    monkeypatch.setattr(decode, "decode_config", lambda *a: {**default_config(*a), "BLOCK_N": 128})
    seqlens = [3, 70]
    q, cache, table, lens = make_case(3, 48, 16, seqlens, 16, torch.float32, seed=2)
    out, lse = decode.latent_decode_triton(q, cache, lens, 0.3, 48, table)
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.3, 48)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)
    assert tried == [128, 64, 32]
    decode.latent_decode_triton(q, cache, lens, 0.3, 48, table)
    assert tried[3:] == [32]  # remembered
    with pytest.raises(OutOfResources):
        decode.latent_decode_triton(q, cache, lens, 0.3, 48, table, config=dict(BLOCK_N=64))


@pytest.mark.parametrize("packed", [False, True], ids=["decode", "packed-chunks"])
def test_launcher_falls_back_to_narrow_tiles_when_nothing_else_fits(packed, monkeypatch, fresh_decode_plans):
    """Default tiles that do not fit shared memory even at 16-token tiles (a wide layer on a GPU with
    less shared memory than an H100) give way to `NARROW_DECODE_TILES`, remembered for the shape; tiles
    the caller chose are never replaced. Packed chunks keep all heads on one tile's rows."""
    from triton.runtime.errors import OutOfResources

    from m2la.kernels.latent_decode import triton as decode

    tried, kv_rank = [], 200  # one narrow value tile of 256 columns
    real_kernel = decode._decode_split_kernel

    class OnlyNarrowFits:  # any tile but the narrow value tiles "needs more shared memory than there is"
        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, BLOCK_V, **kwargs):
                tried.append((BLOCK_N, BLOCK_V))
                if BLOCK_V != decode.narrow_decode_tiles(kv_rank, packed)["BLOCK_V"]:
                    raise OutOfResources(237568, 101376, "shared memory")
                return real_kernel[grid](*args, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, **kwargs)

            return launch

    monkeypatch.setattr(decode, "_decode_split_kernel", OnlyNarrowFits())
    monkeypatch.setattr(decode, "_BLOCK_N_THAT_FITS", {})
    monkeypatch.setattr(decode, "_NEEDS_NARROW_TILES", set())
    seqlens = [3, 70, 41]
    q, cache, table, lens = make_case(9, kv_rank, 16, seqlens, 16, torch.float32, seed=4)
    chunks = {}
    if packed:  # chunks of 1, 2 and 3 new tokens (3 tokens x 9 heads on 32 rows)
        from test_kernel_prefill import chunked_latent_fp64

        chunks = dict(cu_seqlens_q=torch.tensor([0, 1, 3, 6], dtype=torch.int32), max_seqlen_q=3)
        q = torch.randn(6, 9, kv_rank + 16, generator=torch.Generator().manual_seed(5))
        rows = [rows_of(cache, table, i, n) for i, n in enumerate(seqlens)]
        ref_out, ref_lse = chunked_latent_fp64(q, rows, chunks["cu_seqlens_q"], seqlens, 0.3, kv_rank)
    else:
        ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.3, kv_rank)
    out, lse = decode.latent_decode_triton(q, cache, lens, 0.3, kv_rank, table, **chunks)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)
    assert tried == [(16, 64), (32, 256)]  # the interpreter's default tile (already 16 tokens), then narrow
    tried.clear()
    decode.latent_decode_triton(q, cache, lens, 0.3, kv_rank, table, **chunks)
    assert tried == [(32, 256)]  # remembered: straight to the narrow tiles
    with pytest.raises(OutOfResources):
        decode.latent_decode_triton(q, cache, lens, 0.3, kv_rank, table, config=dict(BLOCK_V=64), **chunks)


def expected_filled_splits(seqlen: int, first: int, num_splits: int, block_n: int, by_length: bool, capacity: int):
    """Splits that hold a visible token: by length, the visible range (first rounded down to a tile)
    cut into `num_splits` runs of whole tiles; by capacity, the capacity cut into runs."""

    def whole_tiles(tokens: int) -> int:  # ceil(tokens / num_splits), rounded up to whole tiles
        return math.ceil(math.ceil(tokens / num_splits) / block_n) * block_n

    base = first // block_n * block_n
    if by_length:
        run = whole_tiles(max(seqlen - base, 0))
        bounds = [(base + s * run, min(base + (s + 1) * run, seqlen)) for s in range(num_splits)]
    else:
        run = whole_tiles(capacity)
        bounds = [(max(s * run, base), min((s + 1) * run, seqlen)) for s in range(num_splits)]
    return sum(1 for lo, hi in bounds if max(lo, first) < hi)


@pytest.mark.parametrize("heads_on_n", [False, True], ids=["heads-on-m", "heads-on-n"])
@pytest.mark.parametrize("by_length", [True, False], ids=["by-length", "by-capacity"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_splits_spread_each_sequence_and_skip_empty_partials(by_length, paged, heads_on_n, poisoned_partials):
    """A short sequence in a long cache (a static cache, a ragged batch, a sliding window): by length,
    its visible tokens spread over every split; by capacity, only the first few splits get work.
    Either way the result matches the fp64 oracle with NaN in the partial buffers, so no empty split's
    unwritten partial is read; and every split writes its LSE."""
    from m2la.kernels.latent_decode.triton import decode_plan, latent_decode_triton

    seqlens, kv_start = [0, 1, 63, 100, 130, 17], [0, 0, 3, 0, 100, 17]  # last: everything padded out
    num_splits = 6
    if paged:
        q, cache, table, lens = make_case(7, 48, 16, seqlens, 16, torch.float32, seed=21)
        capacity = table.shape[1] * 16
    else:
        capacity = 208
        cache = random_contiguous_cache(seqlens, 64, capacity, torch.float32, kv_start, seed=21)
        q, table = torch.randn(len(seqlens), 7, 64, generator=torch.Generator().manual_seed(22)), None
        lens = torch.tensor(seqlens, dtype=torch.int32)
    start = torch.tensor(kv_start, dtype=torch.int32)
    config = dict(SPLIT_BY_LENGTH=by_length)
    if heads_on_n:
        config.update(HEADS_ON_N=True, BLOCK_D=64, BLOCK_V=64)
    block_n = decode_plan(q, cache, 48, table, config=config)[0]["BLOCK_N"]
    out, lse = latent_decode_triton(q, cache, lens, 0.2, 48, table, start, num_splits=num_splits, config=config)
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.2, 48, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)

    ((part_out, part_lse),) = poisoned_partials
    assert not part_lse.isnan().any()  # every split wrote its LSE
    filled = torch.isfinite(part_lse)  # [b, h, splits]
    assert (filled == filled[:, :1]).all()  # all heads of a sequence share its splits
    for seq, (length, first) in enumerate(zip(seqlens, kv_start, strict=True)):
        expected = expected_filled_splits(length, first, num_splits, block_n, by_length, capacity)
        assert int(filled[seq, 0].sum()) == expected, (seq, length, first)
        assert not part_out[seq][filled[seq]].isnan().any()
    # 16-token tiles: 63 tokens fill 4 splits by length, 2 by capacity; the 30-token window 3, 1 or 2
    by_capacity = {160: [0, 1, 2, 4, 2, 0], 208: [0, 1, 2, 3, 1, 0]}[capacity]
    assert filled[:, 0].sum(-1).tolist() == ([0, 1, 4, 4, 3, 0] if by_length else by_capacity)


TMA_CONFIGS = {
    "pieces": dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True),  # r = 60: 32 + 16 + 16, 4 columns past r
    "one-piece": dict(HEADS_ON_N=True, BLOCK_D=64, BLOCK_V=64, TMA=True),
    "16-head-tiles": dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True, BLOCK_H=16, BLOCK_N=32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tile", list(TMA_CONFIGS))
@pytest.mark.parametrize("by_length", [True, False], ids=["by-length", "by-capacity"])
def test_tma_tiles_match_fp64(tile, by_length, dtype):
    """TMA tiles (tensor descriptors over each sequence's visible rows) on contiguous caches: NaN in
    every hidden row (left padding, the tail past the length), empty and single-token sequences, 33
    heads in 16-head tiles, latent pieces that read past r into the RoPE columns."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    kv_rank = 60 if dtype == torch.float32 else 48  # fp16 rows of 76 values are not 16-byte multiples
    seqlens, kv_start = [0, 1, 5, 63, 100, 40], [0, 0, 2, 0, 37, 40]
    cache = random_contiguous_cache(seqlens, kv_rank + 16, 128, dtype, kv_start, seed=7)
    heads = 33 if tile == "16-head-tiles" else 7
    q = torch.randn(len(seqlens), heads, kv_rank + 16, generator=torch.Generator().manual_seed(8)).to(dtype)
    lens, start = torch.tensor(seqlens, dtype=torch.int32), torch.tensor(kv_start, dtype=torch.int32)
    config = dict(TMA_CONFIGS[tile], SPLIT_BY_LENGTH=by_length)
    out, lse = latent_decode_triton(q, cache, lens, 0.2, kv_rank, None, start, num_splits=3, config=config)
    ref_out, ref_lse = decode_fp64(q, cache, None, seqlens, 0.2, kv_rank, kv_start)
    assert_close_with_lse(out, lse, ref_out.to(dtype), ref_lse.float(), atol=TOL[dtype], rtol=TOL[dtype])
    plain = {k: v for k, v in config.items() if k != "TMA"}  # the same tile through pointer loads
    out_plain, _ = latent_decode_triton(q, cache, lens, 0.2, kv_rank, None, start, num_splits=3, config=plain)
    torch.testing.assert_close(out, out_plain, atol=TOL[dtype], rtol=TOL[dtype])


def test_tma_tiles_refuse_what_they_cannot_read():
    """Paged and fp8 caches, rows TMA cannot address, and heads-on-M tiles raise, naming the problem."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton
    from m2la.quantization import quantize_rows

    tma = dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True)
    q, paged, table, lens = make_case(3, 48, 16, [5, 9], 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="block table"):
        latent_decode_triton(q, paged, lens, 0.2, 48, table, config=tma)
    cache = random_contiguous_cache([5, 9], 64, 16, torch.float32)
    fp8, scale = quantize_rows(cache.nan_to_num(0.0), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8"):
        latent_decode_triton(q, fp8, lens, 0.2, 48, None, kv_scale=scale, config=tma)
    odd = random_contiguous_cache([5, 9], 76, 16, torch.float16)  # 152-byte rows
    q_odd = torch.randn(2, 3, 76).to(torch.float16)
    with pytest.raises(ValueError, match="16-byte"):
        latent_decode_triton(q_odd, odd, lens, 0.2, 60, None, config=tma)
    with pytest.raises(ValueError, match="HEADS_ON_N"):
        latent_decode_triton(q, cache, lens, 0.2, 48, None, config=dict(TMA=True, HEADS_ON_N=False))


@pytest.mark.parametrize("heads_on_n", [False, True], ids=["heads-on-m", "heads-on-n"])
@pytest.mark.parametrize("page_tile", [True, False], ids=["page-tile", "row-gather"])
@pytest.mark.parametrize("block_size,block_n", [(16, 16), (32, 16), (48, 16), (16, 32)])
def test_triton_page_tile_addressing(page_tile, block_size, block_n, heads_on_n):
    """Tiles inside one page read one table entry per tile (PAGE_TILE); tiles that span pages, or
    PAGE_TILE=False, gather per row. Both against the fp64 oracle, NaN in every unused slot."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens, kv_start = [0, 1, 63, 113], [0, 0, 17, 50]
    q, cache, table, lens = make_case(3, 48, 16, seqlens, block_size, torch.float32, seed=block_size + block_n)
    start = torch.tensor(kv_start, dtype=torch.int32)
    config = dict(PAGE_TILE=page_tile, BLOCK_N=block_n)
    if heads_on_n:
        config.update(HEADS_ON_N=True, BLOCK_D=64, BLOCK_V=64)
    out, lse = latent_decode_triton(q, cache, lens, 0.2, 48, table, start, num_splits=3, config=config)
    ref_out, ref_lse = decode_fp64(q, cache, table, seqlens, 0.2, 48, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)


def test_programs_per_sm_counts_latent_pieces_as_the_padded_tile(monkeypatch):
    """The wave model's slots per SM: the resident 32-head, 8-warp tile over an fp8 r = 448 cache
    holds one program per SM (registers; its fp8 tiles would let shared memory hold three) whether
    padded (BLOCK_V 512) or in pieces (BLOCK_V 448). Counting the pieces tile as 3 programs per SM
    gave b=1 decode a third of the splits it needs: the H100 fp8 sweep ran every 448 pieces tile
    2.6x slower than the padded one at b=1, 128K, and at par at b=8 and b=32."""
    import types

    from m2la.kernels.latent_decode import triton as decode

    props = types.SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    for pieces in (False, True):
        cfg = decode.decode_config(32, 448, 64, interpret=False, fp8=True)
        cfg = decode.resolve_latent_pieces({**cfg, "LATENT_PIECES": pieces}, 448)
        assert decode.programs_per_sm(cfg, 1, torch.device("cpu")) == 1, cfg
    small = decode.resolve_latent_pieces(decode.decode_config(16, 64, 16, interpret=False), 64)
    assert decode.programs_per_sm(small, 2, torch.device("cpu")) > 1, small


def test_programs_per_sm_follows_the_register_file(monkeypatch):
    """A 255-register tile of 4 warps fits twice in sm_90's 64K registers, one of 8 warps once. The
    16-head, 4-warp, 32-token 896 + 128 tile (99 KiB of shared memory, 255 registers, no spills in
    the sm_90 compile) therefore runs 2 programs per SM; the 8-warp default runs 1."""
    import types

    from m2la.kernels.latent_decode import triton as decode

    props = types.SimpleNamespace(
        shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048,
        regs_per_multiprocessor=64 * 1024,
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    default = decode.resolve_latent_pieces(decode.decode_config(32, 896, 128, interpret=False), 896)
    assert decode.programs_per_sm(default, 2, torch.device("cpu")) == 1
    overlap = {**default, "BLOCK_H": 16, "num_warps": 4, "BLOCK_N": 32}
    assert decode.programs_per_sm(overlap, 2, torch.device("cpu")) == 2
    props.regs_per_multiprocessor = 32 * 1024  # half the register file: one program of 4 warps
    assert decode.programs_per_sm(overlap, 2, torch.device("cpu")) == 1
    props.regs_per_multiprocessor = 64 * 1024
    # fp8 tiles widen in registers: the 8-warp 32-head r = 256 tile takes 173 registers (ptxas, sm_90),
    # so one program per SM, though its 57 KiB of shared memory would fit three; the chunked 64-head
    # tile (4 warps, 255 registers, 49 KiB) fits twice
    fp8_small = decode.resolve_latent_pieces(decode.decode_config(32, 256, 64, interpret=False, fp8=True), 256)
    assert decode.programs_per_sm(fp8_small, 1, torch.device("cpu")) == 1
    chunked = decode.resolve_latent_pieces(decode.decode_config(64, 128, 64, interpret=False, fp8=True), 128)
    assert decode.programs_per_sm(chunked, 1, torch.device("cpu")) == 2


def test_split_count_fills_whole_waves():
    """The wave model spreads one long sequence over every SM, avoids a nearly empty last wave,
    and never gives a split fewer than one tile."""
    from m2la.kernels.latent_decode.triton import choose_num_splits

    row, partial = 1024, 32 * 448 * 4
    # batch 1, 128K tokens, 132 SMs: one wave of ~132 programs (the old rule stopped at 64)
    one = choose_num_splits(1, 1, 131072, 64, row, partial, 132)
    assert 120 <= one <= 132
    # batch 32: 4 splits fill 128 of 132 slots in one wave; 9 splits would need 3 waves (288 programs)
    assert choose_num_splits(32, 1, 16384, 64, row, partial, 132) == 4
    # more slots than the cache has tiles: at most one split per tile
    assert choose_num_splits(1, 1, 200, 64, row, partial, 132) <= 4
    # the chosen count never costs more than any other under the model, whole waves or not
    for batch in (1, 3, 8, 33, 64):
        splits = choose_num_splits(batch, 1, 32768, 64, row, partial, 264)
        waves = -(-batch * splits // 264)
        assert waves * 264 - batch * splits < 264 * 0.5 or splits == 1, (batch, splits)


@settings(max_examples=300, deadline=None)
@given(a=st.integers(0, 1 << 40), b=st.integers(1, 1 << 20))
def test_host_integer_helpers_match_triton(a, b):
    """The launchers' plain-Python cdiv and next_power_of_2 (triton's cost ~3 us a host call)."""
    import triton

    from m2la.kernels._host import cdiv, next_power_of_2

    assert cdiv(a, b) == triton.cdiv(a, b)
    assert next_power_of_2(b) == triton.next_power_of_2(b) and next_power_of_2(a) == triton.next_power_of_2(a)


def test_split_search_runs_once_per_tile_count():
    """The split count depends on the capacity only through its tile count, and the search is
    cached by tile count: a contiguous cache that grows a row a step (M2LACache's rows) searches
    once per BLOCK_N steps. Keyed on the capacity, it searched every step: up to 4 x 132
    candidates, 6 ms a call on this CI's CPU at 32K. The choices are the ones the search made
    before (2026-11-27), for InternVideo3's layout on 132 SMs."""
    from m2la.kernels.latent_decode import triton as decode

    row, partial = 2048, 32 * 896 * 4
    decode._splits_for_tiles.cache_clear()
    splits = {decode.choose_num_splits(1, 1, capacity, 64, row, partial, 132) for capacity in range(4097, 4097 + 192)}
    assert decode._splits_for_tiles.cache_info().misses == 3  # 65, 66 and 67 tiles
    assert splits == {65, 66, 67}  # one split a tile: 132 slots hold them in one wave
    for batch, capacity, expected in [(1, 4096, 64), (8, 4096, 16), (64, 4096, 2), (1, 32768, 128),
                                      (8, 32768, 16), (64, 32768, 2), (1, 131072, 128)]:  # fmt: skip
        assert decode.choose_num_splits(batch, 1, capacity, 64, row, partial, 132) == expected, (batch, capacity)


def test_tile_plans_are_cached_per_shape_and_override():
    """`decode_plan` returns the cached plan's config as a fresh dict: an override applies to its
    own calls only, and mutating a returned config changes no later call."""
    from m2la.kernels.latent_decode import triton as decode

    q, cache, table, _ = make_case(3, 48, 16, [5, 40], 16, torch.float32, seed=1)
    default, splits = decode.decode_plan(q, cache, 48, table)
    assert default == decode.resolve_latent_pieces(decode.decode_config(3, 48, 16, interpret=True), 48)
    assert splits == min(4, -(-table.shape[1] * 16 // default["BLOCK_N"]))
    override, _ = decode.decode_plan(q, cache, 48, table, config=dict(BLOCK_N=32))
    assert override == {**default, "BLOCK_N": 32}
    override["BLOCK_N"] = 7
    assert decode.decode_plan(q, cache, 48, table)[0] == default
    assert decode.decode_plan(q, cache, 48, table, config=dict(BLOCK_N=32))[0]["BLOCK_N"] == 32
    assert decode.decode_plan(q, cache, 48, table, num_splits=5)[1] == 5


@settings(max_examples=200, deadline=None)
@given(kv_rank=st.integers(1, 4096))
def test_latent_pieces_cover_the_latent_with_the_least_padding(kv_rank):
    """At most 3 power-of-two pieces of at least 16, largest first, covering r; padding only where
    3 pieces cannot be exact, and then less than one next_pow2(r) tile pads."""
    from m2la.kernels.latent_decode.triton import latent_pieces

    pieces = latent_pieces(kv_rank)
    widths = [w for w in pieces if w]
    assert len(pieces) == 3 and pieces[: len(widths)] == tuple(widths)  # zeros only at the end
    assert all(w >= 16 and w & (w - 1) == 0 for w in widths) and list(widths) == sorted(widths, reverse=True)
    assert kv_rank <= sum(widths) <= max(16, 1 << (kv_rank - 1).bit_length())  # never more than next_pow2
    if kv_rank % 16 == 0 and bin(kv_rank).count("1") <= 3:
        assert sum(widths) == kv_rank  # exact wherever three pieces can be
    assert latent_pieces(448) == (256, 128, 64) and latent_pieces(896) == (512, 256, 128)
    assert latent_pieces(512) == (512, 0, 0) and latent_pieces(60) == (32, 16, 16)


def test_resident_only_options_need_the_whole_latent_and_fp8_as_fp16_an_fp8_cache():
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    q, cache, table, lens = make_case(3, 48, 16, [5, 9], 16, torch.float32, seed=1)
    for option in ("TRANSPOSED_KEYS", "FP8_AS_FP16"):
        with pytest.raises(ValueError, match=option):
            latent_decode_triton(q, cache, lens, 0.2, 48, table, config={option: True, "BLOCK_D": 16})
    with pytest.raises(ValueError, match="FP8_AS_FP16 is for fp8 caches"):
        latent_decode_triton(q, cache, lens, 0.2, 48, table, config=dict(FP8_AS_FP16=True, BLOCK_D=64, BLOCK_V=64))


def test_heads_on_n_needs_one_resident_value_tile():
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    q, cache, table, lens = make_case(3, 48, 16, [5], 16, torch.float32)
    with pytest.raises(ValueError, match="HEADS_ON_N"):
        latent_decode_triton(q, cache, lens, 0.2, 48, table, config=dict(HEADS_ON_N=True, BLOCK_D=32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads", [1, 7, 32])
def test_resident_tilings_against_reference(heads, dtype):
    """The transposed tile and latent pieces (heads on N and on M) over the awkward decode cases:
    empty, single-token and odd lengths."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens = [0, 1, 63, 37]
    q, cache, table, lens = make_case(heads, 48, 16, seqlens, 16, dtype, seed=heads + 11)
    configs = (
        dict(HEADS_ON_N=True, BLOCK_D=64, BLOCK_V=64),
        dict(HEADS_ON_N=True, LATENT_PIECES=True),
        dict(HEADS_ON_N=False, LATENT_PIECES=True),
    )
    for config in configs:
        out, lse = latent_decode_triton(q, cache, lens, 0.2, 48, table, num_splits=3, config=config)
        ref_out, ref_lse = decode_attention(q, cache, lens, 0.2, 48, table, backend="reference")
        assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@settings(max_examples=15, deadline=None)
@given(
    heads=st.integers(1, 40),
    kv_rank=st.integers(8, 72),
    rope_half=st.integers(1, 20),
    block_size=st.sampled_from([8, 16, 24, 48]),
    lengths=st.lists(st.integers(0, 130), min_size=1, max_size=4),
    splits=st.integers(0, 9),
    start_frac=st.floats(0.0, 1.0),
    fp8=st.booleans(),
    tiling=st.sampled_from(["default", "heads_on_n", "pieces", "pieces_heads_on_m", "transposed_keys_fp16"]),
    rope_only=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_fp64_over_random_layouts(
    heads, kv_rank, rope_half, block_size, lengths, splits, start_frac, fp8, tiling, rope_only, seed
):
    """Any head count, latent/RoPE width, page size, lengths (0 included), split count (0 = the
    launcher's choice, or more splits than tiles), left padding, fp8 or not, any tiling, a full or a
    RoPE-only query (n = 0 layers): the kernel matches the fp64 oracle over the rows the cache holds
    (NaN in every unused slot)."""
    from kernel_cases import random_quantized_paged_cache

    from m2la.kernels.latent_decode.triton import latent_decode_triton

    width = kv_rank + 2 * rope_half
    kv_start = [int(start_frac * n) for n in lengths]
    if fp8:
        cache, scale, table, _ = random_quantized_paged_cache(lengths, width, block_size, torch.float8_e4m3fn, seed)
        rows = cache.float() * scale[..., None]  # what the fp8 cache holds
    else:
        cache, table = random_paged_cache(lengths, width, block_size, torch.float32, seed=seed)
        scale, rows = None, cache
    q = torch.randn(len(lengths), heads, width, generator=torch.Generator().manual_seed(seed))
    if rope_only:  # the oracle scores the zero latent query; the kernel gets the RoPE query alone
        q[..., :kv_rank] = 0.0
    lens, start = torch.tensor(lengths, dtype=torch.int32), torch.tensor(kv_start, dtype=torch.int32)
    config = {
        "default": None,
        "heads_on_n": dict(HEADS_ON_N=True, BLOCK_D=128, BLOCK_V=128),
        "pieces": dict(HEADS_ON_N=True, LATENT_PIECES=True),
        "pieces_heads_on_m": dict(HEADS_ON_N=False, LATENT_PIECES=True),
        # fp8 tiles widened to fp16 (q in fp16 after a power-of-two shift): fp16's rounding budget
        "transposed_keys_fp16": dict(HEADS_ON_N=False, LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=fp8),
    }[tiling]
    q_kernel = q[..., kv_rank:].contiguous() if rope_only else q
    out, lse = latent_decode_triton(q_kernel, cache, lens, 0.2, kv_rank, table, start, splits, config, kv_scale=scale)
    ref_out, ref_lse = decode_fp64(q, rows, table, lengths, 0.2, kv_rank, kv_start)
    tol = 4e-3 if config and config.get("FP8_AS_FP16") else 3e-5
    assert_close_with_lse(out, lse, ref_out.float(), ref_lse.float(), atol=tol, rtol=tol / 3)
