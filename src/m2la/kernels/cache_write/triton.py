"""Fused latent cache write (Triton): copy the latent, rotate the RoPE key, scatter by slot, one pass.

Grid `(cdiv(n_tokens, BLOCK_T),)`; each program moves `BLOCK_T` tokens. The rotation runs in fp32
and is rounded once, on the store, to the cache dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cache_write_kernel(
    latent_ptr, k_rope_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr,
    num_tokens, kv_rank, num_pairs, block_size,
    stride_lat_t, stride_kr_t, stride_cos_t, stride_sin_t,
    stride_c_blk, stride_c_tok,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    slots = tl.load(slot_ptr + offs_t, mask=offs_t < num_tokens, other=-1)
    keep = slots >= 0  # -1 marks padding tokens
    safe_slots = tl.where(keep, slots, 0)
    dest = cache_ptr + ((safe_slots // block_size) * stride_c_blk + (safe_slots % block_size) * stride_c_tok)[:, None]
    src_t = offs_t.to(tl.int64)[:, None]

    offs_r = tl.arange(0, BLOCK_R)
    lat_mask = keep[:, None] & (offs_r[None, :] < kv_rank)
    latent = tl.load(latent_ptr + src_t * stride_lat_t + offs_r[None, :], mask=lat_mask)
    tl.store(dest + offs_r[None, :], latent.to(cache_ptr.dtype.element_ty), mask=lat_mask)

    offs_p = tl.arange(0, BLOCK_P)
    pair_mask = keep[:, None] & (offs_p[None, :] < num_pairs)
    x = tl.load(k_rope_ptr + src_t * stride_kr_t + offs_p[None, :], mask=pair_mask).to(tl.float32)
    y = tl.load(k_rope_ptr + src_t * stride_kr_t + num_pairs + offs_p[None, :], mask=pair_mask).to(tl.float32)
    cos = tl.load(cos_ptr + src_t * stride_cos_t + offs_p[None, :], mask=pair_mask).to(tl.float32)
    sin = tl.load(sin_ptr + src_t * stride_sin_t + offs_p[None, :], mask=pair_mask).to(tl.float32)
    rope_dest = dest + kv_rank + offs_p[None, :]
    tl.store(rope_dest, (x * cos - y * sin).to(cache_ptr.dtype.element_ty), mask=pair_mask)
    tl.store(rope_dest + num_pairs, (x * sin + y * cos).to(cache_ptr.dtype.element_ty), mask=pair_mask)


def write_latent_cache_triton(
    kv_cache: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `write_latent_cache_reference` (mutates `kv_cache`)."""
    num_tokens, kv_rank = latent.shape
    num_pairs = k_rope.shape[1] // 2
    assert kv_cache.shape[-1] == kv_rank + 2 * num_pairs and slot_mapping.dtype == torch.int64
    for t in (kv_cache, latent, k_rope, cos, sin):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    if num_tokens == 0:
        return
    block_t = 16
    _cache_write_kernel[(triton.cdiv(num_tokens, block_t),)](
        latent, k_rope, cos, sin, slot_mapping, kv_cache,
        num_tokens, kv_rank, num_pairs, kv_cache.shape[1],
        latent.stride(0), k_rope.stride(0), cos.stride(0), sin.stride(0),
        kv_cache.stride(0), kv_cache.stride(1),
        BLOCK_T=block_t, BLOCK_R=triton.next_power_of_2(kv_rank), BLOCK_P=triton.next_power_of_2(max(1, num_pairs)),
        num_warps=4,
    )  # fmt: skip
