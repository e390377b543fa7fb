"""prefill_attention: reference vs fp64 absorbed attention, Triton (both modes) vs reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assert_close_with_lse, dense_attention_fp64, random_paged_cache, rows_of

from m2la.kernels import prefill_attention
from m2la.kernels.latent_prefill.triton import choose_prefill_mode

TOL = {torch.float32: 5e-5, torch.float16: 2e-2}


def make_case(heads, kv_rank, rope_dim, nope_dim, value_dim, new_lens, cached_lens, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqlens = [c + t for c, t in zip(cached_lens, new_lens, strict=True)]
    cache, table = random_paged_cache(seqlens, kv_rank + rope_dim, block_size, dtype, seed=seed)
    tokens = sum(new_lens)
    q_nope = torch.randn(tokens, heads, nope_dim, generator=gen).to(dtype)
    q_rope = torch.randn(tokens, heads, rope_dim, generator=gen).to(dtype)
    w_uk = (torch.randn(heads, kv_rank, nope_dim, generator=gen) / kv_rank**0.5).to(dtype)
    w_uv = (torch.randn(heads, kv_rank, value_dim, generator=gen) / kv_rank**0.5).to(dtype)
    cu = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q_nope, q_rope, cache, w_uk, w_uv, cu, torch.tensor(seqlens, dtype=torch.int32), table


def prefill_fp64_absorbed(q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, scale, table, kv_start=None):
    """Absorbed route in fp64 (q_lat = q_nope W_uk^T, MQA over the latent, then W_uv): a different
    computation from the reference's expanded one, so the two checking each other means something."""
    kv_rank = w_uk.shape[1]
    outs, lses = [], []
    for seq, length in enumerate(seqlens.tolist()):
        lo, hi = int(cu[seq]), int(cu[seq + 1])
        rows = rows_of(cache, table, seq, length)  # [s, r+2p]
        q_lat = torch.einsum("thn,hrn->htr", q_nope[lo:hi].double(), w_uk.double())
        q = torch.cat([q_lat, q_rope[lo:hi].double().transpose(0, 1)], dim=-1)  # [h, t, r+2p]
        pos = length - (hi - lo) + torch.arange(hi - lo)
        first = 0 if kv_start is None else kv_start[seq]
        rows = rows.clone()
        rows[:first] = 0.0  # hidden (possibly NaN) rows: masked below, zeroed so 0 * NaN cannot leak
        visible = (torch.arange(length)[None, :] <= pos[:, None]) & (torch.arange(length)[None, :] >= first)  # [t, s]
        out_lat, lse = dense_attention_fp64(q, rows[None], rows[None, :, :kv_rank], scale, visible)
        outs.append(torch.einsum("htr,hrv->thv", out_lat, w_uv.double()))
        lses.append(lse.T)
    return torch.cat(outs), torch.cat(lses)


SHAPES = {  # kv_rank, rope_dim, nope_dim, value_dim
    "r48": (48, 16, 16, 24),
    "r96": (96, 32, 32, 32),
    "lossless-n0": (32, 32, 0, 16),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_fp64_absorbed(shape):
    case = make_case(3, *SHAPES[shape], [1, 0, 20], [0, 30, 43], 16, torch.float32)
    out, lse = prefill_attention(*case[:7], 0.15, case[7], backend="reference")
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7])
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
@pytest.mark.parametrize("heads,shape", [(1, "r48"), (3, "r96"), (16, "r48"), (3, "lossless-n0")])
def test_triton_matches_reference(heads, shape, mode, dtype):
    # first sequence: prefill from empty; second: no new tokens; third: extend a 43-token prefix
    case = make_case(heads, *SHAPES[shape], [17, 0, 20], [0, 30, 43], 16, dtype, seed=heads)
    out, lse = prefill_attention(*case[:7], 0.15, case[7], mode=mode, backend="triton")
    ref_out, ref_lse = prefill_attention(*case[:7], 0.15, case[7], backend="reference")
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_63_heads_contiguous_cache():
    q_nope, q_rope, paged, w_uk, w_uv, cu, seqlens, table = make_case(
        63, 48, 16, 16, 16, [3, 2], [5, 0], 16, torch.float32
    )
    # The same rows laid out contiguously [b, s_max, r+2p].
    dense = torch.stack([torch.nn.functional.pad(rows_of(paged, table, s, 8).float(), (0, 0, 0, 4)) for s in (0, 1)])
    for mode in ("decode", "absorbed", "expanded"):
        out, lse = prefill_attention(q_nope, q_rope, dense, w_uk, w_uv, cu, seqlens, 0.2, mode=mode, backend="triton")
        ref_out, ref_lse = prefill_fp64_absorbed(q_nope, q_rope, paged, w_uk, w_uv, cu, seqlens, 0.2, table)
        assert_close_with_lse(out, lse, ref_out.float(), ref_lse.float(), atol=5e-5)


