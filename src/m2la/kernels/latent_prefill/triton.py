"""Fused causal variable-length (chunked) prefill over the latent cache (Triton).

One flash-attention kernel, grid `(query tiles, b, h * value tiles)`, reads keys and values from
three sources that share one token addressing (through the block table when paged, else
`[b, s, ...]`): a "nope" key part, the shared RoPE key and the values, each with its own head
stride. The host picks what they point at:

- absorbed: queries `[q_nope @ W_uk_h^T | q_rope]`, nope key = latent, values = latent (head
  stride 0: every head reads the same cache rows, straight from the paged cache, nothing
  materialised); the `[tq, h, r]` output is multiplied by `W_uv_h` afterwards.
- expanded: the cache prefix is gathered and up-projected for every head in one torch GEMM
  (`[k_nope_h | v_h] = latent @ [W_uk_h | W_uv_h]`, `expand_cache_prefix`), then the same kernel
  runs standard attention with per-head keys/values and the shared RoPE key
  (`expanded_prefill_attention`).

A third mode, "decode", runs the absorbed computation through the split-KV decode kernel
(`_latent_attention_through_decode`): one decode per query token, or with up to 16 heads (and
`max_seqlen_q` given) several tokens of a chunk packed with the heads on each program's rows, so a
cache tile is read once for them. For short extends it splits the keys over the GPU where this
kernel would not. See `choose_prefill_mode` for the rule between the modes.

fp8 caches: absorbed mode reads the fp8 rows and widens them to the query dtype in registers, each
token's scale multiplying its score and value weight (`HAS_SCALE`); expanded mode dequantizes the
gathered prefix in torch before the expansion GEMMs.

`config=dict(TMA=True)` (opt-in, not yet timed): keys and values through device-side tensor
descriptors (`_prefill_step_tma`), for contiguous 16- or 32-bit operands with a resident nope query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from m2la.backends import triton_interpreter_enabled
from m2la.kernels._host import cdiv, next_power_of_2
from m2la.kernels._launch import (
    check_fp8_cache_readable,
    launch_shrinking,
    tma_misalignment,
    with_scratch_allocator,
)
from m2la.kernels._paging import cache_capacity, gather_cache_rows
from m2la.kernels._quant import gather_dequantized_rows
from m2la.kernels.latent_decode.triton import GROUPED_PACKED_ROWS
from m2la.quantization import is_fp8

_LOG2E = 1.4426950408889634


# Time per multiply-add of absorbed attention (through the split-KV decode kernel) against the
# expanded path (GEMM + flash attention). Fitted to where the modes cross in the short-extend rows
# of the H100 run of 2026-11-27 (twelfth session; 8 sequences after a 32K prefix, benchmarks/
# RESULTS.md): ~50 new tokens a sequence at 896 + 128 (c = 2.6 there) and ~61 at 448 + 64 (c = 2.3).
# The earlier 2.0 (from kernel TFLOPS alone) sent 64-token extends down the decode route, 1.05-1.27x
# slower than expanded.
ABSORBED_MAC_COST = 2.5


def choose_prefill_mode(
    num_new_tokens: int, batch: int, kv_rank: int, nope_dim: int, value_dim: int, rope_dim: int = 0
) -> str:
    """Return "decode" (absorbed, through the split-KV decode kernel) or "expanded", whichever
    costs less tensor-core time by a multiply-add count.

    Per (head, query, key) the absorbed route spends `2r + 2p` MACs (2p = `rope_dim`; `r + 2p` when
    n = 0, whose RoPE-only queries skip the latent scores) and the expanded one `n + 2p + v`;
    expanding costs `r * (n + v)` MACs per (head, key) once. Counting the absorbed MACs at
    `ABSORBED_MAC_COST` times the expanded ones, with `t` new queries per sequence on average,
    expanded wins exactly when `t * (c * (2r + 2p) - (n + 2p + v)) > r * (n + v)`.
    InternVideo3 (r=896, n=v=128, 2p=128): chunks above ~52 tokens go expanded; shorter extends
    (speculative tokens, short turns) take the decode route, which splits each query token's keys
    over the whole GPU where the prefill kernel would run one program per (head, 64 queries).
    """
    tokens_per_seq = num_new_tokens / max(1, batch)
    score_rank = kv_rank if nope_dim else 0  # the latent columns a query scores
    absorbed = ABSORBED_MAC_COST * (score_rank + kv_rank + rope_dim) - (nope_dim + rope_dim + value_dim)
    return "expanded" if tokens_per_seq * absorbed > kv_rank * (nope_dim + value_dim) else "decode"


@triton.jit
def _online_softmax(scores, m_i, l_i, offs_n, key_ok, query_pos, scale_log2, MASKED: tl.constexpr):
    """One key tile's online-softmax update: `scores [BLOCK_M, BLOCK_N]` (unscaled) -> (probs,
    alpha, m_new, l_i), base 2. MASKED: keys outside `key_ok` or past each query's position count as
    -inf (rows that see nothing yet keep a running max of -inf)."""
    if MASKED:
        visible = key_ok[None, :] & (offs_n[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet: avoid -inf - -inf
    else:
        scores = scores * scale_log2
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = m_new
    probs = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return probs, alpha, m_new, l_i * alpha + tl.sum(probs, axis=1)


@triton.jit
def _prefill_step(
    acc, m_i, l_i, start, q_nope, q_rope, qn_rows, row_ok, query_pos, first, hi, seq, kv_head,
    block_table_ptr, k_nope_ptr, k_rope_ptr, v_ptr, kv_scale_ptr, kn_desc, kr_desc, v_desc,
    scale_log2, nope_dim, block_size, offs_rope, rope_ok, offs_v, value_ok,
    stride_kn_blk, stride_kn_tok, stride_kn_h, stride_kr_blk, stride_kr_tok, stride_kr_h,
    stride_v_blk, stride_v_tok, stride_v_h, stride_sc_blk, stride_sc_tok, stride_bt_b,
    MASKED: tl.constexpr, PAGED: tl.constexpr, HAS_NOPE: tl.constexpr, HAS_SCALE: tl.constexpr,
    SINGLE_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One `BLOCK_N`-key tile of the online softmax. MASKED=False: every key of the tile is visible
    to every query row (inside `[first, hi)` and before the tile's first query), so no mask.
    TMA: keys and values load through the descriptors `kn_desc`, `kr_desc`, `v_desc` (rows from
    `first`; rows outside the sequence's visible ones read as zeros), not the pointers."""
    offs_n = start + tl.arange(0, BLOCK_N)
    key_ok = (offs_n < hi) & (offs_n >= first)
    if TMA:
        acc, m_i, l_i = _prefill_step_tma(
            acc, m_i, l_i, offs_n, key_ok, start - first, q_nope, q_rope, query_pos, kn_desc, kr_desc, v_desc,
            scale_log2, MASKED, HAS_NOPE, DOT_PRECISION,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _prefill_step_pointers(
            acc, m_i, l_i, offs_n, key_ok, q_nope, q_rope, qn_rows, row_ok, query_pos, seq, kv_head,
            block_table_ptr, k_nope_ptr, k_rope_ptr, v_ptr, kv_scale_ptr,
            scale_log2, nope_dim, block_size, offs_rope, rope_ok, offs_v, value_ok,
            stride_kn_blk, stride_kn_tok, stride_kn_h, stride_kr_blk, stride_kr_tok, stride_kr_h,
            stride_v_blk, stride_v_tok, stride_v_h, stride_sc_blk, stride_sc_tok, stride_bt_b,
            MASKED, PAGED, HAS_NOPE, HAS_SCALE, SINGLE_D, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _prefill_step_pointers(
    acc, m_i, l_i, offs_n, key_ok, q_nope, q_rope, qn_rows, row_ok, query_pos, seq, kv_head,
    block_table_ptr, k_nope_ptr, k_rope_ptr, v_ptr, kv_scale_ptr,
    scale_log2, nope_dim, block_size, offs_rope, rope_ok, offs_v, value_ok,
    stride_kn_blk, stride_kn_tok, stride_kn_h, stride_kr_blk, stride_kr_tok, stride_kr_h,
    stride_v_blk, stride_v_tok, stride_v_h, stride_sc_blk, stride_sc_tok, stride_bt_b,
    MASKED: tl.constexpr, PAGED: tl.constexpr, HAS_NOPE: tl.constexpr, HAS_SCALE: tl.constexpr,
    SINGLE_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`_prefill_step` with the key and value tiles loaded through pointers (paged or contiguous,
    masked loads, fp8 widening)."""
    compute_dtype = q_rope.dtype
    if PAGED:
        if MASKED:
            blk = tl.load(block_table_ptr + seq * stride_bt_b + offs_n // block_size, mask=key_ok, other=0)
        else:
            blk = tl.load(block_table_ptr + seq * stride_bt_b + offs_n // block_size)
        blk = blk.to(tl.int64)
        tok = offs_n % block_size
    else:
        blk = tl.zeros([BLOCK_N], tl.int64) + seq
        tok = offs_n
    kn_rows = k_nope_ptr + (blk * stride_kn_blk + tok * stride_kn_tok + kv_head * stride_kn_h)[:, None]
    kr_rows = k_rope_ptr + (blk * stride_kr_blk + tok * stride_kr_tok + kv_head * stride_kr_h)[:, None]
    v_rows = v_ptr + (blk * stride_v_blk + tok * stride_v_tok + kv_head * stride_v_h)[:, None]

    k_rope = tl.load(kr_rows + offs_rope[None, :], mask=key_ok[:, None] & rope_ok[None, :], other=0.0)
    scores = tl.dot(q_rope, tl.trans(k_rope.to(compute_dtype)), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_NOPE:  # compiled out when n = 0: a zero-trip pipelined loop still loaded on sm_90
        if SINGLE_D:  # q_nope resident in registers; one key tile of width BLOCK_D >= n
            offs_d = tl.arange(0, BLOCK_D)
            k_nope = tl.load(kn_rows + offs_d[None, :], mask=key_ok[:, None] & (offs_d[None, :] < nope_dim), other=0.0)
            scores += tl.dot(q_nope, tl.trans(k_nope.to(compute_dtype)), input_precision=DOT_PRECISION)
        else:  # wide absorbed queries (n = r): BLOCK_D-wide chunks, re-read from L2
            for d0 in range(0, nope_dim, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < nope_dim
                q_chunk = tl.load(qn_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                k_chunk = tl.load(kn_rows + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
                scores += tl.dot(q_chunk, tl.trans(k_chunk.to(compute_dtype)), input_precision=DOT_PRECISION)
    if HAS_SCALE:
        key_scale = tl.load(kv_scale_ptr + blk * stride_sc_blk + tok * stride_sc_tok, mask=key_ok, other=0.0)
        scores = scores * key_scale[None, :]
    probs, alpha, m_new, l_i = _online_softmax(scores, m_i, l_i, offs_n, key_ok, query_pos, scale_log2, MASKED)
    values = tl.load(v_rows + offs_v[None, :], mask=key_ok[:, None] & value_ok[None, :], other=0.0)
    if HAS_SCALE:
        probs = probs * key_scale[None, :]  # value weights; l_i keeps the unscaled sum
    acc = acc * alpha[:, None] + tl.dot(
        probs.to(compute_dtype), values.to(compute_dtype), input_precision=DOT_PRECISION
    )
    return acc, m_new, l_i


@triton.jit
def _prefill_step_tma(
    acc, m_i, l_i, offs_n, key_ok, row, q_nope, q_rope, query_pos, kn_desc, kr_desc, v_desc, scale_log2,
    MASKED: tl.constexpr, HAS_NOPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`_prefill_step` with the key and value tiles loaded by TMA at descriptor row `row` (global ->
    shared, no registers, no masks: hidden rows read as zeros, so even NaN there never reaches a
    value product). Contiguous 16- or 32-bit operands with a resident nope query only."""
    compute_dtype = q_rope.dtype
    scores = tl.dot(q_rope, tl.trans(kr_desc.load([row, 0])), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_NOPE:
        scores += tl.dot(q_nope, tl.trans(kn_desc.load([row, 0])), input_precision=DOT_PRECISION)
    probs, alpha, m_new, l_i = _online_softmax(scores, m_i, l_i, offs_n, key_ok, query_pos, scale_log2, MASKED)
    values = v_desc.load([row, 0])  # [BLOCK_N, BLOCK_V]
    acc = acc * alpha[:, None] + tl.dot(probs.to(compute_dtype), values, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# The chunk's query-tile count and the head group change with the call's lengths: no value
# specialisation (== 1, multiple of 16), so new lengths never compile new variants of the kernel.
@triton.jit(do_not_specialize=["num_query_tiles", "head_group"])
def _prefill_kernel(
    q_nope_ptr, q_rope_ptr, k_nope_ptr, k_rope_ptr, v_ptr, block_table_ptr, cu_seqlens_q_ptr, seqlens_ptr,
    kv_start_ptr, kv_scale_ptr, out_ptr, lse_ptr,
    scale_log2,
    nope_dim, rope_dim, value_dim, block_size, num_value_tiles, num_head_tiles, num_query_tiles, head_group,
    kv_group_size, rope_half_stride,
    stride_qn_t, stride_qn_h, stride_qr_t, stride_qr_h,
    stride_kn_blk, stride_kn_tok, stride_kn_h,
    stride_kr_blk, stride_kr_tok, stride_kr_h,
    stride_v_blk, stride_v_tok, stride_v_h,
    stride_sc_blk, stride_sc_tok,
    stride_bt_b, stride_o_t, stride_o_h, stride_l_t,
    PAGED: tl.constexpr, HAS_NOPE: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr, SINGLE_D: tl.constexpr,
    TMA: tl.constexpr = False, ROPE_SPLIT: tl.constexpr = False,
):  # fmt: skip
    # Query head `head` reads keys and values at `head // kv_group_size` times the head strides
    # (1: per head or shared; a grouped layer's heads per KV group: GQA).
    # ROPE_SPLIT (grouped layers): the query's 2P RoPE columns are [x | y] halves of P, and the key's
    # halves sit `rope_half_stride` (p = G P) apart in the cache row: loaded as BLOCK_ROPE/2-wide halves.
    # HAS_SCALE: fp8 keys/values (absorbed mode), widened to the query dtype; per-token scales.
    # TMA (contiguous, not fp8, resident nope query; opt-in, not yet timed): keys and values load
    # through device-side tensor descriptors over this sequence's rows [first, seqlen) and this
    # head's columns.
    # SINGLE_D (HAS_NOPE and BLOCK_D >= n): the nope query stays in registers for the whole key loop.
    # Launch order (axis 0, fastest first): groups of `head_group` head tiles (a head tile = one
    # head's value tile); inside a group, query tiles from the last (the most causal keys) to the
    # first, the group's head tiles side by side. So the longest programs start first across the
    # whole group (the last wave holds the shortest: load balance), and the group's keys and values
    # (sized by the host to share L2) are read by every query tile that runs at the same time.
    pid = tl.program_id(0)
    group = pid // (head_group * num_query_tiles)
    group_first = group * head_group
    group_size = tl.minimum(head_group, num_head_tiles - group_first)  # the last group may be short
    in_group = pid - group_first * num_query_tiles
    m_tile = num_query_tiles - 1 - in_group // group_size
    head_tile = group_first + in_group % group_size
    seq = tl.program_id(1)
    head = head_tile // num_value_tiles
    value_tile = head_tile % num_value_tiles
    kv_head = head // kv_group_size

    q_lo = tl.load(cu_seqlens_q_ptr + seq)
    num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - q_lo
    seqlen = tl.load(seqlens_ptr + seq)
    first = 0  # keys before it are hidden (left padding)
    if HAS_KV_START:
        first = tl.load(kv_start_ptr + seq)
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] index within the new chunk
    row_ok = offs_m < num_new
    query_pos = seqlen - num_new + offs_m  # absolute position of each query in its sequence
    # Keys up to the tile's last query; tiles past this sequence's chunk run no iterations.
    hi = tl.where(m_tile * BLOCK_M < num_new, tl.minimum(seqlen, seqlen - num_new + (m_tile + 1) * BLOCK_M), 0)
    # Key tiles: [lo, lo_full) holds `first` (masked), [lo_full, diag) is visible to every row of the
    # tile (unmasked), [diag, hi) reaches the causal diagonal or `hi` (masked).
    lo = (first // BLOCK_N) * BLOCK_N
    lo_full = tl.cdiv(first, BLOCK_N) * BLOCK_N
    diag = tl.maximum(lo_full, (tl.minimum(hi, seqlen - num_new + m_tile * BLOCK_M) // BLOCK_N) * BLOCK_N)

    offs_rope = tl.arange(0, BLOCK_ROPE)  # the query's RoPE columns
    rope_ok = offs_rope < rope_dim
    key_rope = offs_rope  # the same columns of the RoPE key
    if ROPE_SPLIT:
        pair = offs_rope % (BLOCK_ROPE // 2)
        half = offs_rope // (BLOCK_ROPE // 2)
        rope_ok = pair < rope_dim // 2
        key_rope = half * rope_half_stride + pair
        offs_rope = half * (rope_dim // 2) + pair
    offs_v = value_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    value_ok = offs_v < value_dim
    tokens = (q_lo + offs_m).to(tl.int64)
    qn_rows = q_nope_ptr + tokens[:, None] * stride_qn_t + head * stride_qn_h  # [BLOCK_M, 1]
    q_rope = tl.load(
        q_rope_ptr + tokens[:, None] * stride_qr_t + head * stride_qr_h + offs_rope[None, :],
        mask=row_ok[:, None] & rope_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_ROPE]
    q_nope = q_rope  # placeholder when the nope query is not resident (never read then)
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        q_nope = tl.load(qn_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < nope_dim), other=0.0)

    kn_desc = k_rope_ptr  # placeholders (never read) without TMA
    kr_desc = k_rope_ptr
    v_desc = k_rope_ptr
    if TMA:  # rows [first, seqlen) of this sequence: rows outside read as zeros, never masked loads
        visible_rows = tl.maximum(seqlen - first, 0)
        seq_rows = seq.to(tl.int64)
        kr_desc = tl.make_tensor_descriptor(
            k_rope_ptr + seq_rows * stride_kr_blk + kv_head * stride_kr_h + first * stride_kr_tok,
            [visible_rows, rope_dim], [stride_kr_tok, 1], [BLOCK_N, BLOCK_ROPE],
        )  # fmt: skip
        if HAS_NOPE:
            kn_desc = tl.make_tensor_descriptor(
                k_nope_ptr + seq_rows * stride_kn_blk + kv_head * stride_kn_h + first * stride_kn_tok,
                [visible_rows, nope_dim], [stride_kn_tok, 1], [BLOCK_N, BLOCK_D],
            )  # fmt: skip
        v_desc = tl.make_tensor_descriptor(
            v_ptr + seq_rows * stride_v_blk + kv_head * stride_v_h + first * stride_v_tok + value_tile * BLOCK_V,
            [visible_rows, value_dim - value_tile * BLOCK_V], [stride_v_tok, 1], [BLOCK_N, BLOCK_V],
        )  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for start in range(lo, tl.minimum(lo_full, hi), BLOCK_N):
        acc, m_i, l_i = _prefill_step(
            acc, m_i, l_i, start, q_nope, q_rope, qn_rows, row_ok, query_pos, first, hi, seq, kv_head,
            block_table_ptr, k_nope_ptr, k_rope_ptr, v_ptr, kv_scale_ptr, kn_desc, kr_desc, v_desc,
            scale_log2, nope_dim, block_size, key_rope, rope_ok, offs_v, value_ok,
            stride_kn_blk, stride_kn_tok, stride_kn_h, stride_kr_blk, stride_kr_tok, stride_kr_h,
            stride_v_blk, stride_v_tok, stride_v_h, stride_sc_blk, stride_sc_tok, stride_bt_b,
            True, PAGED, HAS_NOPE, HAS_SCALE, SINGLE_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA,
        )  # fmt: skip
    for start in range(lo_full, diag, BLOCK_N):
        acc, m_i, l_i = _prefill_step(
            acc, m_i, l_i, start, q_nope, q_rope, qn_rows, row_ok, query_pos, first, hi, seq, kv_head,
            block_table_ptr, k_nope_ptr, k_rope_ptr, v_ptr, kv_scale_ptr, kn_desc, kr_desc, v_desc,
            scale_log2, nope_dim, block_size, key_rope, rope_ok, offs_v, value_ok,
            stride_kn_blk, stride_kn_tok, stride_kn_h, stride_kr_blk, stride_kr_tok, stride_kr_h,
            stride_v_blk, stride_v_tok, stride_v_h, stride_sc_blk, stride_sc_tok, stride_bt_b,
            False, PAGED, HAS_NOPE, HAS_SCALE, SINGLE_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA,
        )  # fmt: skip
    for start in range(diag, hi, BLOCK_N):
        acc, m_i, l_i = _prefill_step(
            acc, m_i, l_i, start, q_nope, q_rope, qn_rows, row_ok, query_pos, first, hi, seq, kv_head,
            block_table_ptr, k_nope_ptr, k_rope_ptr, v_ptr, kv_scale_ptr, kn_desc, kr_desc, v_desc,
            scale_log2, nope_dim, block_size, key_rope, rope_ok, offs_v, value_ok,
            stride_kn_blk, stride_kn_tok, stride_kn_h, stride_kr_blk, stride_kr_tok, stride_kr_h,
            stride_v_blk, stride_v_tok, stride_v_h, stride_sc_blk, stride_sc_tok, stride_bt_b,
            True, PAGED, HAS_NOPE, HAS_SCALE, SINGLE_D, BLOCK_N, BLOCK_D, DOT_PRECISION, TMA,
        )  # fmt: skip

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    out_rows = out_ptr + tokens[:, None] * stride_o_t + head * stride_o_h
    tl.store(out_rows + offs_v[None, :], out, mask=row_ok[:, None] & value_ok[None, :])
    if value_tile == 0:
        tl.store(lse_ptr + tokens * stride_l_t + head, lse, mask=row_ok)


def prefill_config(value_dim: int, interpret: bool, nope_dim: int = 0, rope_dim: int = 0, itemsize: int = 2) -> dict:
    """Tiles for `_prefill_kernel`. Query widths up to 256 (expanded mode: n = 128) stay resident
    (BLOCK_D = n) with 128-query tiles over 8 warps, the usual flash-attention shape on sm_90; wide
    absorbed queries (n = r) are chunked by 64 with 64-query tiles. Wide RoPE keys (a lossless
    conversion of a GQA model: 2p = kv heads x head dim, up to 1024) shrink the tiles until they fit
    sm_90's shared memory (`fit_prefill_tiles`)."""
    pow2 = next_power_of_2
    block_v = max(16, min(128, pow2(value_dim)))
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, BLOCK_V=min(64, block_v), num_warps=4, num_stages=1)
    if nope_dim <= 256:
        # 3 stages where they fit (n <= 128: 168-208 KiB): 0.81-0.85x the time of 2 stages at a 16K
        # prefix on both H100 runs of 2026-11-27; at prefix 0 (about 1 ms) the two runs disagreed.
        block_d = max(16, pow2(nope_dim))
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, BLOCK_V=block_v, num_warps=8,
                   num_stages=3 if block_d <= 128 else 2)  # fmt: skip
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_V=block_v, num_warps=4, num_stages=2)
    return fit_prefill_tiles(cfg, nope_dim, rope_dim, itemsize)


# sm_90 allows 227 KiB of shared memory a block; the estimate below was within 4% of the compiled
# kernels' figures (benchmarks/RESULTS.md), so the budget leaves that much room.
PREFILL_SHARED_BUDGET = 216 * 1024

# Smaller tiles in order of preference (BLOCK_M, BLOCK_N, num_stages): keep pipelining (2 stages)
# before the query tile; never larger than the default in any entry.
_SMALLER_PREFILL_TILES = [(128, 64, 3), (128, 64, 2), (128, 32, 2), (128, 64, 1), (64, 64, 2), (64, 32, 2),
                          (64, 64, 1), (64, 32, 1), (32, 32, 1), (16, 16, 1)]  # fmt: skip


def prefill_shared_bytes(cfg: dict, nope_dim: int, rope_dim: int, itemsize: int = 2) -> int:
    """Estimated shared memory of `_prefill_kernel` on sm_90: the resident query tile (its nope part
    when resident, and the RoPE part) plus `num_stages` buffers of the key (nope, RoPE) and value tiles."""
    block_rope = max(16, next_power_of_2(rope_dim))
    nope = cfg["BLOCK_D"] if nope_dim > 0 else 0
    query = cfg["BLOCK_M"] * ((nope if cfg["BLOCK_D"] >= nope_dim else 0) + block_rope)
    keys_values = max(1, cfg["num_stages"]) * cfg["BLOCK_N"] * (nope + block_rope + cfg["BLOCK_V"])
    return (query + keys_values) * itemsize


def _smaller_prefill_tiles(cfg: dict) -> list[dict]:
    """The entries of `_SMALLER_PREFILL_TILES` below `cfg`'s (none larger in any entry), as
    BLOCK_M / BLOCK_N / num_stages / num_warps overrides (4 warps below 128-query tiles)."""
    current = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"])
    return [
        dict(BLOCK_M=m, BLOCK_N=n, num_stages=stages, num_warps=cfg["num_warps"] if m == 128 else 4)
        for m, n, stages in _SMALLER_PREFILL_TILES
        if (m, n, stages) != current and m <= current[0] and n <= current[1] and stages <= current[2]
    ]


def fit_prefill_tiles(cfg: dict, nope_dim: int, rope_dim: int, itemsize: int = 2) -> dict:
    """`cfg`, or with the first smaller tiles (`_smaller_prefill_tiles`) whose `prefill_shared_bytes`
    fits `PREFILL_SHARED_BUDGET`; the smallest if none does."""
    if prefill_shared_bytes(cfg, nope_dim, rope_dim, itemsize) <= PREFILL_SHARED_BUDGET:
        return cfg
    smaller = [{**cfg, **tiles} for tiles in _smaller_prefill_tiles(cfg)]
    for candidate in smaller:
        if prefill_shared_bytes(candidate, nope_dim, rope_dim, itemsize) <= PREFILL_SHARED_BUDGET:
            return candidate
    return smaller[-1] if smaller else cfg


# Keys and values one launch group of head tiles may keep in L2: half an H100's 50 MB, leaving room
# for the shared RoPE keys and the queries (a constant, not a hardware query; `HEAD_GROUP` overrides).
PREFILL_L2_BYTES = 24 * 2**20


def prefill_head_group(num_head_tiles: int, head_tile_bytes: int) -> int:
    """Head tiles per launch group (see `_prefill_kernel`): as many as keep their keys and values
    within `PREFILL_L2_BYTES`, at least 1; all of them when the heads share one cache (absorbed)."""
    if head_tile_bytes <= 0:
        return num_head_tiles
    return max(1, min(num_head_tiles, PREFILL_L2_BYTES // head_tile_bytes))


def _launch(q_nope, q_rope, k_nope, k_rope, v, block_table, cu_seqlens_q, cache_seqlens, kv_start, out, lse,
            softmax_scale, block_size, head_strides, max_seqlen_q, config=None, kv_scale=None, kv_group_size=1,
            rope_half_stride=0):  # fmt: skip
    """k_nope/k_rope/v: `[blocks|b, tokens, ...]` views whose dims 0/1 address a token; so does
    `kv_scale [blocks|b, tokens]` (fp8 keys/values only). Query head h reads them at
    `h // kv_group_size` times `head_strides`. `rope_half_stride` > 0 (grouped layers): the query's
    `2P` RoPE columns are `[x | y]` halves, the key's halves that many elements apart."""
    num_heads = q_nope.shape[1]
    nope_dim, rope_dim, value_dim = q_nope.shape[2], q_rope.shape[2], out.shape[2]
    itemsize = max(q_rope.element_size(), k_rope.element_size())  # fp8 keys: the queries stay 16-bit
    cfg = {**prefill_config(value_dim, triton_interpreter_enabled(), nope_dim, rope_dim, itemsize), **(config or {})}
    value_tiles = cdiv(value_dim, cfg["BLOCK_V"])
    paged = block_table is not None
    table = block_table if paged else cache_seqlens
    batch = cu_seqlens_q.shape[0] - 1
    rows = cache_capacity(k_nope, block_table)  # key rows of one sequence
    per_head_width = nope_dim * (head_strides[0] != 0) + min(value_dim, cfg["BLOCK_V"]) * (head_strides[2] != 0)
    per_head_width += rope_dim * (head_strides[1] != 0)
    head_tiles = num_heads * value_tiles
    head_tile_bytes = rows * per_head_width * v.element_size() // kv_group_size  # a KV group's heads share
    head_group = cfg.get("HEAD_GROUP") or prefill_head_group(head_tiles, head_tile_bytes)
    scale = kv_scale if kv_scale is not None else lse  # any 2-d fp32 tensor: unused without HAS_SCALE
    if kv_scale is not None:
        check_fp8_cache_readable(k_rope)

    tma = bool(cfg.get("TMA"))
    if tma and rope_half_stride:
        raise ValueError("TMA prefill tiles read whole RoPE key rows; a grouped layer's are split in halves")
    if tma:
        _check_tma_operands(k_nope, k_rope, v, paged, kv_scale, nope_dim, cfg)

    def launch(cfg: dict) -> None:
        query_tiles = cdiv(max(1, max_seqlen_q), cfg["BLOCK_M"])
        _prefill_kernel[(query_tiles * head_tiles, batch)](
            q_nope, q_rope, k_nope, k_rope, v, table, cu_seqlens_q, cache_seqlens,
            kv_start if kv_start is not None else cache_seqlens, scale, out, lse,
            softmax_scale * _LOG2E,
            nope_dim, rope_dim, value_dim, block_size, value_tiles, head_tiles, query_tiles, head_group,
            kv_group_size, rope_half_stride,
            q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1),
            k_nope.stride(0), k_nope.stride(1), head_strides[0],
            k_rope.stride(0), k_rope.stride(1), head_strides[1],
            v.stride(0), v.stride(1), head_strides[2],
            scale.stride(0), scale.stride(1),
            table.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            PAGED=paged, HAS_NOPE=nope_dim > 0, HAS_KV_START=kv_start is not None, HAS_SCALE=kv_scale is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            BLOCK_ROPE=max(16, next_power_of_2(rope_dim)), BLOCK_V=cfg["BLOCK_V"],
            DOT_PRECISION="ieee" if q_rope.dtype == torch.float32 else "tf32",
            SINGLE_D=nope_dim > 0 and cfg["BLOCK_D"] >= nope_dim,
            TMA=tma, ROPE_SPLIT=rope_half_stride > 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

    may_shrink = not (config and any(k in config for k in ("BLOCK_M", "BLOCK_N", "num_stages")))
    key = (nope_dim, rope_dim, value_dim, q_rope.dtype, k_rope.dtype, paged, kv_start is not None, kv_scale is not None,
           tma, rope_half_stride > 0)  # fmt: skip
    if tma:  # device-side descriptors live in triton's global scratch
        with_scratch_allocator(q_rope.device, launch_fitting_tiles, launch, cfg, may_shrink, key)
    else:
        launch_fitting_tiles(launch, cfg, may_shrink, key)


def _check_tma_operands(k_nope, k_rope, v, paged: bool, kv_scale, nope_dim: int, cfg: dict) -> None:
    """TMA tiles (`config=dict(TMA=True)`) read contiguous 16- or 32-bit keys and values that TMA can
    address, with the nope query resident (BLOCK_D >= n): expanded mode, or absorbed over a latent of
    at most BLOCK_D columns. Anything else raises, naming what the tile cannot read."""
    if paged:
        raise ValueError("TMA prefill tiles read contiguous keys and values; this call passes a block table (paged)")
    if kv_scale is not None:
        raise ValueError(f"TMA prefill tiles read 16- or 32-bit keys and values; these are {k_rope.dtype} (fp8)")
    if nope_dim > cfg["BLOCK_D"]:
        raise ValueError(f"TMA prefill tiles keep the nope query resident: BLOCK_D={cfg['BLOCK_D']} < n={nope_dim}")
    operands = (("the RoPE keys", k_rope), ("the values", v)) + ((("the nope keys", k_nope),) if nope_dim else ())
    for name, tensor in operands:
        problem = tma_misalignment(name, tensor)
        if problem:
            raise ValueError(problem)


_PREFILL_TILES_THAT_FIT: dict[tuple, dict] = {}  # launch key -> the smaller tiles that launched


def launch_fitting_tiles(launch, cfg: dict, may_shrink: bool, key: tuple) -> None:
    """`launch(cfg)`; when it runs out of shared memory (a shape `prefill_shared_bytes` misjudged),
    retry with the next smaller tiles (`_smaller_prefill_tiles`) and remember what launched for
    `key`. Tiles the caller's `config` set are never changed."""

    def next_smaller(tiles: dict) -> dict | None:
        smaller = _smaller_prefill_tiles(tiles)
        return smaller[0] if smaller else None

    launch_shrinking(launch, cfg, next_smaller, _PREFILL_TILES_THAT_FIT, key, may_shrink)


def expand_cache_prefix(
    kv_cache: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    block_table: torch.Tensor | None,
    batch: int,
    max_seqlen_k: int,
    dtype: torch.dtype,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expanded mode's keys and values: the first `max_seqlen_k` cache rows of each sequence,
    up-projected per head in one GEMM -> (k_nope [b, s, h, n], k_rope [b, s, 2p], values [b, s, h, v]),
    k_nope and values strided views of one `[b, s, h, n + v]` buffer.

    One GEMM over `[W_uk | W_uv]` (`[r, h * (n + v)]`) rather than two: one launch, one pass over
    the latent, and a wider N for the tensor cores. It runs in `dtype` (fp32 accumulation inside the
    GEMM; the result is stored in that dtype anyway): fp32 inputs would run it off the tensor cores.
    """
    kv_rank, nope_dim = w_uk.shape[1], w_uk.shape[2]
    cache = kv_cache if block_table is not None else kv_cache[:batch]
    if kv_scale is None:
        rows = gather_cache_rows(cache, block_table, max(1, max_seqlen_k))  # [b, s, r+2p]
    else:
        scale = kv_scale if block_table is not None else kv_scale[:batch]
        rows = gather_dequantized_rows(cache, scale, block_table, max(1, max_seqlen_k)).to(dtype)
    latent, k_rope = rows[..., :kv_rank], rows[..., kv_rank:]
    keys_values = (latent @ expansion_weight(w_uk, w_uv, dtype)).unflatten(-1, (w_uk.shape[0], -1))  # [b, s, h, n+v]
    return keys_values[..., :nope_dim], k_rope, keys_values[..., nope_dim:]


def expansion_weight(w_uk: torch.Tensor, w_uv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[W_uk_h | W_uv_h]` for every head as one `[r, h * (n + v)]` matrix in `dtype`, from w_uk
    `[h, r, n]` and w_uv `[h, r, v]`, copied in whichever layout their strides make a contiguous
    copy: `[r, h, n + v]` for row-major `[h, r, n]` weights, else `[h, n + v, r]` returned as a
    transposed view (the GEMM reads it as B^T, no further copy). Converted models pass `[h, r, n]`
    views of `[h, n, r]` projections (`M2LAttention`), the second case: there a `[r, h, n + v]`
    copy would read the weights with a stride of r elements. Where those views are each head's two
    row blocks (n key rows, then v value rows) of one row-major `[h, n + v, r]` weight in `dtype`
    (`kv_b_proj.weight`, as the module passes it), that weight is the matrix already: returned as a
    transposed view, no copy."""
    whole = _one_weight_view(w_uk, w_uv, dtype)
    if whole is not None:
        return whole
    if w_uk.stride(1) == 1 and w_uv.stride(1) == 1:  # [h, r, n] views of [h, n, r] storage
        weight_t = torch.cat((w_uk.transpose(1, 2), w_uv.transpose(1, 2)), dim=1).to(dtype)  # [h, n+v, r]
        return weight_t.flatten(0, 1).t()
    return torch.cat((w_uk.transpose(0, 1), w_uv.transpose(0, 1)), dim=-1).to(dtype).flatten(1)  # [r, h(n+v)]


def _one_weight_view(w_uk: torch.Tensor, w_uv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`[r, h * (n + v)]` as a transposed view of the row-major `[h, n + v, r]` weight whose per-head
    row blocks `w_uk [h, r, n]` and `w_uv [h, r, v]` view (each head's n key rows, then its v value
    rows), or None when they are not such views in `dtype`."""
    heads, kv_rank, nope_dim = w_uk.shape
    value_dim = w_uv.shape[2]
    head_rows = (nope_dim + value_dim) * kv_rank  # elements a head's block spans
    if (
        w_uk.dtype != dtype
        or w_uv.dtype != dtype
        or w_uv.shape[:2] != (heads, kv_rank)
        or w_uv.stride() != (head_rows, 1, kv_rank)
        or (nope_dim and w_uk.stride() != (head_rows, 1, kv_rank))
        or w_uk.untyped_storage().data_ptr() != w_uv.untyped_storage().data_ptr()
        or w_uv.storage_offset() != w_uk.storage_offset() + nope_dim * kv_rank
    ):
        return None
    whole = w_uv.as_strided((heads * (nope_dim + value_dim), kv_rank), (kv_rank, 1), w_uk.storage_offset())
    return whole.t()


def expanded_prefill_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    max_seqlen_q: int,
    kv_start: torch.Tensor | None = None,
    config: dict | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded mode's attention, the keys and values already up-projected (`expand_cache_prefix`):
    q_nope `[tq, h, n]`, q_rope `[tq, h, 2p]`, k_nope `[b, s, h, n]`, k_rope `[b, s, 2p]` (shared by
    the heads), values `[b, s, h, v]`, all in one dtype -> (out `[tq, h, v]`, lse `[tq, h]` fp32).
    Sequence `i` attends causally to its first `cache_seqlens[i]` rows; `max_seqlen_q` > 0 is the
    longest chunk. `out_dtype`: the output's (default: the inputs'), stored straight from fp32."""
    num_tokens, num_heads = q_nope.shape[:2]
    if max_seqlen_q <= 0 < num_tokens:
        raise ValueError(f"max_seqlen_q must be the longest chunk (> 0), got {max_seqlen_q}")
    out = torch.empty(num_tokens, num_heads, values.shape[-1], device=q_nope.device, dtype=out_dtype or q_nope.dtype)
    lse = torch.empty(num_tokens, num_heads, device=q_nope.device, dtype=torch.float32)
    _launch(q_nope, q_rope, k_nope, k_rope, values, None, cu_seqlens_q, cache_seqlens, kv_start,
            out, lse, softmax_scale, 1, (k_nope.stride(2), 0, values.stride(2)), max_seqlen_q, config)  # fmt: skip
    return out, lse


def _absorption_product(equation: str, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`einsum(equation, x, weight)` in `out_dtype`. When the operands share a dtype the GEMM runs in
    it (the tensor cores accumulate in fp32; torch's reduced-precision-reduction flags may round
    split-K partial sums) instead of on fp32 copies of the weights made every call (2 x 3.7M values
    at InternVideo3's layout). Otherwise in fp32: fp32 weights keep their precision, and so does
    the absorbed kernel's fp32 output."""
    if x.dtype == weight.dtype:
        return torch.einsum(equation, x, weight).to(out_dtype)
    return torch.einsum(equation, x.float(), weight.float()).to(out_dtype)


def longest_chunk(cu_seqlens_q: torch.Tensor, max_seqlen_q: int) -> int:
    """`max_seqlen_q` if given (> 0), else the longest chunk read from `cu_seqlens_q` (one host sync;
    callers pass it to stay sync-free, e.g. under CUDA-graph capture)."""
    if max_seqlen_q > 0 or cu_seqlens_q.shape[0] < 2:
        return max(max_seqlen_q, 0)
    return int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())


def per_token_decodes(
    num_tokens: int, cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
    kv_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A chunked prefill as one decode per query token: token `j` of a chunk of `t` in sequence `i`
    is a decode of its own over sequence i's first `cache_seqlens[i] - t + j + 1` rows (the same
    pages, so tokens of one sequence read them from L2 side by side). Returns each token's
    (length `[tq]` int32, block table `[tq, max_blocks]`, kv_start `[tq]` or None), no host sync.
    A contiguous cache `[b, s, d]` is addressed as `b` pages of `s` rows (table entry = sequence)."""
    token = torch.arange(num_tokens, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    seq = torch.searchsorted(cu_seqlens_q[1:], token, right=True)  # [tq] the sequence of each token
    token_seqlens = (cache_seqlens[seq] - cu_seqlens_q[seq + 1] + token + 1).to(torch.int32)  # [tq]
    token_table = seq.to(torch.int32)[:, None] if block_table is None else block_table[seq]
    return token_seqlens, token_table, None if kv_start is None else kv_start[seq]


def _latent_attention_through_decode(
    q_latent, q_rope, kv_cache, cu_seqlens_q, cache_seqlens, softmax_scale, block_table, kv_start, kv_scale,
    one_token_each: bool = False, max_seqlen_q: int = 0, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Absorbed prefill through the split-KV decode kernel. With `max_seqlen_q` > 0 (the longest
    chunk) and heads few enough that two tokens share a tile (`packed_tokens_per_block`: up to 16
    heads), each program packs several tokens of one chunk with all the heads, reading each cache tile
    once for them; otherwise one decode per query token (`per_token_decodes`). `one_token_each` (the
    caller knows every chunk is one token): token i is sequence i's decode, with no per-token gather.
    q_latent `[tq, h, r]` (None for n = 0 layers: the decodes score the RoPE key alone), q_rope
    `[tq, h, 2p]` -> (latent output `[tq, h, r]`, lse `[tq, h]`). `config`: `decode_config`
    overrides (tests)."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton, packed_tokens_per_block

    num_tokens, num_heads, rope_dim = q_rope.shape
    kv_rank = kv_cache.shape[-1] - rope_dim
    if num_tokens == 0:
        return q_rope.new_empty(0, num_heads, kv_rank), q_rope.new_empty(0, num_heads, dtype=torch.float32)
    q = q_rope if q_latent is None else torch.cat((q_latent, q_rope), dim=-1)  # [tq, h, r + 2p] or [tq, h, 2p]
    if one_token_each:
        return latent_decode_triton(
            q, kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table, kv_start, config=config,
            kv_scale=kv_scale,
        )  # fmt: skip
    if max_seqlen_q > 1 and packed_tokens_per_block(num_heads, max_seqlen_q) > 1:
        return latent_decode_triton(
            q, kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table, kv_start, config=config,
            kv_scale=kv_scale, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        )  # fmt: skip
    seqlens, table, start = per_token_decodes(num_tokens, cu_seqlens_q, cache_seqlens, block_table, kv_start)
    return latent_decode_triton(
        q, kv_cache, seqlens, softmax_scale, kv_rank, table, start, config=config, kv_scale=kv_scale
    )


def choose_grouped_prefill_mode(num_new_tokens: int, batch: int, heads_per_group: int) -> str:
    """ "decode" (packed split-KV decodes: `grouped_decode_triton` with query blocks of `T` tokens x the
    group's heads, T = 64 rows // (h/G)) or "flash" (`_prefill_kernel`'s 128-query tiles over the
    group's keys and values) for `grouped_prefill_attention`. The decode route reads each group's
    keys once a query block and splits them over the GPU; a flash tile reads them once for 128 queries
    of one head, but pays 128 rows of MMA work however few tokens it holds: at 8 x 128 GQA on an H100,
    about three passes' worth of cache bytes. So: "decode" while a chunk takes at most two query
    blocks (8 x 128 GQA, 4 heads a group: up to 32 tokens a sequence). Not yet timed: an estimate."""
    tokens_per_seq = cdiv(num_new_tokens, max(1, batch))
    tokens_per_block = max(1, GROUPED_PACKED_ROWS // heads_per_group)
    return "decode" if tokens_per_seq <= 2 * tokens_per_block else "flash"


def grouped_prefill_triton(
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    block_table: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    mode: str = "auto",
    kv_start: torch.Tensor | None = None,
    config: dict | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `grouped_prefill_reference`. `mode`: "flash" (`_prefill_kernel` reading each
    KV group's RoPE key halves and latent slice straight from the cache, paged or not, fp8 widened in
    registers: GQA's flash attention, nothing expanded), "decode" (split-KV grouped decodes whose
    query blocks pack a few tokens of one chunk with the group's heads, `grouped_decode_triton`) or
    "auto" (`choose_grouped_prefill_mode`). `max_seqlen_q`: the longest chunk (0 = read it, one host
    sync). `config` overrides `prefill_config` (flash) or `grouped_decode_config` (decode) entries."""
    from m2la.kernels.latent_decode.triton import grouped_decode_triton

    num_tokens, num_heads, width = q_rope.shape
    batch = cu_seqlens_q.shape[0] - 1
    per_group, value_dim = num_heads // head_groups, kv_rank // head_groups
    assert cu_seqlens_q.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    assert (kv_scale is not None) == is_fp8(kv_cache.dtype), "fp8 caches (and only they) take kv_scale"
    if mode == "auto":
        mode = choose_grouped_prefill_mode(num_tokens, batch, per_group)
    if mode not in ("flash", "decode"):
        raise ValueError(f"mode must be 'auto', 'flash' or 'decode', got {mode!r}")
    if num_tokens == 0 or batch == 0:
        return q_rope.new_empty(0, num_heads, value_dim), q_rope.new_empty(0, num_heads, dtype=torch.float32)
    max_seqlen_q = longest_chunk(cu_seqlens_q, max_seqlen_q)
    if mode == "decode":
        return grouped_decode_triton(
            q_rope, kv_cache, cache_seqlens, softmax_scale, kv_rank, head_groups, block_table, kv_start,
            config=config, kv_scale=kv_scale, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        )  # fmt: skip
    out = torch.empty(num_tokens, num_heads, value_dim, device=q_rope.device, dtype=q_rope.dtype)
    lse = torch.empty(num_tokens, num_heads, device=q_rope.device, dtype=torch.float32)
    dtype = q_rope.dtype if kv_scale is not None else kv_cache.dtype  # what the MMAs run in
    q_rope = q_rope.to(dtype)
    latent, k_rope = kv_cache[..., :kv_rank], kv_cache[..., kv_rank:]
    block_size = kv_cache.shape[1] if block_table is not None else 1
    pairs = width // 2
    # head h reads group h // (h/G): RoPE key halves at r + gP and r + p + gP, values at g * r/G
    _launch(q_rope[..., :0], q_rope, latent, k_rope, latent, block_table, cu_seqlens_q, cache_seqlens, kv_start,
            out, lse, softmax_scale, block_size, (0, pairs, value_dim), max_seqlen_q, config, kv_scale,
            kv_group_size=per_group, rope_half_stride=head_groups * pairs)  # fmt: skip
    return out, lse


def latent_prefill_triton(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    mode: str = "auto",
    kv_start: torch.Tensor | None = None,
    config: dict | None = None,
    kv_scale: torch.Tensor | None = None,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `latent_prefill_reference`. `mode`: "decode" (absorbed, split-KV decodes:
    `_latent_attention_through_decode`), "absorbed" (absorbed, this file's kernel), "expanded" or "auto"
    (`choose_prefill_mode`).

    `max_seqlen_q` / `max_seqlen_k` (0 = read from `cu_seqlens_q` / `cache_seqlens`, one host sync
    each): the longest chunk and the longest cached sequence (chunk included); with both given the
    call never syncs, so it can be captured in a CUDA graph. Expanded mode gathers `max_seqlen_k`
    rows per sequence, so it must be at least `cache_seqlens.max()` (an asynchronous device-side check).

    `config` overrides entries of `prefill_config` (tile sizes, warps, stages) for tuning sweeps.
    An fp8 cache (with `kv_scale`) computes in q_nope's dtype; otherwise in the cache dtype.
    """
    num_tokens, num_heads, nope_dim = q_nope.shape
    kv_rank, value_dim = w_uk.shape[1], w_uv.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    assert cu_seqlens_q.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    assert kv_start is None or kv_start.dtype == torch.int32
    assert kv_cache.stride(-1) == 1
    assert (kv_scale is not None) == is_fp8(kv_cache.dtype), "fp8 caches (and only they) take kv_scale"
    if mode == "auto":
        mode = choose_prefill_mode(num_tokens, batch, kv_rank, nope_dim, value_dim, q_rope.shape[2])
    dtype = q_nope.dtype if kv_scale is not None else kv_cache.dtype  # what the GEMMs run in
    q_rope = q_rope.to(dtype)
    if mode != "decode":
        max_seqlen_q = longest_chunk(cu_seqlens_q, max_seqlen_q)
    if mode in ("decode", "absorbed"):
        if mode == "decode" and nope_dim == 0:  # n = 0: no latent query; the decodes score the RoPE key alone
            q_latent = None
        else:
            q_latent = _absorption_product("thn,hrn->thr", q_nope, w_uk, dtype)  # [tq, h, r]
        if mode == "decode":
            out_latent, lse = _latent_attention_through_decode(
                q_latent, q_rope, kv_cache, cu_seqlens_q, cache_seqlens, softmax_scale, block_table, kv_start,
                kv_scale, one_token_each=max_seqlen_q == 1 and num_tokens == batch,  # chunks <= 1 summing to b
                max_seqlen_q=max_seqlen_q,
            )  # fmt: skip
        else:
            lse = torch.empty(num_tokens, num_heads, device=q_nope.device, dtype=torch.float32)
            block_size = kv_cache.shape[1] if block_table is not None else 1
            out_latent = torch.empty(num_tokens, num_heads, kv_rank, device=q_nope.device, dtype=torch.float32)
            latent, k_rope = kv_cache[..., :kv_rank], kv_cache[..., kv_rank:]
            _launch(q_latent, q_rope, latent, k_rope, latent, block_table, cu_seqlens_q, cache_seqlens, kv_start,
                    out_latent, lse, softmax_scale, block_size, (0, 0, 0), max_seqlen_q, config, kv_scale)  # fmt: skip
        # einsum batches over heads and returns an [h, tq, v] buffer viewed as [tq, h, v]; the op's
        # fake (and every other route) gives a contiguous [tq, h, v], which compiled code relies on
        return _absorption_product("thr,hrv->thv", out_latent, w_uv, q_nope.dtype).contiguous(), lse
    if mode != "expanded":
        raise ValueError(f"mode must be 'auto', 'decode', 'absorbed' or 'expanded', got {mode!r}")
    if max_seqlen_k <= 0:  # host sync; pass it to stay sync-free
        max_seqlen_k = int(cache_seqlens.max().item()) if batch else 0
    elif batch:  # checked on the device, no sync (a device-side assert on CUDA): a short gather would be read past
        torch._assert_async(
            cache_seqlens.max() <= max_seqlen_k, f"max_seqlen_k={max_seqlen_k} < the longest cache_seqlens"
        )
    k_nope, k_rope, values = expand_cache_prefix(
        kv_cache, w_uk, w_uv, block_table, batch, max_seqlen_k, dtype, kv_scale
    )
    out, lse = expanded_prefill_attention(
        q_nope.to(dtype), q_rope, k_nope, k_rope, values, cu_seqlens_q, cache_seqlens, softmax_scale,
        max_seqlen_q, kv_start, config, out_dtype=q_nope.dtype,
    )  # fmt: skip
    return out, lse
