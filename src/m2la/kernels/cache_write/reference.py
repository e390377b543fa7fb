"""Reference fused cache write (pure torch, fp32 rotation): the test oracle."""

from __future__ import annotations

import torch

from m2la.quantization import is_fp8, quantize_rows


def rotate_half_pairs(k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-layout pairs `(x[j], x[p+j])` of `k_rope [..., 2p]` by `cos/sin [..., p]` (fp32)."""
    x, y = k_rope.float().chunk(2, dim=-1)  # [..., p] each
    cos, sin = cos.float(), sin.float()
    return torch.cat([x * cos - y * sin, x * sin + y * cos], dim=-1)


def write_latent_cache_reference(
    kv_cache: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Write `[latent [t, r] | rotate(k_rope [t, 2p])]` into `kv_cache [num_blocks, block_size, r+2p]`.

    `slot_mapping [t]` int64 holds `block * block_size + offset`; `-1` skips the token (padding).
    An fp8 cache stores `row / scale` with `scale = amax(|row|) / fp8 max` written to
    `kv_scale [num_blocks, block_size]` (m2la.quantization). Mutates `kv_cache` (and `kv_scale`).
    """
    block_size = kv_cache.shape[1]
    keep = slot_mapping >= 0  # [t]
    slots = slot_mapping[keep].long()
    rows = torch.cat([latent[keep].float(), rotate_half_pairs(k_rope[keep], cos[keep], sin[keep])], dim=-1)
    blocks, offsets = slots // block_size, slots % block_size
    if is_fp8(kv_cache.dtype):
        rows, scale = quantize_rows(rows, kv_cache.dtype)
        kv_scale[blocks, offsets] = scale
    kv_cache[blocks, offsets] = rows.to(kv_cache.dtype)