def test_mode_rule():
    # InternVideo3 (r=896, n=v=128, rope 128): expanded above 229376 / 4416 = 51.9 tokens a sequence
    assert choose_prefill_mode(1, 1, 896, 128, 128, 128) == "decode"
    assert choose_prefill_mode(51 * 8, 8, 896, 128, 128, 128) == "decode"
    assert choose_prefill_mode(52 * 8, 8, 896, 128, 128, 128) == "expanded"
    assert choose_prefill_mode(4096, 1, 896, 128, 128, 128) == "expanded"
    # 448 + 64 (4x): 114688 / 2080 = 55.1
    assert choose_prefill_mode(55, 1, 448, 128, 128, 64) == "decode"
    assert choose_prefill_mode(56, 1, 448, 128, 128, 64) == "expanded"
    assert choose_prefill_mode(10**6, 1, 16, 128, 128) == "decode"  # 2c r <= n + v: never expand
    # n = 0 (a lossless 8 x 128 layer fine-tuned out of its grouped form): RoPE-only queries score 2p,
    # not r + 2p, so the decode route holds longer: 131072 / (2.5 * 2048 - 1152) = 33.0 tokens
    assert choose_prefill_mode(33, 1, 1024, 0, 128, 1024) == "decode"
    assert choose_prefill_mode(34, 1, 1024, 0, 128, 1024) == "expanded"


KV_START = [3, 0, 50]  # hides padding keys; in the third sequence the first 7 new queries see nothing


def poison_hidden_rows(cache, table, block_size=16):
    """NaN in every cache row before its sequence's kv_start: such rows must never reach the result."""
    for seq, first in enumerate(KV_START):
        for pos in range(first):
            cache[table[seq, pos // block_size], pos % block_size] = float("nan")


@pytest.mark.parametrize("shape", ["r48", "lossless-n0"])
def test_reference_kv_start_matches_fp64(shape):
    case = make_case(3, *SHAPES[shape], [17, 0, 20], [0, 30, 43], 16, torch.float32, seed=7)
    start = torch.tensor(KV_START, dtype=torch.int32)
    table = case[7]
    poison_hidden_rows(case[2], table)
    out, lse = prefill_attention(*case[:7], 0.15, table, start, backend="reference")
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, table, KV_START)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-5)
    assert torch.isinf(lse[17 + 0 : 17 + 7]).all() and (out[17:24] == 0).all()  # queries at 43..49 see nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
def test_triton_kv_start_matches_reference(mode, dtype):
    case = make_case(3, *SHAPES["r48"], [17, 0, 20], [0, 30, 43], 16, dtype, seed=9)
    start = torch.tensor(KV_START, dtype=torch.int32)
    table = case[7]
    poison_hidden_rows(case[2], table)
    out, lse = prefill_attention(*case[:7], 0.15, table, start, mode=mode, backend="triton")
    ref_out, ref_lse = prefill_attention(*case[:7], 0.15, table, start, backend="reference")
    assert torch.isfinite(out).all()
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
@pytest.mark.parametrize(
    "config", [dict(BLOCK_M=32, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, num_warps=8)], ids=["m32", "d16"]
)
def test_triton_config_override_matches_fp64(config, mode):
    """`config=` (the tuning sweep's tile overrides) changes tiling only, never the result."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    case = make_case(3, *SHAPES["r96"], [17, 0, 45], [0, 30, 43], 16, torch.float32, seed=9)
    out, lse = latent_prefill_triton(*case[:7], 0.15, case[7], mode=mode, config=config)
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7])
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


@pytest.mark.parametrize("head_group,mode", [(1, "expanded"), (4, "expanded"), (4, "absorbed"), (50, "absorbed")])
def test_launch_groups_of_head_tiles_match_fp64(head_group, mode):
    """Launch order: groups of `HEAD_GROUP` head tiles (5 heads x 3 value tiles = 15), query tiles
    last-first inside a group; 4 leaves a short last group, 50 is more than there are. Every
    (query tile, head, value tile) must run exactly once (a distinct seed per case, so a program
    never run cannot pass on a freed buffer's old result)."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    case = make_case(5, 48, 16, 16, 40, [33, 0, 20], [0, 30, 43], 16, torch.float32, seed=100 + head_group)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_V=16, HEAD_GROUP=head_group)
    out, lse = latent_prefill_triton(*case[:7], 0.15, case[7], mode=mode, config=config)
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7])
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


