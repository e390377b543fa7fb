"""fp8 latent cache rows with one fp32 scale per token (pure torch).

A quantized row `[latent r | rope key 2p]` is stored as `row / scale` in an fp8 dtype, with
`scale = amax(|row|) / fp8 max`, so every row uses the format's whole range: no calibration and no
clipping. The scale costs 4 bytes a token (0.8% of a 448 + 64 fp8 row). The kernels
(`m2la.kernels`) and both latent caches (`LatentCache`, `M2LACache`) share these functions.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype | None) -> bool:
    return dtype in FP8_DTYPES


def check_cache_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """None (rows kept as they come) or an fp8 dtype; anything else is an error."""
    if dtype is not None and not is_fp8(dtype):
        raise ValueError(f"latent cache dtype must be None or one of {FP8_DTYPES}, got {dtype}")
    return dtype


def quantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows [..., d]` -> (`rows / scale` in fp8 `dtype` `[..., d]`, `scale [...]` fp32); an all-zero row gets scale 1."""
    rows = rows.float()
    amax = rows.abs().amax(dim=-1)  # [...]
    # A tensor divisor, not a Python float: CUDA torch turns division by a CPU scalar into a multiply
    # by its reciprocal, one bit less exact than the IEEE division of CPU torch and the fused write.
    scale = torch.where(amax > 0, amax / amax.new_full((), torch.finfo(dtype).max), 1.0)
    return (rows / scale[..., None]).to(dtype), scale


def dequantize_rows(rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 `rows [..., d]` times `scale [...]` -> `[..., d]` in `dtype`."""
    return (rows.float() * scale[..., None]).to(dtype)
