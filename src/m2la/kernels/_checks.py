"""Argument checks for the public kernel ops (`m2la.kernels.ops`), so that both backends accept
exactly the same inputs and a bad one gets a ValueError naming the argument.

Shapes, dtypes and devices come from tensor metadata and are checked on every call, traced ones
included. Values (lengths against the cache's capacity, block-table entries, slots) are checked by
the reference backend on CPU only (`ops._values_readable`). The Triton path never reads an argument's
values on the host: on a GPU that would make the host wait for the device on every call and break
CUDA-graph capture. There they are the caller's contract, as in FlashAttention's and FlashMLA's
kv-cache APIs, and the kernels do not bounds-check them, unless the caller opts in
(`ops.check_argument_values`, `M2LA_CHECK_VALUES=1`: every eager call checks them, a sync a call).
"""

from __future__ import annotations

import torch

from m2la.kernels._paging import cache_capacity
from m2la.quantization import is_fp8


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_vector(name: str, t: torch.Tensor, length: int, dtype: torch.dtype) -> None:
    if t.shape != (length,) or t.dtype != dtype:
        raise ValueError(f"{name} must be a 1-d {dtype} tensor of length {length}, got {t.dtype} {_shape(t)}")


_COMPUTE_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _check_floats(names: str, *tensors: torch.Tensor) -> None:
    """Each of `tensors` (named by the comma-separated `names`) in a dtype the ops compute in."""
    for index, t in enumerate(tensors):
        if t.dtype not in _COMPUTE_DTYPES:
            name = names.split(", ")[index]
            raise ValueError(f"{name} must be fp16, bf16 or fp32 (fp64 on the reference backend), got {t.dtype}")


def _check_same_device(names: str, *tensors: torch.Tensor | None) -> None:
    """All of `tensors` (named by the comma-separated `names`; None skipped) on the first one's device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t is not None and t.device != device:
            named = zip(names.split(", "), tensors, strict=True)
            found = ", ".join(f"{name} on {x.device}" for name, x in named if x is not None)
            raise ValueError(f"the kernels take tensors on one device, got {found}")


def _check_cache_rows(kv_cache: torch.Tensor, kv_rank: int | None, rope_dim: int) -> None:
    """Rows of `kv_rank + rope_dim` values (`kv_rank` None: decode, whose rows are q's width
    `rope_dim`), contiguous within a row. Messages are built only on failure (host time per call)."""
    width = rope_dim if kv_rank is None else kv_rank + rope_dim
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != width:
        what = "r + 2p" if kv_rank is None else f"r ({kv_rank}) + 2p ({rope_dim})"
        raise ValueError(f"kv_cache must be 3-d with rows of {what} = {width} values, got {_shape(kv_cache)}")
    if kv_cache.stride(-1) != 1 and width > 1:
        raise ValueError(f"kv_cache rows must be contiguous (last-dim stride 1), got strides {kv_cache.stride()}")


def _check_layout(kv_cache: torch.Tensor, block_table: torch.Tensor | None, batch: int) -> None:
    """Paged `[num_blocks, block_size, w]` with `block_table [b, max_blocks]` int32, or contiguous
    `[>= b, s, w]` (sequence i in row i)."""
    if block_table is None:
        if kv_cache.shape[0] < batch:
            raise ValueError(
                f"a contiguous kv_cache [b, s, w] needs a row per sequence: {kv_cache.shape[0]} rows for "
                f"{batch} sequences (pass block_table for a paged cache)"
            )
        return
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(
            f"block_table must be a 2-d torch.int32 tensor [{batch}, max_blocks], got {block_table.dtype} "
            f"{_shape(block_table)}"
        )


def check_decode_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    kv_rank: int,
    block_table: torch.Tensor | None,
    kv_start: torch.Tensor | None,
) -> None:
    """`decode_attention`'s metadata: q `[b, h, r + 2p]` (or the RoPE query `[b, h, 2p]` alone), a
    cache of rows `r + 2p` in q's dtype (or fp8), `cache_seqlens [b]` / `kv_start [b]` int32, one device."""
    if q.dim() != 3 or kv_cache.dim() != 3:
        raise ValueError(f"expected q [b, h, r+2p] and a 3-d cache, got {_shape(q)}, {_shape(kv_cache)}")
    width = kv_cache.shape[-1]
    if not 0 < kv_rank <= width:
        raise ValueError(f"kv_rank={kv_rank} must be in (0, {width}] (the cache row width)")
    if q.shape[-1] not in (width, width - kv_rank) or q.shape[-1] == 0:
        raise ValueError(
            f"expected q [b, h, r+2p] = [.., .., {width}] or its RoPE part [b, h, 2p] = [.., .., {width - kv_rank}] "
            f"(kv_rank {kv_rank}, cache rows of {width}), got {_shape(q)}"
        )
    _check_floats("q", q)
    if not is_fp8(kv_cache.dtype) and kv_cache.dtype != q.dtype:
        raise ValueError(f"q ({q.dtype}) and kv_cache ({kv_cache.dtype}) must share a dtype (an fp8 cache may differ)")
    _check_cache_rows(kv_cache, None, kv_cache.shape[-1])
    _check_decode_metadata("q", q, kv_cache, cache_seqlens, block_table, kv_start)