def test_head_group_keeps_a_group_of_keys_within_the_l2_budget():
    from m2la.kernels.latent_prefill.triton import PREFILL_L2_BYTES, prefill_head_group

    per_head = 4096 * 256 * 2  # 4K keys, n + v = 256, bf16: 2 MiB a head
    assert prefill_head_group(32, per_head) == PREFILL_L2_BYTES // per_head
    assert prefill_head_group(32, 20480 * 256 * 2) == 2  # a 16K prefix
    assert prefill_head_group(32, 10**9) == 1  # never 0
    assert prefill_head_group(3, 1) == 3  # never more than there are
    assert prefill_head_group(32, 0) == 32  # absorbed: every head reads the same rows


@pytest.mark.parametrize("weight_layout", ["h r n", "h n r", "kv_b_proj"])
def test_expand_cache_prefix_matches_fp64_per_head_projections(weight_layout):
    """One GEMM over [W_uk | W_uv] gives each head's keys and values, as strided views; weights
    stored row-major as [h, r, n] or as [h, n, r] and passed as [h, r, n] views, or (converted
    models) views of one [h, n + v, r] weight, which is the GEMM's matrix already: no copy."""
    from m2la.kernels.latent_prefill.triton import expand_cache_prefix, expansion_weight

    q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, table = make_case(
        3, 48, 16, 16, 24, [5, 2], [58, 0], 16, torch.float32
    )
    if weight_layout == "h n r":
        w_uk, w_uv = w_uk.mT.contiguous().mT, w_uv.mT.contiguous().mT
        assert expansion_weight(w_uk, w_uv, torch.float32).stride() == (1, 48)  # [h, n+v, r] read as B^T
    elif weight_layout == "kv_b_proj":  # M2LAttention.up_projections' views, transposed as _attend_fused passes them
        kv_b = torch.cat((w_uk.mT, w_uv.mT), dim=1).flatten(0, 1)  # [h (n + v), r], an nn.Linear weight
        w_uk, w_uv = kv_b.unflatten(0, (3, 40))[:, :16].mT, kv_b.unflatten(0, (3, 40))[:, 16:].mT
        weight = expansion_weight(w_uk, w_uv, torch.float32)
        assert weight.data_ptr() == kv_b.data_ptr() and torch.equal(weight, kv_b.t())
        assert expansion_weight(w_uk, w_uv, torch.float64).data_ptr() != kv_b.data_ptr()  # another dtype: a copy
        assert expansion_weight(w_uk[1:], w_uv[:2], torch.float32).data_ptr() != kv_b.data_ptr()  # not one weight
    else:
        assert expansion_weight(w_uk, w_uv, torch.float32).stride() == (3 * 40, 1)
    k_nope, k_rope, values = expand_cache_prefix(cache, w_uk, w_uv, table, 2, 63, torch.float32)
    assert k_nope.shape == (2, 63, 3, 16) and values.shape == (2, 63, 3, 24) and k_rope.shape == (2, 63, 16)
    for seq, length in enumerate(seqlens.tolist()):
        rows = rows_of(cache, table, seq, length).double()  # [s, r+2p]
        want_k = torch.einsum("sr,hrn->shn", rows[:, :48], w_uk.double())
        want_v = torch.einsum("sr,hrv->shv", rows[:, :48], w_uv.double())
        torch.testing.assert_close(k_nope[seq, :length].double(), want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[seq, :length].double(), want_v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_rope[seq, :length].double(), rows[:, 48:])


