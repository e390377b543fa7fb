"""fp8 caches in the kernel ops: argument checks and the references' dequantizing gather.

The format (one fp32 scale per cached token) is `m2la.quantization`'s. The Triton kernels fold the
scale into the math instead of dequantizing tiles: a key's score is `q . k_fp8 * scale` and its
value weight `p * scale`.
"""

from __future__ import annotations

import torch

from m2la.kernels._paging import gather_cache_rows
from m2la.quantization import is_fp8


def check_cache_scale(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An fp8 cache needs `kv_scale` fp32 `[dim0, dim1]` of the cache; any other cache takes none."""
    if not is_fp8(kv_cache.dtype):
        if kv_scale is not None:
            raise ValueError(f"kv_scale is only for fp8 caches; this cache is {kv_cache.dtype}")
        return
    if kv_scale is None:
        raise ValueError(f"an {kv_cache.dtype} cache needs kv_scale (fp32, one per token: {tuple(kv_cache.shape[:2])})")
    if kv_scale.dtype != torch.float32 or tuple(kv_scale.shape) != tuple(kv_cache.shape[:2]):
        raise ValueError(
            f"kv_scale must be fp32 of shape {tuple(kv_cache.shape[:2])} (the cache's token slots), "
            f"got {kv_scale.dtype} {tuple(kv_scale.shape)}"
        )


def gather_dequantized_rows(
    kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, block_table: torch.Tensor | None, num_tokens: int
) -> torch.Tensor:
    """`gather_cache_rows` in fp32, each row times its token's scale when the cache is fp8 -> `[b, s, d]`."""
    rows = gather_cache_rows(kv_cache, block_table, num_tokens).float()
    if kv_scale is not None:
        rows = rows * gather_cache_rows(kv_scale[..., None], block_table, num_tokens)
    return rows