def _check_decode_metadata(
    q_name: str, q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None, kv_start: torch.Tensor | None,
) -> None:  # fmt: skip
    """A decode's `cache_seqlens [b]` and `kv_start [b]` int32 (b from `q`), the cache layout and one device."""
    batch = q.shape[0]
    _check_vector("cache_seqlens", cache_seqlens, batch, torch.int32)
    if kv_start is not None:
        _check_vector("kv_start", kv_start, batch, torch.int32)
    _check_layout(kv_cache, block_table, batch)
    _check_same_device(
        f"{q_name}, kv_cache, cache_seqlens, block_table, kv_start", q, kv_cache, cache_seqlens, block_table, kv_start
    )


def check_grouped_decode_args(
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    kv_rank: int,
    head_groups: int,
    block_table: torch.Tensor | None,
    kv_start: torch.Tensor | None,
) -> None:
    """`grouped_decode_attention`'s metadata: q_rope `[b, h, 2P]` with `head_groups` dividing h and
    kv_rank, a cache of rows `r + G * 2P`, then as `check_decode_args`."""
    _check_grouped_queries(q_rope, kv_cache, kv_rank, head_groups, "[b, h, 2P]")
    _check_decode_metadata("q_rope", q_rope, kv_cache, cache_seqlens, block_table, kv_start)


def _check_grouped_queries(
    q_rope: torch.Tensor, kv_cache: torch.Tensor, kv_rank: int, head_groups: int, layout: str
) -> None:  # fmt: skip
    """A grouped op's queries `q_rope [.., h, 2P]` (3-d, `layout` names its dims), `head_groups`
    dividing h and kv_rank, one dtype with the cache (unless fp8), cache rows of `r + G * 2P`."""
    if q_rope.dim() != 3 or q_rope.shape[-1] % 2 or q_rope.shape[-1] == 0:
        raise ValueError(f"expected q_rope {layout} (an even, nonzero width), got {_shape(q_rope)}")
    heads = q_rope.shape[1]
    if head_groups < 1 or heads % head_groups or kv_rank % head_groups or kv_rank <= 0:
        raise ValueError(
            f"head_groups={head_groups} must divide the {heads} query heads and kv_rank={kv_rank} (> 0) evenly"
        )
    _check_floats("q_rope", q_rope)
    if not is_fp8(kv_cache.dtype) and kv_cache.dtype != q_rope.dtype:
        raise ValueError(
            f"q_rope ({q_rope.dtype}) and kv_cache ({kv_cache.dtype}) must share a dtype (an fp8 cache may differ)"
        )
    _check_cache_rows(kv_cache, kv_rank, head_groups * q_rope.shape[-1])


