"""Reference absorbed decode over the latent cache (pure torch, fp32 internally): the test oracle."""

from __future__ import annotations

import torch

from m2la.kernels._paging import cache_capacity
from m2la.kernels._quant import gather_dequantized_rows


def latent_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    kv_rank: int,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQA of `q [b, h, r+2p]` over cache rows `[latent r | rope key 2p]` with V = latent. A layer
    with no latent query (`n = 0`) may pass its RoPE query `q [b, h, 2p]` alone: the scores then
    read the RoPE key columns only.

    Returns `out [b, h, r]` in q's dtype and `lse [b, h]` fp32 (natural log). A sequence with no
    visible token (length 0, or `kv_start >= cache_seqlens`) gives `out = 0`, `lse = -inf`.
    Cache rows outside `[kv_start, cache_seqlens)` are never allowed to reach the result, even NaN.
    An fp8 cache comes with `kv_scale` (one fp32 per token slot, `m2la.quantization`).
    """
    capacity = cache_capacity(kv_cache, block_table)
    if block_table is None:  # contiguous: sequence i in row i; rows past the batch are not ours
        kv_cache = kv_cache[: q.shape[0]]
        kv_scale = None if kv_scale is None else kv_scale[: q.shape[0]]
    rows = gather_dequantized_rows(kv_cache, kv_scale, block_table, capacity)  # [b, s, r+2p] fp32
    positions = torch.arange(capacity, device=q.device)  # [s]
    visible = positions[None, :] < cache_seqlens.long()[:, None]  # [b, s]
    if kv_start is not None:
        visible &= positions[None, :] >= kv_start.long()[:, None]
    # Zero hidden rows: 0 * NaN would otherwise leak through the value product.
    rows = torch.where(visible[..., None], rows, 0.0)
    keys = rows if q.shape[-1] == rows.shape[-1] else rows[..., kv_rank:]  # [b, s, r + 2p] or [b, s, 2p]
    scores = torch.einsum("bhd,bsd->bhs", q.float(), keys) * softmax_scale  # [b, h, s]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h]
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])  # [b, h, s]
    out = torch.einsum("bhs,bsr->bhr", probs, rows[..., :kv_rank])  # [b, h, r]
    return out.to(q.dtype), lse


def grouped_query(q_rope: torch.Tensor, kv_rank: int, head_groups: int) -> torch.Tensor:
    """A grouped decode's queries `q_rope [b, h, 2P]` (head h's RoPE query over its group's P pairs,
    x half then y half) as the plain decode's `[b, h, r + 2p]`: zero latent query, and each head's
    pairs placed at its group's columns of the half-layout RoPE key (p = G * P), zero elsewhere."""
    batch, heads, width = q_rope.shape
    pairs = width // 2
    group = torch.arange(heads, device=q_rope.device) // (heads // head_groups)  # [h]
    q = q_rope.new_zeros(batch, heads, 2, head_groups, pairs)  # RoPE key columns as [half, group, pair]
    q[:, torch.arange(heads, device=q_rope.device), :, group] = q_rope.view(batch, heads, 2, pairs).transpose(0, 1)
    return torch.cat((q_rope.new_zeros(batch, heads, kv_rank), q.flatten(2)), dim=-1)


def grouped_decode_reference(
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`latent_decode_reference` for a grouped layer (a lossless conversion of a GQA attention: no
    latent query, head h of group g = h // (h / G) scores only its group's RoPE pairs and reads only its
    group's latent slice): `q_rope [b, h, 2p / G]` -> `out [b, h, r / G]` (latent columns
    `[g r/G, (g+1) r/G)`), `lse [b, h]`. Defined through the plain decode, so it is that op's result."""
    out, lse = latent_decode_reference(
        grouped_query(q_rope, kv_rank, head_groups), kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table,
        kv_start, kv_scale,
    )  # fmt: skip
    return own_group_slice(out, head_groups), lse


def own_group_slice(out: torch.Tensor, head_groups: int) -> torch.Tensor:
    """The plain ops' latent output `out [n, h, r]` of a grouped layer -> each head's own group's
    slice `[n, h, r/G]` (head h, group h // (h / G))."""
    n, heads, kv_rank = out.shape
    group = torch.arange(heads, device=out.device) // (heads // head_groups)
    return out.view(n, heads, head_groups, kv_rank // head_groups)[:, torch.arange(heads, device=out.device), group]