def test_expanded_attention_without_max_seqlen_q_is_an_error():
    from m2la.kernels.latent_prefill.triton import expanded_prefill_attention

    q = torch.zeros(4, 2, 16)
    kv = torch.zeros(1, 4, 2, 16)
    lens = torch.tensor([4], dtype=torch.int32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        expanded_prefill_attention(q, q, kv, kv[:, :, 0], kv, cu, lens, 0.1, max_seqlen_q=0)


@settings(max_examples=12, deadline=None)
@given(
    new_len=st.integers(1, 40),
    cached=st.integers(0, 50),
    start_frac=st.floats(0.0, 1.0),
    block_m=st.sampled_from([16, 32]),
    block_n=st.sampled_from([16, 32]),
    mode=st.sampled_from(["absorbed", "expanded"]),
)
def test_key_tile_regions_match_fp64(new_len, cached, start_frac, block_m, block_n, mode):
    """The kernel splits each query tile's keys into a masked tile holding kv_start, unmasked tiles
    every query sees, and masked tiles at the causal diagonal; any split must give the oracle's result
    (hidden rows hold NaN)."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    total = cached + new_len
    first = int(start_frac * total)
    case = make_case(2, *SHAPES["r48"], [new_len, 3], [cached, 5], 16, torch.float32, seed=new_len + cached)
    kv_start = [first, 1]
    for seq, hidden in enumerate(kv_start):
        for pos in range(hidden):
            case[2][case[7][seq, pos // 16], pos % 16] = float("nan")
    start = torch.tensor(kv_start, dtype=torch.int32)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    out, lse = latent_prefill_triton(*case[:7], 0.15, case[7], mode=mode, kv_start=start, config=config)
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7], kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


@settings(max_examples=10, deadline=None)
@given(
    new_lens=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    cached=st.lists(st.integers(0, 70), min_size=3, max_size=3),
    start_frac=st.floats(0.0, 1.0),
    contiguous=st.booleans(),
    packed=st.booleans(),
    shape=st.sampled_from(["r48", "lossless-n0"]),
)
def test_decode_route_matches_fp64(new_lens, cached, start_frac, contiguous, packed, shape):
    """The decode route (one split-KV decode per query token, or with `max_seqlen_q` given packed
    blocks of tokens x the 3 heads): each token sees its own causal prefix, hidden rows before
    kv_start hold NaN, empty chunks and a contiguous cache included; n = 0 layers send RoPE-only
    queries."""
    cached = cached[: len(new_lens)]
    case = make_case(3, *SHAPES[shape], new_lens, cached, 16, torch.float32, seed=sum(new_lens) + sum(cached))
    q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, table = case
    kv_start = [int(start_frac * length) for length in seqlens.tolist()]
    for seq, hidden in enumerate(kv_start):
        for pos in range(hidden):
            cache[table[seq, pos // 16], pos % 16] = float("nan")
    start = torch.tensor(kv_start, dtype=torch.int32)
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, table, kv_start)
    if contiguous:  # [b, s_max + 5, r+2p]; rows past a sequence's end hold NaN
        s_max = int(seqlens.max()) + 5
        pad = [s_max - length for length in seqlens.tolist()]
        rows = [rows_of(cache, table, s, length).float() for s, length in enumerate(seqlens.tolist())]
        cache = torch.stack(
            [torch.nn.functional.pad(r, (0, 0, 0, p), value=float("nan")) for r, p in zip(rows, pad, strict=True)]
        )
        table = None
    out, lse = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, 0.15, table, start,
                                 mode="decode", max_seqlen_q=max(new_lens) if packed else 0,
                                 backend="triton")  # fmt: skip
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
def test_triton_with_max_seqlens_never_syncs(mode, monkeypatch):
    """Given max_seqlen_q and max_seqlen_k (here past the longest sequence, as an engine passes its
    capacity), the Triton path reads no tensor value on the host, so it can be captured in a CUDA
    graph, and gives the oracle's result."""
    case = make_case(3, *SHAPES["r96"], [17, 0, 20], [0, 30, 43], 16, torch.float32, seed=4)
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7])

    def no_host_reads(self, *args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__int__", "__bool__", "__index__"):
            patch.setattr(torch.Tensor, name, no_host_reads)
        out, lse = prefill_attention(
            *case[:7], 0.15, case[7], mode=mode, max_seqlen_q=20, max_seqlen_k=80, backend="triton"
        )
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


@pytest.mark.parametrize("paged", [True, False])
def test_one_token_a_sequence_decodes_without_the_per_token_gather(paged, monkeypatch):
    """Every chunk one token (`max_seqlen_q=1`, as many tokens as sequences): the decode route runs
    one decode of the batch, skipping the per-token index build (host launches on a GPU); same
    result as the fp64 oracle, kv_start and an empty sequence included."""
    case = list(make_case(3, *SHAPES["r48"], [1, 1, 1], [20, 0, 9], 8, torch.float32, seed=6))
    kv_start = torch.tensor([5, 1, 0], dtype=torch.int32)  # sequence 1: its one row hidden
    if not paged:  # the same rows as a contiguous [b, s, w] cache
        case[2] = torch.stack([rows_of(case[2], case[7], i, 24).float() for i in range(3)])
        case[7] = None
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7], kv_start.tolist())
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: pytest.fail("per-token gather built"))
    out, lse = prefill_attention(
        *case[:7], 0.15, case[7], kv_start, mode="decode", max_seqlen_q=1, max_seqlen_k=24, backend="triton"
    )
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