def _check_chunk_metadata(
    cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, kv_start: torch.Tensor | None,
    kv_cache: torch.Tensor, block_table: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
) -> None:  # fmt: skip
    """`cu_seqlens_q [b + 1]`, `cache_seqlens [b]` and `kv_start [b]` int32, the cache layout, the
    optional longest lengths (0: read them)."""
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q must be a 1-d torch.int32 tensor [b + 1], got {_shape(cu_seqlens_q)}")
    batch = cu_seqlens_q.shape[0] - 1
    _check_vector("cu_seqlens_q", cu_seqlens_q, batch + 1, torch.int32)
    _check_vector("cache_seqlens", cache_seqlens, batch, torch.int32)
    if kv_start is not None:
        _check_vector("kv_start", kv_start, batch, torch.int32)
    _check_layout(kv_cache, block_table, batch)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_q / max_seqlen_k must be >= 0 (0: read them), got {max_seqlen_q}, {max_seqlen_k}")


def check_grouped_prefill_args(
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    kv_rank: int,
    head_groups: int,
    block_table: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    max_seqlen_q: int,
) -> None:
    """`grouped_prefill_attention`'s metadata: q_rope `[tq, h, 2P]` as in `check_grouped_decode_args`,
    the chunk metadata as in `check_prefill_args`."""
    _check_grouped_queries(q_rope, kv_cache, kv_rank, head_groups, "[tq, h, 2P]")
    _check_chunk_metadata(cu_seqlens_q, cache_seqlens, kv_start, kv_cache, block_table, max_seqlen_q, 0)
    _check_same_device(
        "q_rope, kv_cache, cu_seqlens_q, cache_seqlens, block_table, kv_start",
        q_rope, kv_cache, cu_seqlens_q, cache_seqlens, block_table, kv_start,
    )  # fmt: skip


