"""Fused split-KV absorbed decode over the latent cache (Triton).

Two kernels:

1. `_decode_split_kernel`, grid `(b, head tiles, splits * value tiles)`: each program owns one
   sequence, `BLOCK_H` query heads (all heads share the one latent KV row, so heads are the M
   dimension of both matmuls), one contiguous slice of the sequence and one `BLOCK_V`-wide slice of
   the latent value columns. It streams `BLOCK_N` cache rows at a time (through the block table when
   paged), computes scores over `[latent | rope]`, runs an online softmax in base 2 and writes a
   normalised partial output plus its log-sum-exp. The split count comes from the cache capacity
   (host shapes only, so no sync and one CUDA graph for every step); each sequence cuts its own
   visible range into that many runs on the device (`SPLIT_BY_LENGTH`), so a short sequence in a
   long static cache or a ragged batch still spreads over every split.
2. `_decode_combine_kernel`, grid `(b * h, value tiles)`: merges the splits by their LSEs, reading
   only splits that saw a token (empty splits write no partial output).

Two tilings (see `decode_config`):

- resident (h <= 32, r <= 1024): the whole latent query row block `[BLOCK_H, next_pow2(r)]` is
  loaded once; each cache tile is read once and serves as both keys and values (one value tile).
  Measured fastest on an H100 (benchmarks/RESULTS.md). For r <= 512 the default is its transposed
  form, `_decode_split_kernel_heads_on_n` (heads on the MMA N dimension, so sm_90 runs wgmma); at
  r = 896 heads stay on M and the latent loads as exact pieces (80-85% of copy bandwidth).
- chunked (more heads or wider latents): scores in `BLOCK_D`-wide chunks, 64-head tiles so sm_90
  uses wgmma, value columns split into tiles of 256 to bound the fp32 accumulator
  (BLOCK_H x BLOCK_V); the score chunks are recomputed per value tile, served from L2.

Both resident tilings take `LATENT_PIECES`: the latent columns as up to three exact power-of-two
pieces (896 = 512 + 256 + 128) with an accumulator each, instead of one zero-padded next_pow2(r)
tile.

fp8 caches (`HAS_SCALE`): tiles are loaded as fp8 (half the bytes of bf16) and widened to q's
dtype in registers; each token's fp32 scale multiplies its score and its value weight, so no
dequantized tile is ever written. Widening costs registers, so fp8 caches have a tile default of
their own (`decode_config(fp8=True)`). Two options of the heads-on-M tiling target fp8 tiles:
`TRANSPOSED_KEYS` (the scores read a second, `[D, N]` load of the keys, so triton pipelines both
fp8 loads into shared memory instead of transposing a widened tile in registers) and
`FP8_AS_FP16` (the MMAs run in fp16, one widening instruction per pair of fp8 values instead of
three for bf16; the query is shifted by a power of two into fp16's range).

`TMA` (heads-on-N tiles, contiguous 16- or 32-bit caches; not a default, not yet timed): the cache
tiles load through device-side tensor descriptors bounded to each sequence's visible rows, straight
into shared memory, so both MMAs run on wgmma without staging the tile through registers (the sm_90
compile of the 896 + 128 tile: 8 B of spills with triton 3.6, no mma.sync). Rows out of bounds read
as zeros, so the loads need no masks. `benchmarks/tma_decode_probe.py --run` times it on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

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
from m2la.kernels._paging import cache_capacity
from m2la.quantization import is_fp8

_LOG2E = 1.4426950408889634


@triton.jit
def _split_token_range(seqlens_ptr, kv_start_ptr, seq, split, split_len, num_splits, HAS_KV_START: tl.constexpr,
                       SPLIT_BY_LENGTH: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """First visible position and the `[lo, hi)` token range of this split (lo a multiple of BLOCK_N).

    SPLIT_BY_LENGTH: the sequence's own visible range `[first, seqlen)` (first rounded down to
    BLOCK_N) is cut into `num_splits` equal runs of whole tiles, so every split of a short sequence
    in a long cache (a static cache, a ragged batch, a sliding window) gets work. Else the cache
    capacity is cut into runs of `split_len` (host-computed) and splits past the length are empty."""
    seqlen = tl.load(seqlens_ptr + seq)
    first = 0
    if HAS_KV_START:
        first = tl.load(kv_start_ptr + seq)
    base = (first // BLOCK_N) * BLOCK_N
    origin = 0  # where split 0 starts
    if SPLIT_BY_LENGTH:
        origin = base
        split_len = tl.cdiv(tl.maximum(seqlen - base, 0), num_splits * BLOCK_N) * BLOCK_N  # whole tiles
    lo = tl.maximum(origin + split * split_len, base)
    hi = tl.minimum(origin + (split + 1) * split_len, seqlen)
    return first, lo, hi


@triton.jit
def _softmax_norm_and_lse(m_i, l_i):
    """Divisor for the accumulator (1 where nothing was visible, so the output is 0) and the natural
    log-sum-exp (-inf there), from the base-2 running max `m_i` and sum `l_i`."""
    nonempty = l_i > 0.0
    norm = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, (m_i + tl.log2(norm)) * 0.6931471805599453, float("-inf"))
    return norm, lse


@triton.jit
def _tile_slots(
    block_table_ptr, seq, start, first, hi, block_size, stride_bt_b,
    PAGED: tl.constexpr, PAGE_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Token positions `[BLOCK_N]` of the tile at `start`, which of them are visible, and where they
    live: cache dim-0 index (int64; a scalar under PAGE_TILE) and dim-1 index `[BLOCK_N]`.
    PAGE_TILE: PAGED and block_size % BLOCK_N == 0, so the tile never crosses a page: one scalar
    block-table read, contiguous rows; else a per-row gather."""
    offs_n = start + tl.arange(0, BLOCK_N)
    visible = (offs_n < hi) & (offs_n >= first)
    if PAGE_TILE:  # start is a multiple of BLOCK_N, so the tile lies in page start // block_size
        block = tl.load(block_table_ptr + seq * stride_bt_b + start // block_size).to(tl.int64)
        slot = start % block_size + tl.arange(0, BLOCK_N)
    elif PAGED:
        block = tl.load(block_table_ptr + seq * stride_bt_b + offs_n // block_size, mask=visible, other=0)
        block = block.to(tl.int64)
        slot = offs_n % block_size
    else:
        block = seq.to(tl.int64)
        slot = offs_n
    return offs_n, visible, block, slot


@triton.jit
def _token_scales(scale_ptr, block, slot, visible, stride_sc_blk, stride_sc_tok, HAS_SCALE: tl.constexpr):
    """fp8 caches: each visible token's fp32 scale `[BLOCK_N]` (0 where hidden). Without HAS_SCALE
    the result is a placeholder nobody reads (compiled away)."""
    if HAS_SCALE:
        return tl.load(scale_ptr + block * stride_sc_blk + slot * stride_sc_tok, mask=visible, other=0.0)
    return visible.to(tl.float32)


@triton.jit
def _load_latent_piece(rows, start: tl.constexpr, WIDTH: tl.constexpr, visible, kv_rank, compute_dtype):
    """Cache columns `[start, start + WIDTH)` of a tile's rows `[BLOCK_N, 1]` -> `[BLOCK_N, WIDTH]` in
    `compute_dtype` (hidden rows and columns past the latent read as 0; widens fp8)."""
    offs = start + tl.arange(0, WIDTH)
    return tl.load(rows + offs[None, :], mask=visible[:, None] & (offs[None, :] < kv_rank), other=0.0).to(compute_dtype)


@triton.jit
def _load_latent_piece_t(rows_t, start: tl.constexpr, WIDTH: tl.constexpr, visible, kv_rank, compute_dtype):
    """`_load_latent_piece` transposed, from row pointers `rows_t [1, BLOCK_N]` -> `[WIDTH, BLOCK_N]`."""
    offs = start + tl.arange(0, WIDTH)
    return tl.load(rows_t + offs[:, None], mask=visible[None, :] & (offs[:, None] < kv_rank), other=0.0).to(
        compute_dtype
    )


@triton.jit
def _piece_scores(q, k, rows_t, start: tl.constexpr, WIDTH: tl.constexpr, visible, kv_rank, compute_dtype,
                  DOT_PRECISION: tl.constexpr, TRANSPOSED_KEYS: tl.constexpr):  # fmt: skip
    """Scores of one latent piece, `q [BLOCK_H, WIDTH] @ k^T` -> `[BLOCK_H, BLOCK_N]`: through `tl.trans`
    of the loaded key piece `k [BLOCK_N, WIDTH]`, or (TRANSPOSED_KEYS) a second load of the same
    columns as `[WIDTH, BLOCK_N]` from row pointers `rows_t [1, BLOCK_N]`."""
    if TRANSPOSED_KEYS:
        k_t = _load_latent_piece_t(rows_t, start, WIDTH, visible, kv_rank, compute_dtype)
        return tl.dot(q, k_t, input_precision=DOT_PRECISION)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)


@triton.jit
def _query_rope_start(kv_rank, ROPE_ONLY: tl.constexpr):
    """Column of q where its RoPE query starts: 0 when q holds it alone (ROPE_ONLY), else after r."""
    if ROPE_ONLY:
        start = 0
    else:
        start = kv_rank
    return start


@triton.jit
def _query_to_fp16(q, q_shift):
    """`q / q_shift` in fp16: `q_shift` is a power of two near |q|'s max, so fp16's range holds it."""
    return (q * (1.0 / q_shift)).to(tl.float16)


@triton.jit
def _load_query_piece_t(q_cols, start: tl.constexpr, WIDTH: tl.constexpr, head_ok, kv_rank):
    """Latent query columns `[start, start + WIDTH)`, transposed: `[WIDTH, BLOCK_H]` (0 past the latent)."""
    offs = start + tl.arange(0, WIDTH)
    return tl.load(q_cols + offs[:, None], mask=(offs[:, None] < kv_rank) & head_ok[None, :], other=0.0)


@triton.jit
def _load_query_piece(q_rows, start: tl.constexpr, WIDTH: tl.constexpr, head_ok, kv_rank):
    """Latent query columns `[start, start + WIDTH)` -> `[BLOCK_H, WIDTH]` (0 past the latent)."""
    offs = start + tl.arange(0, WIDTH)
    return tl.load(q_rows + offs[None, :], mask=head_ok[:, None] & (offs[None, :] < kv_rank), other=0.0)


@triton.jit
def _store_output_piece(po, start: tl.constexpr, WIDTH: tl.constexpr, acc, norm, head_mask, kv_rank):
    offs = start + tl.arange(0, WIDTH)
    tl.store(po + offs[None, :], acc / norm[:, None], mask=head_mask[:, None] & (offs[None, :] < kv_rank))


@triton.jit
def _store_output_piece_t(po, start: tl.constexpr, WIDTH: tl.constexpr, acc_t, norm, head_mask, kv_rank):
    offs = start + tl.arange(0, WIDTH)
    tl.store(po + offs[:, None], acc_t / norm[None, :], mask=(offs[:, None] < kv_rank) & head_mask[None, :])


@triton.jit
def _query_rows(
    cu_seqlens_q_ptr, block_id, blocks_per_seq, tokens_per_block, head_base, row_heads, num_heads,
    PACKED: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The query rows of one split program's tile: row m is one (query token, head).

    Not PACKED: the program's query block is sequence `block_id`'s one token; row m is head
    `head_base + m`, used while m < `row_heads` and the head < `num_heads`. PACKED (a chunked
    prefill's short chunks): block `block_id = i * blocks_per_seq + j` is tokens `[j T, (j+1) T)` of
    sequence i's chunk (`cu_seqlens_q`, T = `tokens_per_block`); row m is token `m // row_heads` of
    the block and head `head_base + m % row_heads`, so the block's tokens share each cache tile.
    -> (seq, head [BLOCK_H], row_ok [BLOCK_H], token: the rows' query index (the scalar seq, or
    `[BLOCK_H]` int64 under PACKED), and under PACKED the chunk length, the block's first token in
    the chunk and each row's token in the chunk). Callers form row addresses as `token * stride_t +
    head * stride_h` where they use them, so nothing extra stays live across the token loop."""
    offs_m = tl.arange(0, BLOCK_H)
    if PACKED:
        seq = block_id // blocks_per_seq
        first_token = (block_id % blocks_per_seq) * tokens_per_block
        chunk_start = tl.load(cu_seqlens_q_ptr + seq)
        chunk_len = tl.load(cu_seqlens_q_ptr + seq + 1) - chunk_start
        token_in_block = offs_m // row_heads
        token_in_chunk = first_token + token_in_block
        head = head_base + offs_m % row_heads
        row_ok = (token_in_block < tokens_per_block) & (token_in_chunk < chunk_len) & (head < num_heads)
        token = (chunk_start + token_in_chunk).to(tl.int64)
    else:
        seq = block_id
        chunk_len = 1
        first_token = 0
        token_in_chunk = 0
        head = head_base + offs_m
        row_ok = (offs_m < row_heads) & (head < num_heads)
        token = seq
    return seq, head, row_ok, token, chunk_len, first_token, token_in_chunk


@triton.jit
def _plain_query_rows(
    cu_seqlens_q_ptr, head_tile, blocks_per_seq, tokens_per_block, num_heads, PACKED: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """`_query_rows` for the plain split kernels: PACKED rows hold every head (one head tile);
    otherwise head tile `head_tile`'s heads of sequence `program_id(0)`, computed as the kernels did
    before packing (the same compiled code)."""
    if PACKED:
        seq, offs_h, head_ok, token, chunk_len, first_token, token_in_chunk = _query_rows(
            cu_seqlens_q_ptr, tl.program_id(0), blocks_per_seq, tokens_per_block, 0, num_heads, num_heads, PACKED,
            BLOCK_H,
        )  # fmt: skip
    else:
        seq = tl.program_id(0)
        token = seq
        offs_h = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        head_ok = offs_h < num_heads
        chunk_len = 1
        first_token = 0
        token_in_chunk = 0
    return seq, offs_h, head_ok, token, chunk_len, first_token, token_in_chunk


@triton.jit
def _as_rows(token, PACKED: tl.constexpr):
    """`_query_rows`' token as a `[BLOCK_H, 1]` column (PACKED) or the scalar sequence index."""
    if PACKED:
        rows = token[:, None]
    else:
        rows = token
    return rows


@triton.jit
def _as_cols(token, PACKED: tl.constexpr):
    """`_query_rows`' token as a `[1, BLOCK_H]` row (PACKED) or the scalar sequence index."""
    if PACKED:
        cols = token[None, :]
    else:
        cols = token
    return cols


@triton.jit
def _causal_rows(seqlens_ptr, seq, lo, hi, chunk_len, first_token, token_in_chunk, tokens_per_block):
    """PACKED rows: each row's causal end (keys `< row_end` visible; `[BLOCK_H]`) and the split's `hi`
    cut at the block's last token (and to `lo`, nothing, for a block past its chunk's end)."""
    seqlen = tl.load(seqlens_ptr + seq)
    row_end = seqlen - chunk_len + token_in_chunk + 1
    hi = tl.minimum(hi, seqlen - chunk_len + tl.minimum(first_token + tokens_per_block, chunk_len))
    hi = tl.where(first_token < chunk_len, hi, lo)
    return row_end, hi


# num_splits follows the cache's tile count: no value specialisation (== 1, multiple of 16), so a
# growing cache never compiles new variants of the kernel.
@triton.jit(do_not_specialize=["num_splits", "tokens_per_block", "blocks_per_seq"])
def _decode_split_kernel(
    q_ptr, kv_ptr, block_table_ptr, seqlens_ptr, kv_start_ptr, kv_scale_ptr, cu_seqlens_q_ptr, part_out_ptr,
    part_lse_ptr,
    scale_log2,
    num_heads, kv_rank, rope_dim, block_size, split_len, num_splits, num_value_tiles,
    tokens_per_block, blocks_per_seq,
    stride_q_t, stride_q_h,
    stride_kv_blk, stride_kv_tok,
    stride_sc_blk, stride_sc_tok,
    stride_bt_b,
    stride_po_t, stride_po_h, stride_po_s,
    stride_pl_t, stride_pl_h,
    PAGED: tl.constexpr, PAGE_TILE: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLIT_BY_LENGTH: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SINGLE_D: tl.constexpr, VALUES_FROM_KEYS: tl.constexpr, TRANSPOSED_KEYS: tl.constexpr,
    FP8_AS_FP16: tl.constexpr, ROPE_ONLY: tl.constexpr,
):  # fmt: skip
    # SINGLE_D: BLOCK_D (+ BLOCK_D1 + BLOCK_D2) >= r, so the latent query is loaded once, before the
    # token loop. VALUES_FROM_KEYS: SINGLE_D and one value tile: the values are the key tile.
    # TRANSPOSED_KEYS (SINGLE_D): the scores read a second load of the key tile, as `[D, BLOCK_N]`,
    # so no MMA operand is a transpose. Triton 3.6 transposes a widened fp8 tile in registers, which
    # keeps the tile out of the pipelined copies into shared memory; two loads of the same rows
    # (the second mostly from L2) give two pipelined copies instead.
    # FP8_AS_FP16 (SINGLE_D, fp8 caches): the MMAs run in fp16, which e4m3 and e5m2 widen to in one
    # instruction per pair (bf16 takes three). The query is divided by a power of two near its max
    # (`q_shift`) to stay in fp16's range; value weights by the tile's largest token scale.
    # BLOCK_D1/BLOCK_D2 > 0 (with VALUES_FROM_KEYS, BLOCK_V = BLOCK_D): latent pieces, as in
    # `_decode_split_kernel_heads_on_n`; pieces 1 and 2 keep accumulators of their own.
    # HAS_SCALE: fp8 cache; tiles are widened to q's dtype and each token's scale multiplies its
    # score and its value weight.
    # PACKED: rows are (query token, head) pairs of a chunk's query block (`_query_rows`).
    # ROPE_ONLY (n = 0 layers): q holds the RoPE query `[.., 2p]` alone; the scores read only the
    # RoPE key columns and the latent tiles serve as values only.
    compute_dtype: tl.constexpr = tl.float16 if FP8_AS_FP16 else q_ptr.dtype.element_ty
    head_tile = tl.program_id(1)
    split = tl.program_id(2) // num_value_tiles
    value_tile = tl.program_id(2) % num_value_tiles

    seq, offs_h, head_ok, token, chunk_len, first_token, token_in_chunk = _plain_query_rows(
        cu_seqlens_q_ptr, head_tile, blocks_per_seq, tokens_per_block, num_heads, PACKED, BLOCK_H
    )
    offs_rope = tl.arange(0, BLOCK_ROPE)
    offs_v = value_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    value_ok = offs_v < kv_rank

    first, lo, hi = _split_token_range(
        seqlens_ptr, kv_start_ptr, seq, split, split_len, num_splits, HAS_KV_START, SPLIT_BY_LENGTH, BLOCK_N
    )
    if PACKED:
        row_end, hi = _causal_rows(seqlens_ptr, seq, lo, hi, chunk_len, first_token, token_in_chunk, tokens_per_block)

    q_rows = q_ptr + _as_rows(token, PACKED) * stride_q_t + offs_h[:, None] * stride_q_h  # [BLOCK_H, 1]
    q_rope = tl.load(
        q_rows + _query_rope_start(kv_rank, ROPE_ONLY) + offs_rope[None, :],
        mask=head_ok[:, None] & (offs_rope[None, :] < rope_dim),
        other=0.0,
    )  # [BLOCK_H, BLOCK_ROPE]

    offs_d0 = tl.arange(0, BLOCK_D)
    D1_START: tl.constexpr = BLOCK_D
    D2_START: tl.constexpr = BLOCK_D + BLOCK_D1
    SCORE_LATENT: tl.constexpr = not ROPE_ONLY
    if SINGLE_D and SCORE_LATENT:
        q_latent = _load_query_piece(q_rows, 0, BLOCK_D, head_ok, kv_rank)  # [BLOCK_H, BLOCK_D]
    if BLOCK_D1 > 0:
        if SCORE_LATENT:
            q1 = _load_query_piece(q_rows, D1_START, BLOCK_D1, head_ok, kv_rank)  # [BLOCK_H, BLOCK_D1]
        acc1 = tl.zeros([BLOCK_H, BLOCK_D1], tl.float32)
    if BLOCK_D2 > 0:
        if SCORE_LATENT:
            q2 = _load_query_piece(q_rows, D2_START, BLOCK_D2, head_ok, kv_rank)  # [BLOCK_H, BLOCK_D2]
        acc2 = tl.zeros([BLOCK_H, BLOCK_D2], tl.float32)
    q_shift = 1.0
    if FP8_AS_FP16:
        q_amax = tl.max(tl.abs(q_rope.to(tl.float32)))
        if SCORE_LATENT:
            q_amax = tl.maximum(q_amax, tl.max(tl.abs(q_latent.to(tl.float32))))
            if BLOCK_D1 > 0:
                q_amax = tl.maximum(q_amax, tl.max(tl.abs(q1.to(tl.float32))))
            if BLOCK_D2 > 0:
                q_amax = tl.maximum(q_amax, tl.max(tl.abs(q2.to(tl.float32))))
        q_shift = tl.where(q_amax > 0.0, tl.exp2(tl.floor(tl.log2(q_amax))), 1.0)
        q_rope = _query_to_fp16(q_rope, q_shift)
        if SCORE_LATENT:
            q_latent = _query_to_fp16(q_latent, q_shift)
            if BLOCK_D1 > 0:
                q1 = _query_to_fp16(q1, q_shift)
            if BLOCK_D2 > 0:
                q2 = _query_to_fp16(q2, q_shift)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, base-2 scaled
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n, visible, block, slot = _tile_slots(
            block_table_ptr, seq, start, first, hi, block_size, stride_bt_b, PAGED, PAGE_TILE, BLOCK_N
        )
        rows = kv_ptr + (block * stride_kv_blk + slot * stride_kv_tok)[:, None]  # [BLOCK_N, 1]
        token_scale = _token_scales(kv_scale_ptr, block, slot, visible, stride_sc_blk, stride_sc_tok, HAS_SCALE)

        rows_t = tl.trans(rows)  # [1, BLOCK_N]; read only under TRANSPOSED_KEYS
        if SINGLE_D:  # ROPE_ONLY: the latent tiles are values only (piece 0 not even that without VALUES_FROM_KEYS)
            scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
            if SCORE_LATENT or VALUES_FROM_KEYS:
                k_latent = _load_latent_piece(rows, 0, BLOCK_D, visible, kv_rank, compute_dtype)  # [BLOCK_N, BLOCK_D]
            if SCORE_LATENT:
                scores += _piece_scores(q_latent, k_latent, rows_t, 0, BLOCK_D, visible, kv_rank, compute_dtype,
                                        DOT_PRECISION, TRANSPOSED_KEYS)  # fmt: skip
            if BLOCK_D1 > 0:
                k1 = _load_latent_piece(rows, D1_START, BLOCK_D1, visible, kv_rank, compute_dtype)
                if SCORE_LATENT:
                    scores += _piece_scores(q1, k1, rows_t, D1_START, BLOCK_D1, visible, kv_rank, compute_dtype,
                                            DOT_PRECISION, TRANSPOSED_KEYS)  # fmt: skip
            if BLOCK_D2 > 0:
                k2 = _load_latent_piece(rows, D2_START, BLOCK_D2, visible, kv_rank, compute_dtype)
                if SCORE_LATENT:
                    scores += _piece_scores(q2, k2, rows_t, D2_START, BLOCK_D2, visible, kv_rank, compute_dtype,
                                            DOT_PRECISION, TRANSPOSED_KEYS)  # fmt: skip
        else:
            scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
            if SCORE_LATENT:  # not under ROPE_ONLY
                for d0 in range(0, kv_rank, BLOCK_D):
                    offs_d = d0 + offs_d0
                    d_ok = offs_d < kv_rank
                    q_chunk = tl.load(q_rows + offs_d[None, :], mask=head_ok[:, None] & d_ok[None, :], other=0.0)
                    k_chunk = tl.load(rows + offs_d[None, :], mask=visible[:, None] & d_ok[None, :], other=0.0)
                    scores += tl.dot(q_chunk, tl.trans(k_chunk.to(compute_dtype)), input_precision=DOT_PRECISION)
        if TRANSPOSED_KEYS:
            k_rope_t = tl.load(
                rows_t + kv_rank + offs_rope[:, None],
                mask=visible[None, :] & (offs_rope[:, None] < rope_dim),
                other=0.0,
            ).to(compute_dtype)  # [BLOCK_ROPE, BLOCK_N]
            scores += tl.dot(q_rope, k_rope_t, input_precision=DOT_PRECISION)
        else:
            k_rope = tl.load(
                rows + kv_rank + offs_rope[None, :],
                mask=visible[:, None] & (offs_rope[None, :] < rope_dim),
                other=0.0,
            ).to(compute_dtype)  # [BLOCK_N, BLOCK_ROPE]
            scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=DOT_PRECISION)
        if HAS_SCALE:
            scores = scores * (token_scale * q_shift)[None, :]
        if PACKED:
            seen = visible[None, :] & (offs_n[None, :] < row_end[:, None])  # [BLOCK_H, BLOCK_N]
        else:
            seen = visible[None, :]
        scores = tl.where(seen, scores * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-hidden rows: avoid -inf - -inf
        probs = tl.exp2(scores - m_safe[:, None])  # [BLOCK_H, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        if VALUES_FROM_KEYS:
            values = k_latent
        else:
            values = tl.load(rows + offs_v[None, :], mask=visible[:, None] & value_ok[None, :], other=0.0)
            values = values.to(compute_dtype)
        tile_scale = 1.0  # FP8_AS_FP16: the tile's largest token scale, kept out of the fp16 weights
        if FP8_AS_FP16:
            tile_scale = tl.max(token_scale)
            tile_scale = tl.where(tile_scale > 0.0, tile_scale, 1.0)
            probs = probs * (token_scale / tile_scale)[None, :]
            alpha = alpha / tile_scale  # acc is rescaled back below, one multiply per element as before
        elif HAS_SCALE:
            probs = probs * token_scale[None, :]  # value weights; l_i keeps the unscaled sum
        probs = probs.to(compute_dtype)
        acc = acc * alpha[:, None] + tl.dot(probs, values, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            acc1 = acc1 * alpha[:, None] + tl.dot(probs, k1, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            acc2 = acc2 * alpha[:, None] + tl.dot(probs, k2, input_precision=DOT_PRECISION)
        if FP8_AS_FP16:
            acc = acc * tile_scale
            if BLOCK_D1 > 0:
                acc1 = acc1 * tile_scale
            if BLOCK_D2 > 0:
                acc2 = acc2 * tile_scale
        m_i = m_new

    norm, lse = _softmax_norm_and_lse(m_i, l_i)
    out = acc / norm[:, None]
    po = part_out_ptr + _as_rows(token, PACKED) * stride_po_t + offs_h[:, None] * stride_po_h + split * stride_po_s
    written = head_ok & (l_i > 0.0)  # heads that saw no token write only their LSE (-inf); the combine skips them
    tl.store(po + offs_v[None, :], out, mask=written[:, None] & value_ok[None, :])
    if BLOCK_D1 > 0:
        _store_output_piece(po, D1_START, BLOCK_D1, acc1, norm, written, kv_rank)
    if BLOCK_D2 > 0:
        _store_output_piece(po, D2_START, BLOCK_D2, acc2, norm, written, kv_rank)
    pl = part_lse_ptr + token * stride_pl_t + offs_h * stride_pl_h + split
    if value_tile == 0:  # every value tile computed the same LSE
        tl.store(pl, lse, mask=head_ok)


@triton.jit(do_not_specialize=["num_splits", "tokens_per_block", "blocks_per_seq"])  # as `_decode_split_kernel`
def _decode_split_kernel_heads_on_n(
    q_ptr, kv_ptr, block_table_ptr, seqlens_ptr, kv_start_ptr, kv_scale_ptr, cu_seqlens_q_ptr, part_out_ptr,
    part_lse_ptr,
    scale_log2,
    num_heads, kv_rank, rope_dim, block_size, split_len, num_splits, num_value_tiles,
    tokens_per_block, blocks_per_seq,
    stride_q_t, stride_q_h,
    stride_kv_blk, stride_kv_tok,
    stride_sc_blk, stride_sc_tok,
    stride_bt_b,
    stride_po_t, stride_po_h, stride_po_s,
    stride_pl_t, stride_pl_h,
    PAGED: tl.constexpr, PAGE_TILE: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLIT_BY_LENGTH: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    ROPE_ONLY: tl.constexpr,
):  # fmt: skip
    """The resident tiling transposed: tokens and latent columns are the M dimension of the two
    matmuls and heads the N dimension (scores^T = K q^T, out^T = K^T p^T), so 32 heads fill whole
    64-row MMA tiles (wgmma on sm_90) instead of padding heads to the M tile. One value tile
    (latent width covered), same arguments and outputs as `_decode_split_kernel`.

    The latent columns come in up to three power-of-two pieces `BLOCK_D, BLOCK_D1, BLOCK_D2` (0 =
    absent; see `latent_pieces`): 448 = 256 + 128 + 64 and 896 = 512 + 256 + 128 exactly, where one
    padded tile of next_pow2(r) spends 1/8 of its MMA work and shared memory on zero columns.

    TMA (contiguous 16- or 32-bit caches, not paged, no fp8): the cache tiles load through device-side
    tensor descriptors over this sequence's visible rows `[first, seqlen)`, straight into shared
    memory where both MMAs read them (wgmma on sm_90); rows outside those bounds read as zeros, so
    no tile needs a mask on its loads (hidden rows may hold NaN) and only the scores are masked.
    Latent pieces read past r into the RoPE columns, which the zero query columns cancel.

    ROPE_ONLY (n = 0 layers): q holds the RoPE query alone; the latent pieces are values only."""
    compute_dtype = q_ptr.dtype.element_ty
    head_tile = tl.program_id(1)
    split = tl.program_id(2)
    D1_START: tl.constexpr = BLOCK_D
    D2_START: tl.constexpr = BLOCK_D + BLOCK_D1

    seq, offs_h, head_ok, token, chunk_len, first_token, token_in_chunk = _plain_query_rows(
        cu_seqlens_q_ptr, head_tile, blocks_per_seq, tokens_per_block, num_heads, PACKED, BLOCK_H
    )
    offs_rope = tl.arange(0, BLOCK_ROPE)

    first, lo, hi = _split_token_range(
        seqlens_ptr, kv_start_ptr, seq, split, split_len, num_splits, HAS_KV_START, SPLIT_BY_LENGTH, BLOCK_N
    )
    if PACKED:
        row_end, hi = _causal_rows(seqlens_ptr, seq, lo, hi, chunk_len, first_token, token_in_chunk, tokens_per_block)

    q_cols = q_ptr + _as_cols(token, PACKED) * stride_q_t + offs_h[None, :] * stride_q_h  # [1, BLOCK_H]
    SCORE_LATENT: tl.constexpr = not ROPE_ONLY
    if SCORE_LATENT:
        q0_t = _load_query_piece_t(q_cols, 0, BLOCK_D, head_ok, kv_rank)  # [BLOCK_D, BLOCK_H]
    acc0_t = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)
    if BLOCK_D1 > 0:
        if SCORE_LATENT:
            q1_t = _load_query_piece_t(q_cols, D1_START, BLOCK_D1, head_ok, kv_rank)  # [BLOCK_D1, BLOCK_H]
        acc1_t = tl.zeros([BLOCK_D1, BLOCK_H], tl.float32)
    if BLOCK_D2 > 0:
        if SCORE_LATENT:
            q2_t = _load_query_piece_t(q_cols, D2_START, BLOCK_D2, head_ok, kv_rank)  # [BLOCK_D2, BLOCK_H]
        acc2_t = tl.zeros([BLOCK_D2, BLOCK_H], tl.float32)
    q_rope_t = tl.load(
        q_cols + _query_rope_start(kv_rank, ROPE_ONLY) + offs_rope[:, None],
        mask=(offs_rope[:, None] < rope_dim) & head_ok[None, :],
        other=0.0,
    )  # [BLOCK_ROPE, BLOCK_H]

    if TMA:  # descriptors over rows [first, seqlen) of this sequence, `[BLOCK_N, piece]` boxes
        visible_rows = kv_ptr + seq.to(tl.int64) * stride_kv_blk + first * stride_kv_tok
        bounds = [tl.maximum(tl.load(seqlens_ptr + seq) - first, 0), kv_rank + rope_dim]
        desc0 = tl.make_tensor_descriptor(visible_rows, bounds, [stride_kv_tok, 1], [BLOCK_N, BLOCK_D])
        if BLOCK_D1 > 0:
            desc1 = tl.make_tensor_descriptor(visible_rows, bounds, [stride_kv_tok, 1], [BLOCK_N, BLOCK_D1])
        if BLOCK_D2 > 0:
            desc2 = tl.make_tensor_descriptor(visible_rows, bounds, [stride_kv_tok, 1], [BLOCK_N, BLOCK_D2])
        desc_rope = tl.make_tensor_descriptor(visible_rows, bounds, [stride_kv_tok, 1], [BLOCK_N, BLOCK_ROPE])

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max per head, base-2 scaled
    l_i = tl.zeros([BLOCK_H], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        if TMA:
            offs_n = start + tl.arange(0, BLOCK_N)
            visible = (offs_n < hi) & (offs_n >= first)
            k0 = desc0.load([start - first, 0])  # [BLOCK_N, BLOCK_D]; rows before `first` read as 0
        else:
            offs_n, visible, block, slot = _tile_slots(
                block_table_ptr, seq, start, first, hi, block_size, stride_bt_b, PAGED, PAGE_TILE, BLOCK_N
            )
            rows = kv_ptr + (block * stride_kv_blk + slot * stride_kv_tok)[:, None]  # [BLOCK_N, 1]
            token_scale = _token_scales(kv_scale_ptr, block, slot, visible, stride_sc_blk, stride_sc_tok, HAS_SCALE)
            k0 = _load_latent_piece(rows, 0, BLOCK_D, visible, kv_rank, compute_dtype)  # [BLOCK_N, BLOCK_D]
        if SCORE_LATENT:
            scores_t = tl.dot(k0, q0_t, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_H]
        else:
            scores_t = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
        if BLOCK_D1 > 0:
            if TMA:
                k1 = desc1.load([start - first, D1_START])
            else:
                k1 = _load_latent_piece(rows, D1_START, BLOCK_D1, visible, kv_rank, compute_dtype)
            if SCORE_LATENT:
                scores_t += tl.dot(k1, q1_t, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            if TMA:
                k2 = desc2.load([start - first, D2_START])
            else:
                k2 = _load_latent_piece(rows, D2_START, BLOCK_D2, visible, kv_rank, compute_dtype)
            if SCORE_LATENT:
                scores_t += tl.dot(k2, q2_t, input_precision=DOT_PRECISION)
        if TMA:
            k_rope = desc_rope.load([start - first, kv_rank])  # columns past r + 2p read as 0
        else:
            k_rope = tl.load(
                rows + kv_rank + offs_rope[None, :], mask=visible[:, None] & (offs_rope[None, :] < rope_dim), other=0.0
            ).to(compute_dtype)  # [BLOCK_N, BLOCK_ROPE]
        scores_t += tl.dot(k_rope, q_rope_t, input_precision=DOT_PRECISION)
        if HAS_SCALE:
            scores_t = scores_t * token_scale[:, None]
        if PACKED:
            seen_t = visible[:, None] & (offs_n[:, None] < row_end[None, :])  # [BLOCK_N, BLOCK_H]
        else:
            seen_t = visible[:, None]
        scores_t = tl.where(seen_t, scores_t * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores_t, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-hidden heads: avoid -inf - -inf
        probs_t = tl.exp2(scores_t - m_safe[None, :])  # [BLOCK_N, BLOCK_H]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(probs_t, axis=0)
        if HAS_SCALE:
            probs_t = probs_t * token_scale[:, None]  # value weights; l_i keeps the unscaled sum
        probs_t = probs_t.to(compute_dtype)
        acc0_t = acc0_t * alpha[None, :] + tl.dot(tl.trans(k0), probs_t, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            acc1_t = acc1_t * alpha[None, :] + tl.dot(tl.trans(k1), probs_t, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            acc2_t = acc2_t * alpha[None, :] + tl.dot(tl.trans(k2), probs_t, input_precision=DOT_PRECISION)
        m_i = m_new

    norm, lse = _softmax_norm_and_lse(m_i, l_i)
    po = part_out_ptr + _as_cols(token, PACKED) * stride_po_t + offs_h[None, :] * stride_po_h + split * stride_po_s
    written = head_ok & (l_i > 0.0)  # heads that saw no token write only their LSE (-inf); the combine skips them
    _store_output_piece_t(po, 0, BLOCK_D, acc0_t, norm, written, kv_rank)
    if BLOCK_D1 > 0:
        _store_output_piece_t(po, D1_START, BLOCK_D1, acc1_t, norm, written, kv_rank)
    if BLOCK_D2 > 0:
        _store_output_piece_t(po, D2_START, BLOCK_D2, acc2_t, norm, written, kv_rank)
    tl.store(part_lse_ptr + token * stride_pl_t + offs_h * stride_pl_h + split, lse, mask=head_ok)


@triton.jit(do_not_specialize=["num_splits", "tokens_per_block", "blocks_per_seq"])  # as `_decode_split_kernel`
def _decode_split_kernel_grouped(
    q_ptr, kv_ptr, block_table_ptr, seqlens_ptr, kv_start_ptr, kv_scale_ptr, cu_seqlens_q_ptr, part_out_ptr,
    part_lse_ptr,
    scale_log2,
    heads_per_group, group_rank, group_pairs, kv_rank, rope_pairs, block_size, split_len, num_splits,
    tokens_per_block, blocks_per_seq,
    stride_q_t, stride_q_h,
    stride_kv_blk, stride_kv_tok,
    stride_sc_blk, stride_sc_tok,
    stride_bt_b,
    stride_po_t, stride_po_h, stride_po_s,
    stride_pl_t, stride_pl_h,
    PAGED: tl.constexpr, PAGE_TILE: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLIT_BY_LENGTH: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """A grouped layer's decode (`grouped_decode_attention`): GQA's work over the latent cache. Program
    (query block, group g, split) holds g's heads on the MMA M dimension and reads only g's columns of
    each cache row: latent `[g R, (g+1) R)` (R = `group_rank`, the values) and the two RoPE halves
    `r + [g P, (g+1) P)` and `r + p + [g P, (g+1) P)` (P = `group_pairs`, p = `rope_pairs`). There is no
    latent query (a lossless conversion has no no-RoPE key part). q `[tq, h, 2P]`; partials `[tq, h,
    splits, R]`, merged by `_decode_combine_kernel`.

    Not PACKED: one query token a sequence (query block = sequence). PACKED (a chunked prefill's
    short chunks, `grouped_prefill_triton`'s "decode" mode): query block j of sequence i is tokens
    `[j T, (j+1) T)` of its chunk (`cu_seqlens_q`, T = `tokens_per_block`), and row m of the MMA holds
    token `m // (h/G)` and head `m % (h/G)`: the block's T tokens share each cache tile, which is read
    once for all of them, and each row sees keys up to its own token's position (causal)."""
    compute_dtype = q_ptr.dtype.element_ty
    group = tl.program_id(1)
    split = tl.program_id(2)
    seq, offs_h, row_ok, token, chunk_len, first_token, token_in_chunk = _query_rows(
        cu_seqlens_q_ptr, tl.program_id(0), blocks_per_seq, tokens_per_block, group * heads_per_group,
        heads_per_group, (group + 1) * heads_per_group, PACKED, BLOCK_H,
    )  # fmt: skip
    offs_p = tl.arange(0, BLOCK_P)
    pair_ok = offs_p < group_pairs
    offs_v = tl.arange(0, BLOCK_V)
    value_ok = offs_v < group_rank

    first, lo, hi = _split_token_range(
        seqlens_ptr, kv_start_ptr, seq, split, split_len, num_splits, HAS_KV_START, SPLIT_BY_LENGTH, BLOCK_N
    )
    if PACKED:
        row_end, hi = _causal_rows(seqlens_ptr, seq, lo, hi, chunk_len, first_token, token_in_chunk, tokens_per_block)
    q_rows = q_ptr + _as_rows(token, PACKED) * stride_q_t + offs_h[:, None] * stride_q_h  # [BLOCK_H, 1]
    q_mask = row_ok[:, None] & pair_ok[None, :]
    q_x = tl.load(q_rows + offs_p[None, :], mask=q_mask, other=0.0)  # [BLOCK_H, BLOCK_P]
    q_y = tl.load(q_rows + group_pairs + offs_p[None, :], mask=q_mask, other=0.0)
    x_col = kv_rank + group * group_pairs  # this group's x half of the RoPE key
    y_col = x_col + rope_pairs  # and its y half

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, base-2 scaled
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n, visible, block, slot = _tile_slots(
            block_table_ptr, seq, start, first, hi, block_size, stride_bt_b, PAGED, PAGE_TILE, BLOCK_N
        )
        rows = kv_ptr + (block * stride_kv_blk + slot * stride_kv_tok)[:, None]  # [BLOCK_N, 1]
        token_scale = _token_scales(kv_scale_ptr, block, slot, visible, stride_sc_blk, stride_sc_tok, HAS_SCALE)
        k_mask = visible[:, None] & pair_ok[None, :]
        k_x = tl.load(rows + x_col + offs_p[None, :], mask=k_mask, other=0.0).to(compute_dtype)  # [BLOCK_N, BLOCK_P]
        k_y = tl.load(rows + y_col + offs_p[None, :], mask=k_mask, other=0.0).to(compute_dtype)
        scores = tl.dot(q_x, tl.trans(k_x), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        scores += tl.dot(q_y, tl.trans(k_y), input_precision=DOT_PRECISION)
        if HAS_SCALE:
            scores = scores * token_scale[None, :]
        if PACKED:
            seen = visible[None, :] & (offs_n[None, :] < row_end[:, None])  # [BLOCK_H, BLOCK_N]
        else:
            seen = visible[None, :]
        scores = tl.where(seen, scores * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-hidden rows: avoid -inf - -inf
        probs = tl.exp2(scores - m_safe[:, None])  # [BLOCK_H, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        if HAS_SCALE:
            probs = probs * token_scale[None, :]  # value weights; l_i keeps the unscaled sum
        values = tl.load(
            rows + group * group_rank + offs_v[None, :], mask=visible[:, None] & value_ok[None, :], other=0.0
        ).to(compute_dtype)  # [BLOCK_N, BLOCK_V]
        acc = acc * alpha[:, None] + tl.dot(probs.to(compute_dtype), values, input_precision=DOT_PRECISION)
        m_i = m_new

    norm, lse = _softmax_norm_and_lse(m_i, l_i)
    po = part_out_ptr + _as_rows(token, PACKED) * stride_po_t + offs_h[:, None] * stride_po_h + split * stride_po_s
    written = row_ok & (l_i > 0.0)  # rows that saw no token write only their LSE (-inf); the combine skips them
    tl.store(po + offs_v[None, :], acc / norm[:, None], mask=written[:, None] & value_ok[None, :])
    tl.store(part_lse_ptr + token * stride_pl_t + offs_h * stride_pl_h + split, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    num_heads, num_splits, kv_rank,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pl_b, stride_pl_h,
    stride_o_b, stride_o_h,
    stride_l_b,
    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0) // num_heads
    head = tl.program_id(0) % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    split_ok = offs_s < num_splits
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    value_ok = offs_v < kv_rank

    lse = tl.load(
        part_lse_ptr + seq * stride_pl_b + head * stride_pl_h + offs_s, mask=split_ok, other=float("-inf")
    )  # [BLOCK_S]
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(lse - m_safe)  # empty splits weigh 0
    total = tl.sum(weights, axis=0)
    filled = lse > float("-inf")  # empty splits may not have written their partial (garbage, even NaN)
    parts = tl.load(
        part_out_ptr + seq * stride_po_b + head * stride_po_h + offs_s[:, None] * stride_po_s + offs_v[None, :],
        mask=filled[:, None] & value_ok[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_V]
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_b + head * stride_o_h + offs_v, out, mask=value_ok)
    final_lse = tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + seq * stride_l_b + head, final_lse)


def decode_config(num_heads: int, kv_rank: int, rope_dim: int, interpret: bool, fp8: bool = False) -> dict:
    """Tile sizes for the split kernel (interpreter: small tiles that exercise every loop); `fp8`: the
    cache is fp8 (tiles widened to q's dtype in registers)."""
    pow2 = next_power_of_2
    if interpret:  # small tiles so the tests cover multi-tile loops, chunk masks and value tiles
        return dict(
            BLOCK_H=max(16, min(64, pow2(num_heads))), BLOCK_N=16, BLOCK_D=32,
            BLOCK_ROPE=max(16, pow2(rope_dim)), BLOCK_V=max(16, min(64, pow2(kv_rank))),
            num_warps=4, num_stages=1, PAGE_TILE=True, HEADS_ON_N=False, LATENT_PIECES=False,
        )  # fmt: skip
    resident = dict(
        BLOCK_H=max(16, pow2(num_heads)), BLOCK_N=64, BLOCK_D=pow2(kv_rank), BLOCK_ROPE=max(16, pow2(rope_dim)),
        BLOCK_V=pow2(kv_rank), num_stages=2, PAGE_TILE=True, LATENT_PIECES=False,
    )  # fmt: skip
    if fp8 and num_heads <= 32 and pow2(kv_rank) <= 1024:
        # fp8 tiles: heads on M, 64-token tiles, 8 warps, plus what won the H100 fp8 sweep
        # (2026-11-27, geometric mean of three shapes against the padded heads-on-M tile):
        # r = 448: MMAs in fp16 (0.90x, 1.01x, 0.90x the time); r = 896: exact pieces with the
        # transposed second key load (0.84x, 0.87x, 0.84x). Both still run 1.5-1.6x slower than a bf16
        # cache (widening costs more tensor-core time than the halved bytes save).
        fp8_tile = dict(resident, BLOCK_N=64, num_warps=8, HEADS_ON_N=False)
        if pow2(kv_rank) <= 512:
            return dict(fp8_tile, FP8_AS_FP16=True)
        return dict(fp8_tile, LATENT_PIECES=True, TRANSPOSED_KEYS=True)
    if num_heads <= 32 and pow2(kv_rank) <= 512:
        # Resident latent query, the key tile doubles as the value tile, and heads on the MMA N
        # dimension (64-token and 512-column M tiles: wgmma on sm_90) with one warpgroup. Best of the
        # H100 sweep at r = 448 (geometric mean of three shapes; benchmarks/RESULTS.md).
        return dict(resident, num_warps=4, HEADS_ON_N=True)
    if num_heads <= 32 and pow2(kv_rank) <= 1024:
        # r = 896: heads on M (mma.sync), 8 warps, exact latent pieces 512 + 256 + 128. Fastest on all
        # three H100 sweep shapes (2026-11-27): 0.89x, 0.80x and 0.90x the time of the previous, padded
        # default; 80-85% of copy bandwidth from b=8 at 32K. Heads on N needs 32-token tiles and lost.
        return dict(resident, num_warps=8, HEADS_ON_N=False, LATENT_PIECES=True)
    # More heads or wider latents: chunked scores over r, value tiles of 256 (BLOCK_N 64 with 3 stages
    # was the best chunked config on an H100).
    return dict(
        BLOCK_H=64 if num_heads > 16 else 16, BLOCK_N=64, BLOCK_D=64,
        BLOCK_ROPE=max(16, pow2(rope_dim)), BLOCK_V=max(16, min(256, pow2(kv_rank))),
        num_warps=4, num_stages=3, PAGE_TILE=True, HEADS_ON_N=False, LATENT_PIECES=False,
    )  # fmt: skip


def latent_pieces(kv_rank: int, max_pieces: int = 3, min_width: int = 16) -> tuple[int, ...]:
    """Power-of-two widths covering `kv_rank` columns with the least padding, largest first, padded
    with 0 to `max_pieces` (448 -> 256, 128, 64; 896 -> 512, 256, 128; 60 -> 32, 16, 16 with 4 masked)."""
    pieces: list[int] = []
    covered = 0
    while kv_rank - covered > 0 and len(pieces) < max_pieces - 1:
        width = max(min_width, 1 << ((kv_rank - covered).bit_length() - 1))  # largest pow2 that fits
        pieces.append(width)
        covered += width
    if kv_rank > covered:
        pieces.append(max(min_width, next_power_of_2(kv_rank - covered)))
    return tuple(pieces) + (0,) * (max_pieces - len(pieces))


def resolve_latent_pieces(cfg: dict, kv_rank: int) -> dict:
    """`cfg` with BLOCK_D, BLOCK_D1, BLOCK_D2: `latent_pieces(kv_rank)` under LATENT_PIECES (one value
    tile as wide as the pieces, the key tile serving as values), else one piece of BLOCK_D."""
    if not cfg.get("LATENT_PIECES"):
        return {**cfg, "BLOCK_D1": 0, "BLOCK_D2": 0}
    d0, d1, d2 = latent_pieces(kv_rank)
    return {**cfg, "BLOCK_D": d0, "BLOCK_D1": d1, "BLOCK_D2": d2, "BLOCK_V": d0 + d1 + d2}


def split_kernel_for(cfg: dict, kv_rank: int) -> tuple:
    """The split kernel a resolved config (`decode_plan`) runs, and its tile constexprs (all but
    BLOCK_N and PAGE_TILE, which the launch picks)."""
    latent_width = cfg["BLOCK_D"] + cfg["BLOCK_D1"] + cfg["BLOCK_D2"]
    single_d = latent_width >= kv_rank
    values_from_keys = single_d and cdiv(kv_rank, cfg["BLOCK_V"]) == 1 and cfg["BLOCK_V"] == latent_width
    tiles = {k: cfg[k] for k in ("BLOCK_H", "BLOCK_D", "BLOCK_D1", "BLOCK_D2", "BLOCK_ROPE")}
    if cfg["HEADS_ON_N"]:
        if not values_from_keys:
            raise ValueError(f"HEADS_ON_N needs BLOCK_D = BLOCK_V >= kv_rank ({kv_rank}); got {cfg}")
        return _decode_split_kernel_heads_on_n, dict(tiles, TMA=bool(cfg.get("TMA")))
    if cfg.get("TMA"):
        raise ValueError(f"TMA tiles are heads-on-N tiles (HEADS_ON_N=True); got {cfg}")
    # with pieces, BLOCK_V is piece 0's accumulator (pieces 1 and 2 have their own)
    block_v = cfg["BLOCK_D"] if cfg["BLOCK_D1"] else cfg["BLOCK_V"]
    transposed_keys, fp8_as_fp16 = bool(cfg.get("TRANSPOSED_KEYS")), bool(cfg.get("FP8_AS_FP16"))
    if (transposed_keys or fp8_as_fp16) and not single_d:
        raise ValueError(
            f"TRANSPOSED_KEYS and FP8_AS_FP16 need the whole latent resident (BLOCK_D + pieces >= kv_rank "
            f"{kv_rank}); got {cfg}"
        )
    return _decode_split_kernel, dict(
        tiles, BLOCK_V=block_v, SINGLE_D=single_d, VALUES_FROM_KEYS=values_from_keys,
        TRANSPOSED_KEYS=transposed_keys, FP8_AS_FP16=fp8_as_fp16,
    )  # fmt: skip


def _sm_limits(device: torch.device) -> tuple[int, int, int]:
    """Shared memory bytes, threads and registers one SM of `device` offers (sm_90's where unreported)."""
    props = torch.cuda.get_device_properties(device)
    return (
        getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
        getattr(props, "max_threads_per_multi_processor", 2048),
        getattr(props, "regs_per_multiprocessor", 64 * 1024),
    )


def _interpreter_splits(capacity: int, block_n: int) -> int:
    """Off CUDA (the interpreter): a few splits, so the tests cover the combine."""
    return max(1, min(4, cdiv(capacity, block_n)))


def _stand_ins(block_table, cache_seqlens, kv_start, kv_scale, part_lse) -> tuple[torch.Tensor, ...]:
    """The split kernels' block-table, kv_start and scale arguments, with any tensor standing in for an
    absent one (its constexpr flag keeps it unread)."""
    table = block_table if block_table is not None else cache_seqlens
    start = kv_start if kv_start is not None else cache_seqlens
    scale = kv_scale if kv_scale is not None else part_lse  # an fp32 tensor: strides read as a scale's
    return table, start, scale


def programs_per_sm(cfg: dict, itemsize: int, device: torch.device) -> int:
    """Split-kernel programs one SM can hold at once, estimated from the tile config: shared memory
    for the cache tiles, threads, and registers. Tiles whose fp32 accumulator holds 48 or more values
    a thread, and fp8 tiles (widened in registers), take 150-255 registers a thread in the sm_90
    compile, counted as 256; others (79-128) as 128. So a heavy program of 8 warps fits once in
    sm_90's 64K registers, one of 4 warps twice."""
    smem, threads, registers = _sm_limits(device)
    latent = cfg["BLOCK_D"] + cfg.get("BLOCK_D1", 0) + cfg.get("BLOCK_D2", 0)
    resident = latent >= cfg["BLOCK_V"]  # the key tile doubles as the value tile
    loaded = latent + cfg["BLOCK_ROPE"] + (0 if resident else cfg["BLOCK_V"])
    if resident and not cfg.get("HEADS_ON_N"):
        # mma.sync tiles: the sm_90 compile keeps one copy of the cache tile, and the latent query
        # [BLOCK_H, latent + rope] in shared memory (196 KiB at the 896 + 128 default, 97 KiB with 16
        # heads and 32-token tiles: within 2% of this count; 100 KiB at 448 + 64: within 4%)
        tile_bytes = (cfg["BLOCK_N"] * itemsize + cfg["BLOCK_H"] * 2) * loaded  # loaded = latent + rope here
    else:
        tile_bytes = max(1, cfg["num_stages"]) * cfg["BLOCK_N"] * loaded * itemsize
    # pieces (BLOCK_V = 448 at r = 448) take the registers of the padded tile
    accumulator_per_thread = cfg["BLOCK_H"] * next_power_of_2(cfg["BLOCK_V"]) // (32 * cfg["num_warps"])
    heavy = accumulator_per_thread >= 48 or itemsize == 1
    by_registers = max(1, registers // ((256 if heavy else 128) * 32 * cfg["num_warps"]))
    return max(1, min(smem // tile_bytes, threads // (32 * cfg["num_warps"]), by_registers))


def choose_num_splits(
    batch: int, work_tiles: int, capacity: int, block_n: int, row_bytes: int, partial_bytes: int,
    slots: int,
) -> int:  # fmt: skip
    """Split count minimising a wave model of the split kernel plus the combine.

    `slots` programs run at once (SMs x programs per SM), so `batch * work_tiles * splits` programs
    take ceil(programs / slots) waves; a wave costs its longest program: `ceil(tiles / splits)` cache
    tiles plus the fp32 partial it writes and a fixed start-up (both in bytes). The combine reads all
    partials, spread over every slot. Fewer splits win ties (less combine traffic, same bytes).
    Depends only on shapes, never on sequence lengths, so it needs no device sync; and on the
    capacity only through its tile count, so a cache that grows a row a step (the contiguous
    `[b, s, d]` rows of `M2LACache`) searches again once per `block_n` steps, not every step.
    """
    return _splits_for_tiles(batch, work_tiles, cdiv(capacity, block_n), block_n * row_bytes, partial_bytes, slots)


@functools.lru_cache(maxsize=4096)  # one search per shape and tile count (up to 4 * slots candidates)
def _splits_for_tiles(batch: int, work_tiles: int, tiles: int, tile_bytes: int, partial_bytes: int, slots: int) -> int:
    fixed_bytes = 32 * 1024  # launch, query load and epilogue latency, in bytes of cache streamed
    programs_per_split = max(1, batch * work_tiles)
    best, best_cost = 1, float("inf")
    for splits in range(1, min(tiles, 4 * slots) + 1):
        programs = programs_per_split * splits
        waves = cdiv(programs, slots)
        longest = cdiv(tiles, splits) * tile_bytes + partial_bytes + fixed_bytes
        combine = programs * partial_bytes / slots
        cost = waves * longest + combine
        if cost < best_cost * 0.999:
            best, best_cost = splits, cost
    return best


_BLOCK_N_THAT_FITS: dict[tuple, dict] = {}  # launch key -> {"BLOCK_N": what compiled within shared memory}


def _halved_block_n(tiles: dict) -> dict | None:
    return {"BLOCK_N": tiles["BLOCK_N"] // 2} if tiles["BLOCK_N"] > 16 else None


def _launch_split(kernel, grid, args, constexprs, block_n: int, key: tuple, may_shrink: bool, page_tile_for) -> None:
    """Launch the split kernel; when a default tile needs more shared memory than the GPU has, halve
    BLOCK_N (down to 16) and remember what fit (`launch_shrinking`). An explicit `config` BLOCK_N is
    never changed. Split boundaries stay multiples of the smaller BLOCK_N (under SPLIT_BY_LENGTH they
    move with it, which changes the result by rounding only)."""

    def launch(tiles: dict) -> None:
        kernel[grid](*args, BLOCK_N=tiles["BLOCK_N"], PAGE_TILE=page_tile_for(tiles["BLOCK_N"]), **constexprs)

    launch_shrinking(launch, {"BLOCK_N": block_n}, _halved_block_n, _BLOCK_N_THAT_FITS, key, may_shrink)


class _TilePlan(NamedTuple):
    """What a decode call's launch needs that depends only on its static shapes (cached)."""

    cfg: Mapping  # decode_config + overrides, pieces resolved
    kernel: object  # the split kernel
    tiles: Mapping  # its tile constexprs (all but BLOCK_N and PAGE_TILE)
    head_tiles: int
    value_tiles: int
    partial_bytes: int  # one program's fp32 partial output


@functools.lru_cache(maxsize=1024)
def _tile_plan(num_heads: int, kv_rank: int, rope_dim: int, fp8: bool, interpret: bool, overrides: tuple) -> _TilePlan:
    cfg = resolve_latent_pieces(
        {**decode_config(num_heads, kv_rank, rope_dim, interpret, fp8), **dict(overrides)}, kv_rank
    )
    kernel, tiles = split_kernel_for(cfg, kv_rank)
    return _TilePlan(
        MappingProxyType(cfg), kernel, MappingProxyType(tiles), cdiv(num_heads, cfg["BLOCK_H"]),
        cdiv(kv_rank, cfg["BLOCK_V"]), cfg["BLOCK_H"] * min(cfg["BLOCK_V"], kv_rank) * 4,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _wave_slots(device: torch.device, plan_key: tuple, itemsize: int) -> int:
    """Split-kernel programs the device runs at once: SMs x `programs_per_sm`."""
    cfg = dict(_tile_plan(*plan_key).cfg)
    return torch.cuda.get_device_properties(device).multi_processor_count * programs_per_sm(cfg, itemsize, device)


def _plan(q, kv_cache, kv_rank, block_table, num_splits, config, query_blocks=None) -> tuple[_TilePlan, int]:
    """The cached tile plan and the split count of a call (host arithmetic only: no sync);
    `query_blocks`: programs a split and head tile (default: one a query token)."""
    batch, num_heads = q.shape[:2]
    width = kv_cache.shape[-1]  # r + 2p (q may hold the RoPE query alone)
    batch = batch if query_blocks is None else query_blocks
    overrides = tuple(sorted(config.items())) if config else ()
    key = (num_heads, kv_rank, width - kv_rank, is_fp8(kv_cache.dtype), triton_interpreter_enabled(), overrides)
    plan = _tile_plan(*key)
    if num_splits > 0:
        return plan, num_splits
    capacity = cache_capacity(kv_cache, block_table)
    block_n = plan.cfg["BLOCK_N"]
    if q.device.type != "cuda":
        return plan, _interpreter_splits(capacity, block_n)
    slots = _wave_slots(q.device, key, kv_cache.element_size())
    row_bytes = width * kv_cache.element_size()
    work_tiles = plan.head_tiles * plan.value_tiles
    return plan, choose_num_splits(batch, work_tiles, capacity, block_n, row_bytes, plan.partial_bytes, slots)


def decode_plan(
    q: torch.Tensor, kv_cache: torch.Tensor, kv_rank: int, block_table: torch.Tensor | None,
    num_splits: int = 0, config: dict | None = None,
) -> tuple[dict, int]:  # fmt: skip
    """The tile config (`decode_config` with `config`'s overrides) and split count a call will use."""
    plan, num_splits = _plan(q, kv_cache, kv_rank, block_table, num_splits, config)
    return dict(plan.cfg), num_splits


def _check_tma_cache(kv_cache: torch.Tensor, block_table: torch.Tensor | None, kv_scale: torch.Tensor | None) -> None:
    """TMA tiles read a contiguous 16- or 32-bit cache `[b, s, r + 2p]` whose rows and base TMA can
    address (16-byte aligned); anything else raises, naming what the tile cannot read."""
    if block_table is not None:
        raise ValueError("TMA tiles read contiguous caches [b, s, r + 2p]; this call passes a block table (paged)")
    if kv_scale is not None:
        raise ValueError(f"TMA tiles read 16- or 32-bit caches; this cache is {kv_cache.dtype} (fp8)")
    problem = tma_misalignment("the cache", kv_cache)
    if problem:
        raise ValueError(problem)


def _split_partials(
    batch: int, num_heads: int, num_splits: int, kv_rank: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised fp32 partial outputs `[b, h, splits, r]` and LSEs `[b, h, splits]`: every split
    writes its LSE; only non-empty splits write outputs (tests poison these buffers)."""
    part_out = torch.empty(batch, num_heads, num_splits, kv_rank, device=device, dtype=torch.float32)
    part_lse = torch.empty(batch, num_heads, num_splits, device=device, dtype=torch.float32)
    return part_out, part_lse


# Most MMA rows a packed plain decode tile holds: the 32-head tiles the H100 sweeps measured (an
# accumulator of 32 x r fp32); 64 rows spill at 448 + 64 and do not fit at 896 + 128 (sm_90 compile).
PLAIN_PACKED_ROWS = 32


def packed_decode_rows(num_heads: int, max_seqlen_q: int) -> int:
    """BLOCK_H of a packed plain decode: rows for up to `max_seqlen_q` tokens x `num_heads`, at most
    `PLAIN_PACKED_ROWS` (16 at least, the MMA minimum), or the heads alone where two tokens do not fit
    (then one token a block, as the unpacked decode)."""
    rows = min(max_seqlen_q * num_heads, max(PLAIN_PACKED_ROWS, num_heads))
    return max(16, next_power_of_2(max(rows, num_heads)))


def packed_tokens_per_block(num_heads: int, max_seqlen_q: int) -> int:
    """Query tokens a packed plain decode program holds (1: packing gains nothing)."""
    return max(1, packed_decode_rows(num_heads, max_seqlen_q) // num_heads)


# The tiles a decode falls back to when the default (resident-query) tiles do not fit the GPU's shared
# memory even at 16-token tiles: 16-head tiles of 8 warps, the latent scored in 64-column chunks and
# summed into value tiles of up to 512 columns. Without them a plain decode of wide rows failed to
# launch on GPUs with less shared memory than an H100: compiled for sm_89 (99 KiB), 20-32 heads over
# 512 + 512 or 1024 + 1024 (lossless conversions fine-tuned out of their grouped form) needed
# 104-193 KiB at BLOCK_N 16; these take 49-96 KiB with no spills (benchmarks/RESULTS.md, twenty-first
# session). Chosen by compile facts only, not timed. BLOCK_N still halves (from 32) until it fits.
NARROW_DECODE_TILES = MappingProxyType(
    dict(BLOCK_H=16, BLOCK_N=32, BLOCK_D=64, BLOCK_V=512, num_warps=8, num_stages=2, HEADS_ON_N=False,
         LATENT_PIECES=False, TMA=False, TRANSPOSED_KEYS=False, FP8_AS_FP16=False)
)  # fmt: skip
_NEEDS_NARROW_TILES: set[tuple] = set()  # decode shapes (and devices) whose default tiles did not fit


def narrow_decode_tiles(kv_rank: int, packed: bool) -> dict:
    """`NARROW_DECODE_TILES` for a latent of `kv_rank` (value tiles no wider than it needs); `packed`
    chunks keep their own rows (`packed_decode_rows`: all heads in one tile)."""
    tiles = {**NARROW_DECODE_TILES, "BLOCK_V": min(NARROW_DECODE_TILES["BLOCK_V"], max(16, next_power_of_2(kv_rank)))}
    if packed:
        del tiles["BLOCK_H"]
    return tiles


def latent_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    kv_rank: int,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    num_splits: int = 0,
    config: dict | None = None,
    kv_scale: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `latent_decode_reference`; `num_splits=0` picks a split count. A RoPE-only
    q `[.., h, 2p]` (n = 0 layers) scores the RoPE key columns alone (`ROPE_ONLY`).

    With `cu_seqlens_q [b+1]` (int32) and `max_seqlen_q` > 0 (the longest chunk), q `[tq, h, r+2p]`
    holds chunks already in the cache (a chunked prefill's absorbed queries): each program's rows
    pack `BLOCK_H // h` tokens of one chunk with all the heads (`packed_decode_rows` sizes
    BLOCK_H), each token seeing the keys up to its own position, so a cache tile is read once for
    those tokens. The heads must fit one head tile.

    `config` overrides entries of `decode_config` (tile sizes, warps, stages) for tuning sweeps;
    `SPLIT_BY_LENGTH=False` cuts the capacity instead of each sequence's length into the splits (the
    behaviour before the fourteenth session, kept for side-by-side benchmarks). Without `config`,
    default tiles that do not fit the GPU's shared memory even at 16-token tiles are replaced by
    `NARROW_DECODE_TILES` (and that is remembered for the shape and device).
    An fp8 cache (with `kv_scale`) is read as fp8 and widened to q's dtype in registers; otherwise
    q and the cache share a dtype.
    """
    from triton.runtime.errors import OutOfResources

    args = (q, kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table, kv_start, num_splits)
    packing = dict(kv_scale=kv_scale, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)
    narrow_key = (q.shape[1:], q.dtype, kv_cache.shape[-1], kv_cache.dtype, kv_rank, cu_seqlens_q is None, q.device)
    if config is None and narrow_key in _NEEDS_NARROW_TILES:
        narrow = narrow_decode_tiles(kv_rank, packed=cu_seqlens_q is not None)
        return _latent_decode_triton(*args, config=narrow, may_shrink=True, **packing)
    try:
        return _latent_decode_triton(*args, config=config, **packing)
    except OutOfResources:
        if config is not None:  # tiles the caller chose are never replaced
            raise
    _NEEDS_NARROW_TILES.add(narrow_key)
    narrow = narrow_decode_tiles(kv_rank, packed=cu_seqlens_q is not None)
    return _latent_decode_triton(*args, config=narrow, may_shrink=True, **packing)


def _latent_decode_triton(
    q, kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table, kv_start, num_splits, config, kv_scale,
    cu_seqlens_q, max_seqlen_q, may_shrink: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`latent_decode_triton` (its arguments and types) with the given tiles (`config`), no fallback to
    other tiles. BLOCK_N halves where the tile does not fit if `may_shrink` (None: unless `config`
    sets BLOCK_N)."""
    num_tokens, num_heads, width = q.shape
    rope_dim = kv_cache.shape[-1] - kv_rank
    rope_only = width != kv_cache.shape[-1]
    assert width in (kv_rank + rope_dim, rope_dim) and kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    assert cache_seqlens.dtype == torch.int32 and (kv_start is None or kv_start.dtype == torch.int32)
    assert (kv_scale is not None) == is_fp8(kv_cache.dtype), "fp8 caches (and only they) take kv_scale"
    assert kv_scale is not None or q.dtype == kv_cache.dtype, "q and the cache must share a dtype"
    check_fp8_cache_readable(kv_cache)
    paged = block_table is not None
    if paged:
        assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    packed = cu_seqlens_q is not None
    tokens_per_block, blocks_per_seq, batch = 1, 1, num_tokens
    if packed:
        if max_seqlen_q <= 0:
            raise ValueError(f"packed chunks need max_seqlen_q > 0 (the longest chunk), got {max_seqlen_q}")
        config = {"BLOCK_H": packed_decode_rows(num_heads, max_seqlen_q), **(config or {})}
        batch = cu_seqlens_q.shape[0] - 1
        tokens_per_block = max(1, config["BLOCK_H"] // num_heads)
        blocks_per_seq = cdiv(max_seqlen_q, tokens_per_block)
    if num_tokens == 0:
        return q.new_empty(0, num_heads, kv_rank), q.new_empty(0, num_heads, dtype=torch.float32)
    plan, num_splits = _plan(q, kv_cache, kv_rank, block_table, num_splits, config, batch * blocks_per_seq)
    cfg = plan.cfg
    if packed and plan.head_tiles != 1:
        raise ValueError(f"packed chunks need all {num_heads} heads in one head tile; BLOCK_H={cfg['BLOCK_H']}")
    if cfg.get("FP8_AS_FP16") and kv_scale is None:
        raise ValueError(f"FP8_AS_FP16 is for fp8 caches; this cache is {kv_cache.dtype}")
    if cfg.get("TMA"):
        _check_tma_cache(kv_cache, block_table, kv_scale)
    capacity = cache_capacity(kv_cache, block_table)
    head_tiles, value_tiles = plan.head_tiles, plan.value_tiles
    split_len = cdiv(cdiv(capacity, num_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]

    part_out, part_lse = _split_partials(num_tokens, num_heads, num_splits, kv_rank, q.device)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    table, start, scale = _stand_ins(block_table, cache_seqlens, kv_start, kv_scale, part_lse)
    args = (
        q, kv_cache, table, cache_seqlens, start, scale, cu_seqlens_q if packed else cache_seqlens, part_out,
        part_lse,
        softmax_scale * _LOG2E,
        num_heads, kv_rank, rope_dim, kv_cache.shape[1] if paged else 1, split_len, num_splits, value_tiles,
        tokens_per_block, blocks_per_seq,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        scale.stride(0), scale.stride(1),
        table.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
    )  # fmt: skip
    kernel = plan.kernel
    constexprs = dict(
        PAGED=paged, HAS_KV_START=kv_start is not None, HAS_SCALE=kv_scale is not None, DOT_PRECISION=dot_precision,
        SPLIT_BY_LENGTH=cfg.get("SPLIT_BY_LENGTH", True), PACKED=packed, ROPE_ONLY=rope_only,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **plan.tiles,
    )  # fmt: skip
    grid = (batch * blocks_per_seq, head_tiles, num_splits * value_tiles)
    key = (num_heads, kv_rank, rope_dim, q.dtype, kv_cache.dtype, paged, kv_start is not None, cfg["BLOCK_D1"],
           cfg["BLOCK_H"], cfg["BLOCK_D"], cfg["BLOCK_V"], rope_only)  # fmt: skip
    block_size = kv_cache.shape[1] if paged else 1

    def page_tile_for(block_n: int) -> bool:
        return paged and cfg["PAGE_TILE"] and block_size % block_n == 0

    if may_shrink is None:
        may_shrink = config is None or "BLOCK_N" not in config
    launch_args = (
        kernel,
        grid,
        args,
        constexprs,
        cfg["BLOCK_N"],
        key + (kernel, cfg.get("TMA")),
        may_shrink,
        page_tile_for,
    )
    if cfg.get("TMA"):
        with_scratch_allocator(q.device, _launch_split, *launch_args)
    else:
        _launch_split(*launch_args)

    return _combine_splits(part_out, part_lse, q.dtype)


def _combine_splits(
    part_out: torch.Tensor, part_lse: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split partials `[b, h, splits, w]` (fp32) and LSEs `[b, h, splits]` -> `out [b, h, w]`
    in `dtype`, `lse [b, h]` fp32."""
    batch, num_heads, num_splits, width = part_out.shape
    out = torch.empty(batch, num_heads, width, device=part_out.device, dtype=dtype)
    lse = torch.empty(batch, num_heads, device=part_out.device, dtype=torch.float32)
    combine_v = max(16, min(256, next_power_of_2(width)))
    _decode_combine_kernel[(batch * num_heads, cdiv(width, combine_v))](
        part_out, part_lse, out, lse,
        num_heads, num_splits, width,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0),
        BLOCK_S=max(2, next_power_of_2(num_splits)), BLOCK_V=combine_v,
    )  # fmt: skip
    return out, lse


# Most MMA rows a packed grouped decode tile holds (query tokens x a group's heads): one warpgroup's
# wgmma M on sm_90, the fp32 accumulator 64 x R (R = 128: 64 registers a thread at 4 warps).
GROUPED_PACKED_ROWS = 64


def grouped_decode_config(
    heads_per_group: int, group_rank: int, group_pairs: int, interpret: bool, tokens_per_seq: int = 1
) -> dict:
    """Tiles of `_decode_split_kernel_grouped`: a group's heads on M (16 rows at least, the MMA's
    minimum), its value and RoPE columns whole. `tokens_per_seq` > 1 (packed chunks): rows for that
    many tokens x the group's heads, up to `GROUPED_PACKED_ROWS` (16 under the interpreter, so tests
    cover several query blocks a chunk). Not yet timed on a GPU; 64-token tiles with two stages, as
    the plain kernel's measured defaults."""
    most_rows = 16 if interpret else GROUPED_PACKED_ROWS
    rows = max(heads_per_group, min(tokens_per_seq * heads_per_group, most_rows))
    tiles = dict(
        BLOCK_H=max(16, next_power_of_2(rows)), BLOCK_V=max(16, next_power_of_2(group_rank)),
        BLOCK_P=max(16, next_power_of_2(group_pairs)), PAGE_TILE=True,
    )  # fmt: skip
    if interpret:  # small token tiles so the tests cover multi-tile loops
        return dict(tiles, BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(tiles, BLOCK_N=64, num_warps=4, num_stages=2)


def _grouped_programs_per_sm(cfg: dict, itemsize: int, device: torch.device) -> int:
    """Grouped split programs an SM holds at once: pipelined cache tiles in shared memory, threads,
    and registers (a thread: 128 for tiles of up to 32 rows, 192 for packed 64-row ones; ptxas gave
    100 and 168 for sm_90 at 8 x 128, bf16)."""
    smem, threads, registers = _sm_limits(device)
    tile_bytes = max(1, cfg["num_stages"]) * cfg["BLOCK_N"] * (cfg["BLOCK_V"] + 2 * cfg["BLOCK_P"]) * itemsize
    per_thread = 128 if cfg["BLOCK_H"] <= 32 else 192
    by_registers = max(1, registers // (per_thread * 32 * cfg["num_warps"]))
    return max(1, min(smem // tile_bytes, threads // (32 * cfg["num_warps"]), by_registers))


def grouped_decode_triton(
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    num_splits: int = 0,
    config: dict | None = None,
    kv_scale: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `grouped_decode_reference`: one program per (query block, KV group, split),
    each reading its group's `r / G` latent and `2p / G` RoPE columns, then `_decode_combine_kernel`.
    `num_splits=0` picks a split count from the same wave model as the plain decode.

    With `cu_seqlens_q [b+1]` (int32) and `max_seqlen_q` > 0 (the longest chunk), q `[tq, h, 2P]`
    holds chunks already in the cache, as `grouped_prefill_reference` takes them: each query block
    packs up to `BLOCK_H // (h/G)` tokens of one chunk with the group's heads on the MMA rows, so a
    cache tile is read once for all of them, and each token sees the keys up to its own position."""
    num_tokens, num_heads, width = q_rope.shape
    group_pairs, group_rank, per_group = width // 2, kv_rank // head_groups, num_heads // head_groups
    check_fp8_cache_readable(kv_cache)
    paged, packed = block_table is not None, cu_seqlens_q is not None
    if packed and max_seqlen_q <= 0:
        raise ValueError(f"packed chunks need max_seqlen_q > 0 (the longest chunk), got {max_seqlen_q}")
    batch = cu_seqlens_q.shape[0] - 1 if packed else num_tokens
    cfg = {**grouped_decode_config(per_group, group_rank, group_pairs, triton_interpreter_enabled(),
                                   max_seqlen_q if packed else 1),
           **(config or {})}  # fmt: skip
    if cfg["BLOCK_H"] < per_group:
        raise ValueError(f"BLOCK_H={cfg['BLOCK_H']} holds fewer rows than a group's {per_group} heads")
    tokens_per_block = cfg["BLOCK_H"] // per_group if packed else 1
    blocks_per_seq = cdiv(max_seqlen_q, tokens_per_block) if packed else 1
    query_blocks = batch * blocks_per_seq
    if num_tokens == 0:
        return q_rope.new_empty(0, num_heads, group_rank), q_rope.new_empty(0, num_heads, dtype=torch.float32)
    capacity = cache_capacity(kv_cache, block_table)
    block_n = cfg["BLOCK_N"]
    if num_splits <= 0:
        if q_rope.device.type != "cuda":
            num_splits = _interpreter_splits(capacity, block_n)
        else:
            slots = torch.cuda.get_device_properties(q_rope.device).multi_processor_count * _grouped_programs_per_sm(
                cfg, kv_cache.element_size(), q_rope.device
            )
            tile_bytes = block_n * (group_rank + width) * kv_cache.element_size()
            partial_bytes = cfg["BLOCK_H"] * group_rank * 4
            num_splits = _splits_for_tiles(
                query_blocks, head_groups, cdiv(capacity, block_n), tile_bytes, partial_bytes, slots
            )
    split_len = cdiv(cdiv(capacity, num_splits), block_n) * block_n
    part_out, part_lse = _split_partials(num_tokens, num_heads, num_splits, group_rank, q_rope.device)
    table, start, scale = _stand_ins(block_table, cache_seqlens, kv_start, kv_scale, part_lse)
    block_size = kv_cache.shape[1] if paged else 1
    _decode_split_kernel_grouped[(query_blocks, head_groups, num_splits)](
        q_rope, kv_cache, table, cache_seqlens, start, scale, cu_seqlens_q if packed else cache_seqlens, part_out,
        part_lse,
        softmax_scale * _LOG2E,
        per_group, group_rank, group_pairs, kv_rank, head_groups * group_pairs, block_size, split_len,
        num_splits, tokens_per_block, blocks_per_seq,
        q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        scale.stride(0), scale.stride(1),
        table.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        PAGED=paged, PAGE_TILE=paged and cfg["PAGE_TILE"] and block_size % block_n == 0,
        HAS_KV_START=kv_start is not None, HAS_SCALE=kv_scale is not None,
        SPLIT_BY_LENGTH=cfg.get("SPLIT_BY_LENGTH", True), PACKED=packed,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_N=block_n, BLOCK_V=cfg["BLOCK_V"], BLOCK_P=cfg["BLOCK_P"],
        DOT_PRECISION="ieee" if q_rope.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return _combine_splits(part_out, part_lse, q_rope.dtype)