def test_max_seqlen_k_shorter_than_a_sequence_is_an_error():
    case = make_case(2, *SHAPES["r48"], [5, 3], [10, 20], 16, torch.float32)
    with pytest.raises(RuntimeError, match="max_seqlen_k=22 < the longest cache_seqlens"):
        prefill_attention(*case[:7], 0.15, case[7], mode="expanded", max_seqlen_k=22, backend="triton")


def test_prefill_tiles_shrink_only_where_shared_memory_would_not_fit():
    """The measured layouts keep their H100 defaults; a lossless GQA conversion's wide RoPE keys
    (2p = 512: 368 KiB at the defaults, an OutOfResources launch on an H100) get smaller tiles
    whose estimate fits. The estimate matched the sm_90 compile on these shapes (compile_sm90.py)."""
    from m2la.kernels.latent_prefill.triton import PREFILL_SHARED_BUDGET, prefill_config, prefill_shared_bytes

    tiles = ("BLOCK_M", "BLOCK_N", "num_stages", "num_warps")
    for nope, rope in ((128, 128), (128, 64), (896, 128), (448, 64)):  # expanded and absorbed modes
        cfg = prefill_config(128, False, nope, rope)
        expected = (128, 64, 3, 8) if nope == 128 else (64, 64, 2, 4)
        assert tuple(cfg[k] for k in tiles) == expected
    assert prefill_shared_bytes(prefill_config(128, False, 128, 128), 128, 128) == 208 * 1024  # sm_90: 212992 B
    wide = prefill_config(128, False, 0, 512)
    assert prefill_shared_bytes(dict(wide, BLOCK_M=128, BLOCK_N=64, num_stages=3), 0, 512) == 368 * 1024
    assert tuple(wide[k] for k in tiles) == (128, 32, 2, 8)
    widest = prefill_config(128, False, 0, 1024)
    assert tuple(widest[k] for k in tiles) == (64, 32, 1, 4)
    for cfg, rope in ((wide, 512), (widest, 1024)):
        assert prefill_shared_bytes(cfg, 0, rope) <= PREFILL_SHARED_BUDGET
    assert prefill_config(128, True, 0, 1024)["BLOCK_M"] == 16  # the interpreter's tiles are untouched


