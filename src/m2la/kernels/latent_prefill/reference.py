"""Reference chunked prefill over the latent cache (pure torch, fp32 internally): the test oracle."""

from __future__ import annotations

import torch

from m2la.kernels._quant import gather_dequantized_rows


def latent_prefill_reference(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal variable-length attention of new query tokens over their sequence's cache.

    Shapes: `q_nope [tq, h, n]`, `q_rope [tq, h, 2p]` (packed sequences, `cu_seqlens_q [b+1]`),
    cache rows `[latent r | rope key 2p]`, `w_uk [h, r, n]`, `w_uv [h, r, v]`,
    `cache_seqlens [b]` = tokens in the cache *including* the new chunk (already written), so the
    i-th of `t_b` new tokens sits at position `cache_seqlens[b] - t_b + i` and sees keys up to it.
    Optional `kv_start [b]` int32 hides cache positions before it (left padding): those rows never
    reach the result, even NaN, and a query that sees no key gives `out = 0`, `lse = -inf`.
    Returns `out [tq, h, v]` in q's dtype and `lse [tq, h]` fp32. Computed expanded:
    `k_h = [latent @ w_uk_h | k_rope]`, `v_h = latent @ w_uv_h`. An fp8 cache comes with `kv_scale`
    (one fp32 per token slot, `m2la.quantization`).
    """
    kv_rank = w_uk.shape[1]
    outs, lses = [], []
    starts = cu_seqlens_q.tolist()
    seqlens = cache_seqlens.tolist()
    firsts = [0] * len(seqlens) if kv_start is None else kv_start.tolist()
    for seq, (q_lo, q_hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        num_new, num_keys = q_hi - q_lo, seqlens[seq]
        table = None if block_table is None else block_table[seq : seq + 1]
        cache = kv_cache[seq : seq + 1] if block_table is None else kv_cache
        scale = kv_scale if kv_scale is None or block_table is not None else kv_scale[seq : seq + 1]
        rows = gather_dequantized_rows(cache, scale, table, num_keys)[0]  # [s, r+2p] fp32
        key_pos = torch.arange(num_keys, device=rows.device)  # [s]
        rows = torch.where((key_pos >= firsts[seq])[:, None], rows, 0.0)  # hidden rows: keep NaN out
        latent, k_rope = rows[:, :kv_rank], rows[:, kv_rank:]
        k_nope = torch.einsum("sr,hrn->hsn", latent, w_uk.float())  # [h, s, n]
        values = torch.einsum("sr,hrv->hsv", latent, w_uv.float())  # [h, s, v]
        qn = q_nope[q_lo:q_hi].float().transpose(0, 1)  # [h, t, n]
        qr = q_rope[q_lo:q_hi].float().transpose(0, 1)  # [h, t, 2p]
        scores = (qn @ k_nope.transpose(1, 2) + qr @ k_rope.T) * softmax_scale  # [h, t, s]
        query_pos = num_keys - num_new + torch.arange(num_new, device=rows.device)  # [t]
        causal = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] >= firsts[seq])  # [t, s]
        scores = scores.masked_fill(~causal, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [h, t]
        probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        outs.append((probs @ values).transpose(0, 1))  # [t, h, v]
        lses.append(lse.transpose(0, 1))  # [t, h]
    if not outs:  # no sequences
        empty = q_nope.new_empty(0, q_nope.shape[1], dtype=torch.float32)
        return q_nope.new_empty(0, q_nope.shape[1], w_uv.shape[-1]), empty
    return torch.cat(outs).to(q_nope.dtype), torch.cat(lses)


def grouped_prefill_reference(
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`latent_prefill_reference` for a grouped layer (a lossless conversion of a GQA attention; see
    `grouped_decode_reference`): `q_rope [tq, h, 2P]` (head h's RoPE query over its group's P pairs)
    -> `out [tq, h, r/G]` (head h's group's latent columns, q's dtype) and `lse [tq, h]` fp32. Defined
    through the plain prefill with no nope key, the query placed at its group's RoPE columns and the
    latent itself as the value (its group's slice taken after), so it is that op's result."""
    from m2la.kernels.latent_decode.reference import grouped_query, own_group_slice

    tokens, heads, _ = q_rope.shape
    placed = grouped_query(q_rope, kv_rank, head_groups)[..., kv_rank:]  # [tq, h, 2p], zero off the group
    identity = torch.eye(kv_rank, device=q_rope.device).expand(heads, kv_rank, kv_rank)  # values = the latent
    out, lse = latent_prefill_reference(
        q_rope.new_zeros(tokens, heads, 0), placed, kv_cache, identity[..., :0], identity, cu_seqlens_q,
        cache_seqlens, softmax_scale, block_table, kv_start, kv_scale,
    )  # fmt: skip
    return own_group_slice(out, head_groups), lse
