"""Pure-torch helpers shared by the reference ops: read the paged latent cache densely."""

from __future__ import annotations

import torch


def gather_cache_rows(kv_cache: torch.Tensor, block_table: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """Rows 0..num_tokens-1 of every sequence, paged or contiguous -> `[b, num_tokens, d]`.

    Paged: `kv_cache [num_blocks, block_size, d]` with `block_table [b, max_blocks]`.
    Contiguous: `kv_cache [b, s_max, d]`, `block_table=None`.
    Positions past the table's capacity read block 0 (callers mask them); table entries are
    clamped so garbage in unused table slots cannot index out of range.
    """
    positions = torch.arange(num_tokens, device=kv_cache.device)  # [s]
    if block_table is None:
        return kv_cache[:, :num_tokens]  # [b, s, d]
    block_size = kv_cache.shape[1]
    logical = (positions // block_size).clamp(max=block_table.shape[1] - 1)  # [s]
    physical = block_table.long()[:, logical].clamp(0, kv_cache.shape[0] - 1)  # [b, s]
    return kv_cache[physical, positions % block_size]  # [b, s, d]


def cache_capacity(kv_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Most tokens one sequence can hold in this cache layout."""
    if block_table is None:
        return kv_cache.shape[1]
    return block_table.shape[1] * kv_cache.shape[1]