def test_prefill_launch_retries_smaller_tiles_when_shared_memory_runs_out(monkeypatch):
    """A shape the estimate misjudges still launches: each OutOfResources steps to the next smaller
    tiles, and the tiles that launched are reused for that shape. A caller's explicit tiles are
    never changed."""
    from triton.runtime.errors import OutOfResources

    from m2la.kernels.latent_prefill import triton as prefill

    monkeypatch.setattr(prefill, "_PREFILL_TILES_THAT_FIT", {})
    tried = []

    def launch(cfg):  # "fits" only at 64 x 32 x 2 or smaller
        tried.append((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"], cfg["num_warps"]))
        if cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["num_stages"] > 64 * 32 * 2:
            raise OutOfResources(300_000, 232_448, "shared memory")

    default = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, BLOCK_V=128, num_warps=8, num_stages=3)
    prefill.launch_fitting_tiles(launch, default, True, "shape")
    assert tried == [(128, 64, 3, 8), (128, 64, 2, 8), (128, 32, 2, 8), (64, 32, 2, 4)]  # never larger in any entry
    tried.clear()
    prefill.launch_fitting_tiles(launch, default, True, "shape")  # remembered: one launch
    assert tried == [(64, 32, 2, 4)]
    with pytest.raises(OutOfResources):
        prefill.launch_fitting_tiles(launch, default, False, "explicit tiles")
    tried.clear()
    with pytest.raises(OutOfResources):  # nothing smaller than the smallest
        prefill.launch_fitting_tiles(lambda cfg: launch(dict(cfg, BLOCK_M=1024)), default, True, "never fits")


def contiguous_poisoned(cache, table, seqlens, kv_start, extra_rows=5):
    """The paged rows laid out `[b, s_max + extra_rows, r + 2p]`, NaN before each kv_start and past
    each sequence's end: rows a TMA tile must never let through."""
    s_max = int(seqlens.max()) + extra_rows
    dense = torch.full((len(seqlens), s_max, cache.shape[-1]), float("nan"), dtype=cache.dtype)
    for seq, length in enumerate(seqlens.tolist()):
        dense[seq, :length] = rows_of(cache, table, seq, length)
        dense[seq, : kv_start[seq]] = float("nan")
    return dense


@settings(max_examples=10, deadline=None)
@given(
    new_lens=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    cached=st.lists(st.integers(0, 50), min_size=3, max_size=3),
    start_frac=st.floats(0.0, 1.0),
    block_n=st.sampled_from([16, 32]),
    mode=st.sampled_from(["absorbed", "expanded"]),
    value_tiles=st.sampled_from([1, 2]),
)
def test_tma_prefill_tiles_match_fp64(new_lens, cached, start_frac, block_n, mode, value_tiles):
    """TMA tiles (`config=dict(TMA=True)`): keys and values load through descriptors over each
    sequence's rows [kv_start, seqlen), which read rows outside as zeros; NaN there (before kv_start,
    past the end) must not reach the result, in all three key-tile regions and both modes."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    cached = cached[: len(new_lens)]
    case = make_case(3, *SHAPES["r48"], new_lens, cached, 16, torch.float32, seed=sum(new_lens) * 7 + sum(cached))
    q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, table = case
    kv_start = [int(start_frac * length) for length in seqlens.tolist()]
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, table, kv_start)
    dense = contiguous_poisoned(cache, table, seqlens, kv_start)
    config = dict(TMA=True, BLOCK_N=block_n, BLOCK_D=64, BLOCK_V=32 // value_tiles)
    start = torch.tensor(kv_start, dtype=torch.int32)
    out, lse = latent_prefill_triton(q_nope, q_rope, dense, w_uk, w_uv, cu, seqlens, 0.15, None, mode=mode,
                                     kv_start=start, config=config)  # fmt: skip
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_tma_prefill_tiles_fp16(mode):
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    case = make_case(5, *SHAPES["r48"], [33, 0, 20], [0, 30, 43], 16, torch.float16, seed=31)
    q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, table = case
    kv_start = [0, 4, 17]
    dense = contiguous_poisoned(cache, table, seqlens, kv_start)
    start = torch.tensor(kv_start, dtype=torch.int32)
    args = (q_nope, q_rope, dense, w_uk, w_uv, cu, seqlens, 0.15, None)
    out, lse = latent_prefill_triton(*args, mode=mode, kv_start=start, config=dict(TMA=True, BLOCK_D=64))
    ref_out, ref_lse = latent_prefill_triton(*args, mode=mode, kv_start=start, config=dict(BLOCK_D=64))
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-3, rtol=2e-3)


def test_tma_prefill_tiles_refuse_what_they_cannot_read():
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    case = make_case(3, *SHAPES["r48"], [5, 3], [4, 0], 16, torch.float32)
    q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, table = case
    dense = contiguous_poisoned(cache, table, seqlens, [0, 0])
    tma = dict(TMA=True, BLOCK_D=64)
    with pytest.raises(ValueError, match="paged"):  # (expanded mode gathers a paged cache: TMA reads that)
        latent_prefill_triton(q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, 0.15, table, mode="absorbed", config=tma)
    with pytest.raises(ValueError, match="resident"):
        latent_prefill_triton(q_nope, q_rope, dense, w_uk, w_uv, cu, seqlens, 0.15, mode="absorbed",
                              config=dict(TMA=True, BLOCK_D=32))  # fmt: skip
    with pytest.raises(ValueError, match="16-byte"):  # rows of 63 fp32 values: 252 bytes
        latent_prefill_triton(q_nope, q_rope, dense[..., 1:].contiguous(), w_uk[:, 1:], w_uv[:, 1:], cu, seqlens,
                              0.15, mode="absorbed", config=tma)  # fmt: skip


def chunked_latent_fp64(q, rows_by_seq, cu, seqlens, scale, kv_rank, kv_start=None, row_scales=None):
    """Causal absorbed attention of packed chunks over latent rows in fp64: q `[tq, h, r+2p]`, rows
    of sequence i `rows_by_seq[i] [s_i, r+2p]` (times `row_scales[i] [s_i]` for an fp8 cache) ->
    (latent out `[tq, h, r]`, lse `[tq, h]`)."""
    outs, lses = [], []
    for seq, length in enumerate(seqlens):
        lo, hi = int(cu[seq]), int(cu[seq + 1])
        if hi == lo:
            continue
        rows = rows_by_seq[seq].double().clone()
        if row_scales is not None:
            rows = rows * row_scales[seq].double()[:, None]
        first = 0 if kv_start is None else kv_start[seq]
        pos = length - (hi - lo) + torch.arange(hi - lo)
        key = torch.arange(length)
        visible = (key[None, :] <= pos[:, None]) & (key[None, :] >= first)  # [t, s]
        rows = torch.where(visible.any(0)[:, None], rows, 0.0)  # hidden rows may hold NaN
        out, lse = dense_attention_fp64(q[lo:hi].double().transpose(0, 1), rows[None], rows[None, :, :kv_rank],
                                        scale, visible)  # fmt: skip
        outs.append(out.transpose(0, 1))
        lses.append(lse.T)
    return torch.cat(outs), torch.cat(lses)


PACKED_TILINGS = {
    "heads-on-m": {},
    "heads-on-n-pieces": dict(HEADS_ON_N=True, LATENT_PIECES=True),
    "heads-on-m-pieces": dict(HEADS_ON_N=False, LATENT_PIECES=True, BLOCK_V=64),
}


@pytest.mark.parametrize("tiling", PACKED_TILINGS)
@pytest.mark.parametrize("heads,block_h", [(3, 16), (3, 32), (5, 32), (16, 32), (7, 16)])
def test_packed_plain_decode_matches_fp64(heads, block_h, tiling, poisoned_partials):
    """The decode route's packed blocks (`latent_decode_triton` with `cu_seqlens_q`): T = BLOCK_H // h
    tokens of a chunk with all the heads on a tile's rows (7 heads in 16 rows: T = 2, 2 rows left;
    16 in 16: T = 1). Chunks of T - 1, T, T + 1 and 2T + 1 tokens, an empty one, left padding reaching
    into a chunk, NaN in unused cache slots and in the partial buffers, against fp64."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    tokens = max(1, block_h // heads)
    new, cached = [tokens - 1, tokens, tokens + 1, 2 * tokens + 1, 0, 1], [0, 17, 40, 3, 5, 70]
    kv_rank, rope = 44, 12  # no power of two: 32 + 8 + 4 in pieces
    seqlens = [n + c for n, c in zip(new, cached, strict=True)]
    cache, table = random_paged_cache(seqlens, kv_rank + rope, 16, torch.float32, seed=heads + block_h)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), heads, kv_rank + rope, generator=torch.Generator().manual_seed(block_h))
    kv_start = [0, 3, 41, 0, 2, 0]  # sequence 2: padding past its first new token
    config = dict(PACKED_TILINGS[tiling], BLOCK_H=block_h)
    out, lse = latent_decode_triton(
        q, cache, torch.tensor(seqlens, dtype=torch.int32), 0.2, kv_rank, table,
        torch.tensor(kv_start, dtype=torch.int32), config=config, cu_seqlens_q=cu, max_seqlen_q=max(new),
    )  # fmt: skip
    rows = [rows_of(cache, table, i, n) for i, n in enumerate(seqlens)]
    ref_out, ref_lse = chunked_latent_fp64(q, rows, cu, seqlens, 0.2, kv_rank, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])
    ((part_out, part_lse),) = poisoned_partials
    assert not part_lse.isnan().any() and (part_lse == float("-inf")).any()


