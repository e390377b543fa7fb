"""grouped_prefill_attention: a grouped layer's chunked prefill (lossless GQA conversions), reference and
Triton (interpreter; flash tiles and the packed split-KV decode route) against a per-group fp64 GQA oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import (
    assert_close_with_lse,
    dense_attention_fp64,
    quantize_cache,
    random_contiguous_cache,
    random_paged_cache,
    rows_of,
)

from m2la.kernels import grouped_prefill_attention, prefill_attention
from m2la.kernels.latent_decode import triton as decode_triton
from m2la.kernels.latent_decode.reference import grouped_query
from m2la.kernels.latent_prefill import triton as prefill_triton

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def grouped_prefill_fp64(q_rope, cache, table, cu, seqlens, scale, kv_rank, groups, kv_start=None, kv_scale=None):
    """Per sequence, head and query, fp64 causal GQA: keys = the head's group's x | y RoPE halves,
    values = its latent slice; keys before kv_start hidden."""
    tokens, heads, width = q_rope.shape
    pairs, group_rank, half = width // 2, kv_rank // groups, groups * width // 2
    outs, lses = [], []
    for seq, length in enumerate(seqlens):
        q_lo, q_hi = int(cu[seq]), int(cu[seq + 1])
        t, first = q_hi - q_lo, 0 if kv_start is None else int(kv_start[seq])
        rows = rows_of(cache, table, seq, length)  # [s, r + 2p]
        if kv_scale is not None:
            rows = rows * rows_of(kv_scale[..., None], table, seq, length)
        key_pos = torch.arange(length)
        query_pos = length - t + torch.arange(t)
        visible = (key_pos[None] <= query_pos[:, None]) & (key_pos[None] >= first)  # [t, s]
        rows = torch.where(visible.any(0)[:, None], rows, 0.0)  # hidden rows may hold NaN
        out, lse = [], []
        for head in range(heads):
            g = head // (heads // groups)
            x = rows[:, kv_rank + g * pairs : kv_rank + (g + 1) * pairs]
            y = rows[:, kv_rank + half + g * pairs : kv_rank + half + (g + 1) * pairs]
            keys, values = torch.cat((x, y), dim=-1), rows[:, g * group_rank : (g + 1) * group_rank]
            o, s = dense_attention_fp64(q_rope[q_lo:q_hi, head][None], keys[None], values[None], scale, visible)
            out.append(o[0])  # [t, r/G]
            lse.append(s[0])  # [t]
        if t:
            outs.append(torch.stack(out, dim=1))
            lses.append(torch.stack(lse, dim=1))
    if not outs:
        return torch.zeros(0, heads, group_rank, dtype=torch.float64), torch.zeros(0, heads, dtype=torch.float64)
    return torch.cat(outs), torch.cat(lses)


def grouped_prefill_case(heads, groups, head_dim, new_lens, cached_lens, dtype, paged=True, kv_start=None, seed=0):
    kv_rank = groups * head_dim
    width = kv_rank + groups * head_dim
    seqlens = [n + c for n, c in zip(new_lens, cached_lens, strict=True)]
    if paged:
        cache, table = random_paged_cache(seqlens, width, 16, dtype, seed=seed)
    else:
        cache, table = random_contiguous_cache(seqlens, width, max(seqlens) + 5, dtype, kv_start, seed=seed), None
    cu = torch.tensor([0] + list(torch.tensor(new_lens).cumsum(0)), dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=gen).to(dtype)
    return q, cache, table, cu, torch.tensor(seqlens, dtype=torch.int32), kv_rank


# (query heads, KV groups, head dim): MHA, GQA, MQA, head dims 48, 60 and 12 (no power of two)
SHAPES = [(1, 1, 16), (3, 3, 16), (8, 2, 12), (9, 3, 48), (6, 2, 60), (16, 1, 32), (63, 7, 16)]
# new tokens and cached prefix per sequence: an empty chunk, one token, 63 tokens, a prefix that is
# no multiple of the 16-row page or tile
NEW, CACHED = [5, 0, 1, 63, 20], [0, 7, 40, 0, 37]


@pytest.mark.parametrize("heads,groups,head_dim", SHAPES)
def test_reference_matches_fp64_gqa(heads, groups, head_dim):
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(heads, groups, head_dim, NEW, CACHED, torch.float32)
    out, lse = grouped_prefill_attention(q, cache, cu, lens, 0.2, kv_rank, groups, table, backend="reference")
    ref_out, ref_lse = grouped_prefill_fp64(q, cache, table, cu, lens.tolist(), 0.2, kv_rank, groups)
    assert out.shape == (sum(NEW), heads, head_dim) and lse.shape == (sum(NEW), heads)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-5)


def test_grouped_is_the_plain_prefill_on_the_groups_columns():
    """The plain prefill with each head's query at its group's RoPE columns (no nope key) and the
    identity value map gives the same LSE, and its output on the head's group slice is the grouped one."""
    heads, groups, head_dim = 8, 2, 12
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(heads, groups, head_dim, [4, 9], [6, 0], torch.float32)
    out, lse = grouped_prefill_attention(q, cache, cu, lens, 0.3, kv_rank, groups, table, backend="reference")
    placed = grouped_query(q, kv_rank, groups)[..., kv_rank:]
    identity = torch.eye(kv_rank).expand(heads, kv_rank, kv_rank)
    plain, plain_lse = prefill_attention(
        q[..., :0], placed, cache, torch.zeros(heads, kv_rank, 0), identity, cu, lens, 0.3, table, backend="reference"
    )
    group = torch.arange(heads) // (heads // groups)
    torch.testing.assert_close(plain.view(-1, heads, groups, head_dim)[:, torch.arange(heads), group], out)
    torch.testing.assert_close(plain_lse, lse)