def check_prefill_args(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    """`prefill_attention`'s metadata: q_nope `[tq, h, n]`, q_rope `[tq, h, 2p]`, w_uk `[h, r, n]`,
    w_uv `[h, r, v]`, cache rows of r + 2p, `cu_seqlens_q [b + 1]` and `cache_seqlens [b]` int32."""
    if q_nope.dim() != 3 or q_rope.dim() != 3 or q_nope.shape[:2] != q_rope.shape[:2]:
        raise ValueError(f"expected q_nope [tq, h, n] and q_rope [tq, h, 2p], got {_shape(q_nope)}, {_shape(q_rope)}")
    tokens, heads, nope_dim = q_nope.shape
    if w_uk.dim() != 3 or w_uk.shape[0] != heads or w_uk.shape[2] != nope_dim:
        raise ValueError(f"w_uk must be [h={heads}, r, n={nope_dim}], got {_shape(w_uk)}")
    kv_rank = w_uk.shape[1]
    if w_uv.dim() != 3 or w_uv.shape[:2] != w_uk.shape[:2]:
        raise ValueError(f"w_uv must be [h={heads}, r={kv_rank}, v], got {_shape(w_uv)}")
    _check_floats("q_nope, q_rope, w_uk, w_uv", q_nope, q_rope, w_uk, w_uv)
    if not is_fp8(kv_cache.dtype):
        _check_floats("kv_cache", kv_cache)
    _check_cache_rows(kv_cache, kv_rank, q_rope.shape[-1])
    _check_chunk_metadata(cu_seqlens_q, cache_seqlens, kv_start, kv_cache, block_table, max_seqlen_q, max_seqlen_k)
    _check_same_device(
        "q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, block_table, kv_start",
        q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, block_table, kv_start,
    )  # fmt: skip


def check_cache_write_args(
    kv_cache: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`write_latent_cache`'s metadata: latent `[t, r]`, k_rope `[t, 2p]`, cos/sin `[t, p]`,
    `slot_mapping [t]` int64, a paged cache `[num_blocks, block_size, r + 2p]`."""
    if latent.dim() != 2 or k_rope.dim() != 2 or k_rope.shape[0] != latent.shape[0] or k_rope.shape[1] % 2:
        raise ValueError(
            f"expected latent [t, r] and k_rope [t, 2p] (an even width), got {_shape(latent)}, {_shape(k_rope)}"
        )
    tokens, pairs = latent.shape[0], k_rope.shape[1] // 2
    for t in (cos, sin):
        if t.shape != (tokens, pairs):
            name = "cos" if t is cos else "sin"
            raise ValueError(f"{name} must be [t={tokens}, p={pairs}] (one angle per RoPE pair), got {_shape(t)}")
    _check_floats("latent, k_rope, cos, sin", latent, k_rope, cos, sin)
    if not is_fp8(kv_cache.dtype):
        _check_floats("kv_cache", kv_cache)
    _check_cache_rows(kv_cache, latent.shape[1], k_rope.shape[1])
    _check_vector("slot_mapping", slot_mapping, tokens, torch.int64)
    _check_same_device(
        "kv_cache, latent, k_rope, cos, sin, slot_mapping", kv_cache, latent, k_rope, cos, sin, slot_mapping
    )


def _preview(values: torch.Tensor, limit: int = 8) -> str:
    listed = values.flatten()[:limit].tolist()
    return f"{listed}{' ...' if values.numel() > limit else ''}"


def check_lengths(
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    kv_start: torch.Tensor | None,
) -> None:
    """Values (read them only where that is free): `0 <= cache_seqlens <= capacity`, `kv_start >= 0`,
    and every block-table entry for a visible row, `[kv_start, cache_seqlens)`, names a block of the cache."""
    capacity = cache_capacity(kv_cache, block_table)
    bad = (cache_seqlens < 0) | (cache_seqlens > capacity)
    if bool(bad.any()):
        raise ValueError(
            f"cache_seqlens must be in [0, {capacity}] (rows a sequence's cache holds), got {_preview(cache_seqlens)}"
        )
    if kv_start is not None and bool((kv_start < 0).any()):
        raise ValueError(f"kv_start must be >= 0, got {_preview(kv_start)}")
    if block_table is None or block_table.numel() == 0:
        return
    block_size = kv_cache.shape[1]
    first = torch.zeros_like(cache_seqlens) if kv_start is None else kv_start
    page = torch.arange(block_table.shape[1], device=block_table.device)  # [max_blocks]
    used = (page >= (first // block_size)[:, None]) & (page * block_size < cache_seqlens[:, None])
    used &= (first < cache_seqlens)[:, None]  # [b, max_blocks]: pages holding a visible row
    out_of_range = used & ((block_table < 0) | (block_table >= kv_cache.shape[0]))
    if bool(out_of_range.any()):
        seq, slot = (int(i) for i in out_of_range.nonzero()[0])
        raise ValueError(
            f"block_table[{seq}, {slot}] = {int(block_table[seq, slot])} names no block of the cache "
            f"({kv_cache.shape[0]} blocks) but holds visible rows of sequence {seq}"
        )


def check_chunks(
    cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, num_tokens: int, max_seqlen_q: int, max_seqlen_k: int
) -> None:
    """Values of a chunked prefill (read them only where that is free): `cu_seqlens_q` runs from 0 to
    `num_tokens` without going down, each chunk is already counted in `cache_seqlens`, and nonzero
    `max_seqlen_q` / `max_seqlen_k` bound the longest chunk / sequence."""
    chunks = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [b]
    if int(cu_seqlens_q[0]) != 0 or int(cu_seqlens_q[-1]) != num_tokens or bool((chunks < 0).any()):
        raise ValueError(
            f"cu_seqlens_q must rise from 0 to the {num_tokens} query tokens, got {_preview(cu_seqlens_q)}"
        )
    if bool((chunks > cache_seqlens).any()):
        raise ValueError(
            "cache_seqlens must count each new chunk (write it into the cache first): chunks "
            f"{_preview(chunks)} against cache_seqlens {_preview(cache_seqlens)}"
        )
    if chunks.numel() and 0 < max_seqlen_q < int(chunks.max()):
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is shorter than the longest chunk ({int(chunks.max())})")
    if cache_seqlens.numel() and 0 < max_seqlen_k < int(cache_seqlens.max()):
        raise ValueError(
            f"max_seqlen_k={max_seqlen_k} is shorter than the longest cache_seqlens ({int(cache_seqlens.max())})"
        )


def check_slots(kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Values (read them only where that is free): every slot is -1 (skip) or in the cache."""
    slots = kv_cache.shape[0] * kv_cache.shape[1]
    if bool(((slot_mapping < -1) | (slot_mapping >= slots)).any()):
        raise ValueError(f"slot_mapping entries must be -1 (skip) or in [0, {slots}), got {_preview(slot_mapping)}")