@pytest.mark.parametrize("tiling", [*PACKED_TILINGS, "tma"])
def test_packed_rope_only_decode_matches_fp64(tiling):
    """Packed blocks of an n = 0 layer's RoPE-only queries `[tq, h, 2p]` (7 heads, 2 tokens a
    16-row block): the zero-padded queries' result in fp64, NaN past each sequence's end."""
    from kernel_cases import random_contiguous_cache

    from m2la.kernels.latent_decode.triton import latent_decode_triton

    new, cached, heads, kv_rank, rope = [1, 2, 3, 5, 0], [0, 17, 40, 3, 5], 7, 44, 12
    seqlens = [n + c for n, c in zip(new, cached, strict=True)]
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), heads, kv_rank + rope, generator=torch.Generator().manual_seed(4))
    q[..., :kv_rank] = 0.0
    if tiling == "tma":
        cache, table = random_contiguous_cache(seqlens, kv_rank + rope, max(seqlens) + 4, torch.float32, seed=5), None
        rows = [cache[i, :n] for i, n in enumerate(seqlens)]
        config = dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True, BLOCK_H=16)
    else:
        cache, table = random_paged_cache(seqlens, kv_rank + rope, 16, torch.float32, seed=5)
        rows = [rows_of(cache, table, i, n) for i, n in enumerate(seqlens)]
        config = dict(PACKED_TILINGS[tiling], BLOCK_H=16)
    kv_start = [0, 3, 41, 0, 2]
    out, lse = latent_decode_triton(
        q[..., kv_rank:].contiguous(), cache, torch.tensor(seqlens, dtype=torch.int32), 0.2, kv_rank, table,
        torch.tensor(kv_start, dtype=torch.int32), config=config, cu_seqlens_q=cu, max_seqlen_q=max(new),
    )  # fmt: skip
    ref_out, ref_lse = chunked_latent_fp64(q, rows, cu, seqlens, 0.2, kv_rank, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


def test_packed_plain_decode_fp8_and_contiguous_caches():
    """fp8 cache rows (one scale per slot) and a contiguous `[b, s, r+2p]` cache (pointer loads and
    TMA tiles) through packed blocks."""
    from kernel_cases import quantize_cache, random_contiguous_cache

    from m2la.kernels.latent_decode.triton import latent_decode_triton

    new, cached, heads, kv_rank, rope = [5, 2, 9], [30, 0, 11], 4, 40, 16
    seqlens = [n + c for n, c in zip(new, cached, strict=True)]
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), heads, kv_rank + rope, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor(seqlens, dtype=torch.int32)
    cache, table = random_paged_cache(seqlens, kv_rank + rope, 16, torch.float32, seed=8)
    codes, scales = quantize_cache(cache, torch.float8_e4m3fn)
    out, lse = latent_decode_triton(q, codes, lens, 0.2, kv_rank, table, kv_scale=scales, cu_seqlens_q=cu,
                                    max_seqlen_q=9)  # fmt: skip
    rows = [rows_of(codes.float(), table, i, n) for i, n in enumerate(seqlens)]
    row_scales = [rows_of(scales[..., None], table, i, n)[:, 0] for i, n in enumerate(seqlens)]
    ref_out, ref_lse = chunked_latent_fp64(q, rows, cu, seqlens, 0.2, kv_rank, None, row_scales)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-4, rtol=1e-4)
    contiguous = random_contiguous_cache(seqlens, kv_rank + rope, max(seqlens) + 4, torch.float32, seed=9)
    rows = [contiguous[i, :n] for i, n in enumerate(seqlens)]
    ref_out, ref_lse = chunked_latent_fp64(q, rows, cu, seqlens, 0.2, kv_rank)
    tma = dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True)  # tiles by tensor descriptor, packed rows
    for config in (None, tma):
        out, lse = latent_decode_triton(q, contiguous, lens, 0.2, kv_rank, config=config, cu_seqlens_q=cu,
                                        max_seqlen_q=9)  # fmt: skip
        assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])