@pytest.mark.parametrize("mode", ["flash", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads,groups,head_dim", SHAPES)
def test_triton_matches_fp64(heads, groups, head_dim, dtype, mode):
    """Paged (permuted table, NaN in unused slots), both Triton modes; the decode route (slow under the
    interpreter: up to one query block a token for many heads a group) with shorter chunks."""
    new = NEW if mode == "flash" else [3, 0, 1, 13, 2]
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(heads, groups, head_dim, new, CACHED, dtype)
    out, lse = grouped_prefill_attention(q, cache, cu, lens, 0.2, kv_rank, groups, table, mode=mode, backend="triton")
    ref_out, ref_lse = grouped_prefill_fp64(q.double(), cache, table, cu, lens.tolist(), 0.2, kv_rank, groups)
    assert out.dtype == dtype
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype])


@pytest.mark.parametrize("mode", ["flash", "decode"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_triton_kv_start_and_layouts(paged, mode):
    """Left padding (kv_start; one sequence sees nothing, one's padding reaches into its chunk) over a
    paged or a contiguous cache whose hidden rows hold NaN."""
    new, cached, starts = [6, 3, 30], [64, 0, 3], [5, 3, 10]
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(
        6, 3, 16, new, cached, torch.float32, paged=paged, kv_start=starts, seed=3
    )
    kv_start = torch.tensor(starts, dtype=torch.int32)
    if paged:  # poison the hidden rows before kv_start as well
        for seq, first in enumerate(starts):
            for pos in range(first):
                cache[table[seq, pos // 16], pos % 16] = float("nan")
    out, lse = grouped_prefill_attention(
        q, cache, cu, lens, 0.2, kv_rank, 3, table, kv_start, mode=mode, backend="triton"
    )
    ref_out, ref_lse = grouped_prefill_fp64(q, cache, table, cu, lens.tolist(), 0.2, kv_rank, 3, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)


@pytest.mark.parametrize("mode", ["flash", "decode"])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_triton_fp8_cache(fp8_dtype, mode):
    """An fp8 cache with one scale per token slot, read as stored: both backends match the oracle on
    the dequantized rows."""
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(8, 2, 16, [9, 1, 17], [31, 40, 0], torch.float32, seed=5)
    codes, scales = quantize_cache(cache, fp8_dtype)
    ref_out, ref_lse = grouped_prefill_fp64(q, codes.float(), table, cu, lens.tolist(), 0.2, kv_rank, 2, None, scales)
    for backend in ("reference", "triton"):
        out, lse = grouped_prefill_attention(
            q, codes, cu, lens, 0.2, kv_rank, 2, table, kv_scale=scales, mode=mode, backend=backend
        )
        assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
def test_flash_tiles_match_fp64(block_m, block_n):
    """Query and key tiles of other sizes (the tile regions: masked head, unmasked middle, diagonal)."""
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(9, 3, 12, [45, 7], [19, 70], torch.float32, seed=7)
    out, lse = prefill_triton.grouped_prefill_triton(
        q, cache, cu, lens, 0.2, kv_rank, 3, table, mode="flash", config=dict(BLOCK_M=block_m, BLOCK_N=block_n)
    )
    ref_out, ref_lse = grouped_prefill_fp64(q, cache, table, cu, lens.tolist(), 0.2, kv_rank, 3)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)


def test_mode_rule():
    """Decode route while a chunk fits two packed query blocks of 64 rows // (h/G) tokens."""
    choose = prefill_triton.choose_grouped_prefill_mode
    assert choose(8 * 32, 8, 4) == "decode" and choose(8 * 33, 8, 4) == "flash"  # 8 x 128 GQA: 16-token blocks
    assert choose(18, 1, 7) == "decode" and choose(19, 1, 7) == "flash"  # 7 heads a group: 9-token blocks
    assert choose(128, 1, 1) == "decode" and choose(129, 1, 1) == "flash"  # MHA: 64-token blocks
    assert choose(3 * 42, 3, 3) == "decode" and choose(3 * 43, 3, 3) == "flash"  # SmolLM2: 21-token blocks
    assert choose(2, 1, 100) == "decode" and choose(3, 1, 100) == "flash"  # more heads a group than rows
    assert choose(9, 2, 3) == "decode"  # ragged: 5 tokens a sequence, rounded up


@pytest.mark.parametrize("block_h", [16, 32, 64])
def test_packed_decode_blocks_match_fp64(block_h, poisoned_partials):
    """The decode route packs T = BLOCK_H // (h/G) tokens of one chunk with the group's heads on the
    MMA rows (3 heads a group: 1-4 rows of every tile left over). Chunks of T - 1, T, T + 1 and 2T + 1
    tokens straddle the blocks; in the later splits a block's early rows see no key at all, so they
    write only their LSE, and the partial buffers start as NaN."""
    tokens = block_h // 3
    new, cached = [tokens - 1, tokens, tokens + 1, 2 * tokens + 1, 0, 1], [0, 17, 40, 3, 5, 70]
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(9, 3, 12, new, cached, torch.float32, seed=11)
    out, lse = prefill_triton.grouped_prefill_triton(
        q, cache, cu, lens, 0.2, kv_rank, 3, table, mode="decode", config=dict(BLOCK_H=block_h)
    )
    ref_out, ref_lse = grouped_prefill_fp64(q, cache, table, cu, lens.tolist(), 0.2, kv_rank, 3)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)
    ((part_out, part_lse),) = poisoned_partials
    assert part_lse.shape == (sum(new), 9, part_lse.shape[-1]) and part_lse.shape[-1] > 1
    assert not part_lse.isnan().any()  # every row of every split wrote its LSE
    assert (part_lse == float("-inf")).any()  # and some saw nothing


@settings(max_examples=15, deadline=None)
@given(
    heads_per_group=st.integers(1, 9),
    groups=st.integers(1, 4),
    pairs=st.integers(1, 20),
    block_size=st.sampled_from([8, 16, 24]),
    chunks=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 60)), min_size=1, max_size=4),
    start_frac=st.floats(0.0, 1.0),
    block_h=st.sampled_from([16, 32, 64]),
    splits=st.integers(0, 6),
    fp8=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_decode_matches_fp64_over_random_layouts(
    heads_per_group, groups, pairs, block_size, chunks, start_frac, block_h, splits, fp8, seed
):
    """Any heads a group and group count, pair count, page size, chunk and prefix lengths (0 included),
    left padding (reaching into the chunk), packed rows, split count (0 = the launcher's) and fp8 or
    not: the packed grouped decode matches the fp64 oracle over a NaN-poisoned paged cache."""
    heads, head_dim = heads_per_group * groups, 2 * pairs
    block_h = max(block_h, 16 * -(-heads_per_group // 16))  # a group's heads at least
    new = [n for n, _ in chunks]
    seqlens = [n + c for n, c in chunks]
    kv_rank = groups * head_dim
    cache, table = random_paged_cache(seqlens, 2 * kv_rank, block_size, torch.float32, seed=seed)
    scale = None
    if fp8:
        cache, scale = quantize_cache(cache, torch.float8_e4m3fn)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    lens = torch.tensor(seqlens, dtype=torch.int32)
    kv_start = torch.tensor([int(start_frac * n) for n in seqlens], dtype=torch.int32)
    out, lse = decode_triton.grouped_decode_triton(
        q, cache, lens, 0.2, kv_rank, groups, table, kv_start, splits, dict(BLOCK_H=block_h), scale,
        cu_seqlens_q=cu, max_seqlen_q=max(1, max(new)),
    )  # fmt: skip
    rows = cache.float() if fp8 else cache
    ref_out, ref_lse = grouped_prefill_fp64(q, rows, table, cu, seqlens, 0.2, kv_rank, groups, kv_start, scale)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-4 if fp8 else 3e-5, rtol=1e-4)


def test_packed_decode_config_and_errors():
    """Rows for the tokens a sequence times a group's heads, 16 to 64 (the interpreter: 16)."""
    config = decode_triton.grouped_decode_config
    assert config(4, 128, 64, interpret=False)["BLOCK_H"] == 16  # one token: a group's heads
    assert config(4, 128, 64, interpret=False, tokens_per_seq=3)["BLOCK_H"] == 16
    assert config(4, 128, 64, interpret=False, tokens_per_seq=5)["BLOCK_H"] == 32
    assert config(4, 128, 64, interpret=False, tokens_per_seq=40)["BLOCK_H"] == 64
    assert config(3, 64, 32, interpret=True, tokens_per_seq=40)["BLOCK_H"] == 16
    assert config(100, 64, 32, interpret=False, tokens_per_seq=40)["BLOCK_H"] == 128  # a group's heads at least
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(6, 3, 16, [5, 9], [3, 0], torch.float32)
    with pytest.raises(ValueError, match="max_seqlen_q > 0"):
        decode_triton.grouped_decode_triton(q, cache, lens, 0.2, kv_rank, 3, table, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="BLOCK_H=16 holds fewer rows than a group's 32 heads"):
        decode_triton.grouped_decode_triton(q.repeat(1, 16, 1), cache, lens, 0.2, kv_rank, 3, table,
                                            config=dict(BLOCK_H=16))  # fmt: skip


@pytest.mark.parametrize("mode", ["flash", "decode"])
def test_triton_modes_are_sync_free_with_max_seqlen_q(monkeypatch, mode):
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(6, 3, 16, [5, 9], [3, 0], torch.float32)

    def no_host_reads(self, *args, **kwargs):
        raise AssertionError(f"the {mode} path read a tensor on the host")

    monkeypatch.setattr(torch.Tensor, "item", no_host_reads)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_reads)
    prefill_triton.grouped_prefill_triton(q, cache, cu, lens, 0.2, kv_rank, 3, table, max_seqlen_q=9, mode=mode)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_arguments_name_the_problem(backend):
    q, cache, table, cu, lens, kv_rank = grouped_prefill_case(6, 3, 16, [5, 9], [3, 0], torch.float32)
    call = dict(q_rope=q, kv_cache=cache, cu_seqlens_q=cu, cache_seqlens=lens, softmax_scale=0.2, kv_rank=kv_rank,
                head_groups=3, block_table=table, backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match="head_groups=4 must divide the 6 query heads"):
        grouped_prefill_attention(**{**call, "head_groups": 4})
    with pytest.raises(ValueError, match="kv_cache must be 3-d with rows of r"):
        grouped_prefill_attention(**{**call, "head_groups": 2})
    with pytest.raises(ValueError, match=r"expected q_rope \[tq, h, 2P\]"):
        grouped_prefill_attention(**{**call, "q_rope": q[..., :15]})
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        grouped_prefill_attention(**{**call, "cu_seqlens_q": cu.long()})
    with pytest.raises(ValueError, match="mode must be"):
        grouped_prefill_attention(**{**call, "mode": "expanded"})
    if backend == "reference":  # values are read where that is free (the Triton path never reads them)
        with pytest.raises(ValueError, match="cache_seqlens must count each new chunk"):
            grouped_prefill_attention(**{**call, "cache_seqlens": torch.tensor([3, 3], dtype=torch.int32)})
