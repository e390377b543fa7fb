"""Fused latent cache write (Triton): copy the latent, rotate the RoPE key, scatter by slot, one pass.

Grid `(cdiv(n_tokens, BLOCK_T),)`; each program moves `BLOCK_T` tokens. The rotation runs in fp32
and is rounded once, on the store, to the cache dtype. fp8 caches (`HAS_SCALE`): the whole row is
in registers before the store, so its amax, the token's scale and the scaled row come from the
same pass (m2la.quantization).

The kernel rounds like the torch reference, so both store the same bits: IEEE divisions
(`div_rn`; triton's `/` is the approximate `div.full.f32` on GPUs), no multiply-add fusion
(`COMPILE_OPTIONS`; a fused `x * cos - y * sin` rounds once where torch rounds twice), and the
sign of values that round to zero copied in bits (`_round_to_fp8_grid`). On an H100 (2026-11-27)
the kernel stored +0 where the reference stores -0; that last fix is not yet run on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from m2la.kernels._host import cdiv, next_power_of_2
from m2la.kernels._launch import check_fp8_cache_readable
from m2la.quantization import is_fp8

COMPILE_OPTIONS = {"enable_fp_fusion": False}  # launch options; the sm_90 compile check uses them too


@triton.jit
def _round_to_fp8_grid(x, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr):
    """fp32 `x` rounded to nearest-even on the fp8 grid (normals: MANTISSA_BITS bits; subnormals:
    multiples of 2^(MIN_NORMAL_EXP - MANTISSA_BITS)), so the cast that follows is exact. The GPU cast
    rounds the same way by itself; the CPU interpreter's does not carry a rounded-up mantissa into
    the exponent (30.5 -> 16 in e4m3), which this avoids."""
    dropped: tl.constexpr = 23 - MANTISSA_BITS
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (dropped - 1)) - 1) + ((bits >> dropped) & 1)) & (-(1 << dropped))
    magic: tl.constexpr = 1.5 * 2.0 ** (23 + MIN_NORMAL_EXP - MANTISSA_BITS)  # fp32 ulp = subnormal step
    subnormal = ((tl.abs(x) + magic) - magic).to(tl.int32, bitcast=True)
    # x's sign bit, copied in bits: values that round to 0 keep it (-0, as torch stores them). A float
    # `-subnormal` lowers to `0.0 - subnormal` on GPUs, which turns -0 into +0 (seen on an H100).
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31
    subnormal = (subnormal | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 2.0**MIN_NORMAL_EXP, subnormal, bits.to(tl.float32, bitcast=True))


@triton.jit
def _cache_write_kernel(
    latent_ptr, k_rope_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, kv_scale_ptr,
    num_tokens, kv_rank, num_pairs, block_size, fp8_max,
    stride_lat_t, stride_kr_t, stride_cos_t, stride_sin_t,
    stride_c_blk, stride_c_tok, stride_sc_blk, stride_sc_tok,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SCALE: tl.constexpr,
    FP8_MANTISSA: tl.constexpr, FP8_MIN_NORMAL_EXP: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    slots = tl.load(slot_ptr + offs_t, mask=offs_t < num_tokens, other=-1)
    keep = slots >= 0  # -1 marks padding tokens
    safe_slots = tl.where(keep, slots, 0)
    block, offset = safe_slots // block_size, safe_slots % block_size
    dest = cache_ptr + (block * stride_c_blk + offset * stride_c_tok)[:, None]
    src_t = offs_t.to(tl.int64)[:, None]
    cache_dtype = cache_ptr.dtype.element_ty

    offs_r = tl.arange(0, BLOCK_R)
    lat_mask = keep[:, None] & (offs_r[None, :] < kv_rank)
    latent = tl.load(latent_ptr + src_t * stride_lat_t + offs_r[None, :], mask=lat_mask, other=0.0)

    offs_p = tl.arange(0, BLOCK_P)
    pair_mask = keep[:, None] & (offs_p[None, :] < num_pairs)
    x = tl.load(k_rope_ptr + src_t * stride_kr_t + offs_p[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    y = tl.load(k_rope_ptr + src_t * stride_kr_t + num_pairs + offs_p[None, :], mask=pair_mask, other=0.0)
    y = y.to(tl.float32)
    cos = tl.load(cos_ptr + src_t * stride_cos_t + offs_p[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + src_t * stride_sin_t + offs_p[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    rot_x = x * cos - y * sin  # [BLOCK_T, BLOCK_P]
    rot_y = x * sin + y * cos
    if HAS_SCALE:
        latent = latent.to(tl.float32)
        rope_amax = tl.maximum(tl.max(tl.abs(rot_x), axis=1), tl.max(tl.abs(rot_y), axis=1))
        amax = tl.maximum(tl.max(tl.abs(latent), axis=1), rope_amax)  # [BLOCK_T]
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, fp8_max), 1.0)  # [BLOCK_T]
        latent = _round_to_fp8_grid(tl.math.div_rn(latent, scale[:, None]), FP8_MANTISSA, FP8_MIN_NORMAL_EXP)
        rot_x = _round_to_fp8_grid(tl.math.div_rn(rot_x, scale[:, None]), FP8_MANTISSA, FP8_MIN_NORMAL_EXP)
        rot_y = _round_to_fp8_grid(tl.math.div_rn(rot_y, scale[:, None]), FP8_MANTISSA, FP8_MIN_NORMAL_EXP)
        tl.store(kv_scale_ptr + block * stride_sc_blk + offset * stride_sc_tok, scale, mask=keep)
    tl.store(dest + offs_r[None, :], latent.to(cache_dtype), mask=lat_mask)
    rope_dest = dest + kv_rank + offs_p[None, :]
    tl.store(rope_dest, rot_x.to(cache_dtype), mask=pair_mask)
    tl.store(rope_dest + num_pairs, rot_y.to(cache_dtype), mask=pair_mask)


def write_latent_cache_triton(
    kv_cache: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Same contract as `write_latent_cache_reference` (mutates `kv_cache`, and `kv_scale` for fp8)."""
    num_tokens, kv_rank = latent.shape
    num_pairs = k_rope.shape[1] // 2
    assert kv_cache.shape[-1] == kv_rank + 2 * num_pairs and slot_mapping.dtype == torch.int64
    for t in (kv_cache, latent, k_rope, cos, sin):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    assert (kv_scale is not None) == is_fp8(kv_cache.dtype), "fp8 caches (and only they) take kv_scale"
    check_fp8_cache_readable(kv_cache)
    if num_tokens == 0:
        return
    block_t = 16
    scale = kv_scale if kv_scale is not None else cos  # any 2-d tensor: unused without HAS_SCALE
    fp8_max, mantissa, min_normal_exp = 1.0, 0, 0  # unused without HAS_SCALE
    if kv_scale is not None:  # eps = 2^-mantissa_bits, tiny = 2^min_normal_exp (e4m3: 3, -6; e5m2: 2, -14)
        fp8 = torch.finfo(kv_cache.dtype)
        fp8_max, mantissa, min_normal_exp = fp8.max, -int(math.log2(fp8.eps)), int(math.log2(fp8.tiny))
    _cache_write_kernel[(cdiv(num_tokens, block_t),)](
        latent, k_rope, cos, sin, slot_mapping, kv_cache, scale,
        num_tokens, kv_rank, num_pairs, kv_cache.shape[1], fp8_max,
        latent.stride(0), k_rope.stride(0), cos.stride(0), sin.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), scale.stride(0), scale.stride(1),
        BLOCK_T=block_t, BLOCK_R=next_power_of_2(kv_rank), BLOCK_P=next_power_of_2(max(1, num_pairs)),
        HAS_SCALE=kv_scale is not None, FP8_MANTISSA=mantissa, FP8_MIN_NORMAL_EXP=min_normal_exp, num_warps=4,
        **COMPILE_OPTIONS,
    )  # fmt: skip