def test_packed_plain_decode_rows_and_route(monkeypatch):
    """Rows for tokens x heads up to 32 (the measured 32-head tiles); the prefill's decode route
    packs while two tokens share a tile (up to 16 heads) and `max_seqlen_q` is given, else one
    decode a token; a packed call whose heads span head tiles is refused."""
    from m2la.kernels.latent_decode import triton as decode
    from m2la.kernels.latent_prefill import triton as prefill

    assert decode.packed_decode_rows(9, 5) == 32 and decode.packed_tokens_per_block(9, 5) == 3
    assert decode.packed_decode_rows(16, 4) == 32 and decode.packed_tokens_per_block(16, 4) == 2
    assert decode.packed_decode_rows(4, 2) == 16 and decode.packed_tokens_per_block(4, 2) == 4
    assert decode.packed_tokens_per_block(17, 8) == 1 and decode.packed_tokens_per_block(32, 8) == 1
    assert decode.packed_decode_rows(40, 8) == 64  # more heads than the packed rows: the heads alone
    case = make_case(3, *SHAPES["r48"], [4, 6], [9, 0], 16, torch.float32, seed=3)
    ref_out, ref_lse = prefill_fp64_absorbed(*case[:7], 0.15, case[7])
    calls = []
    real = decode.latent_decode_triton
    monkeypatch.setattr(
        decode, "latent_decode_triton", lambda *a, **k: calls.append(k.get("max_seqlen_q")) or real(*a, **k)
    )
    for max_seqlen_q in (6, 0):
        out, lse = prefill.latent_prefill_triton(*case[:7], 0.15, case[7], max_seqlen_q=max_seqlen_q, mode="decode")
        assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[torch.float32])
    assert calls == [6, None]  # packed, then one decode a token (no sync to learn the longest chunk)
    q = torch.randn(10, 20, 64)
    with pytest.raises(ValueError, match="need all 20 heads in one head tile"):
        real(q, case[2], case[6], 0.15, 48, case[7], cu_seqlens_q=case[5], max_seqlen_q=6, config=dict(BLOCK_H=16))
