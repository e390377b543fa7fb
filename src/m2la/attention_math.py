"""Latent attention as pure functions (the reference math every backend is tested against).

Shapes use the legend in DESIGN.md: ``b`` batch, ``t`` queries, ``s`` keys, ``h`` heads, ``r`` latent
rank, ``n`` no-RoPE dims per head, ``2p`` shared RoPE-key dims, ``v`` value dims per head.

Both paths compute, per head ``h``::

    score[t, s] = scale * (q_nope[t, h] . (W_uk[h] latent[s]) + q_rope[t, h] . k_rope[s])
    out[t, h]   = sum_s softmax(score)[t, s] * (W_uv[h] latent[s]) (+ value bias)

*expanded* materialises per-head keys and values from the latent (prefill); *absorbed* folds ``W_uk``
into the query and ``W_uv`` after the weighted sum, so attention runs over the cached latent itself
(decode). Rows whose keys are all masked give a zero output (plus the value bias) and ``lse = -inf``.
"""

from __future__ import annotations

import weakref

import torch

__all__ = [
    "attention_bias",
    "latent_attention_expanded",
    "latent_attention_expanded_sdpa",
    "latent_attention_absorbed",
    "latent_mqa",
    "absorbed_from_rows",
    "absorb_query",
    "absorbed_query",
    "grouped_attention_from_rows",
    "masked_softmax_attention",
    "causal_window_starts",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_bias(
    mask: torch.Tensor | None, num_queries: int, num_keys: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Turn any accepted mask into an additive bias broadcastable to ``[b, h, t, s]``.

    ``None``: causal, the ``t`` queries being the last ``t`` of the ``s`` keys. Bool ``[.., t, s]``:
    True where a query may attend. Float: already additive (large negative = masked). 2-D bool/int
    ``[b, s]``: a padding mask (1 = real token), combined with causal.
    """
    offset = num_keys - num_queries
    if offset < 0:
        raise ValueError(f"more queries ({num_queries}) than keys ({num_keys})")
    if mask is None or mask.dim() == 2:
        query_pos = torch.arange(num_queries, device=device)[:, None] + offset
        allowed = torch.arange(num_keys, device=device)[None, :] <= query_pos  # [t, s]
        if mask is not None:
            if mask.shape[-1] != num_keys:
                raise ValueError(f"padding mask covers {mask.shape[-1]} keys, expected {num_keys}")
            allowed = allowed[None, None] & mask.to(torch.bool)[:, None, None, :]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        if mask.shape[-2:] != (num_queries, num_keys):
            raise ValueError(f"mask ends in {tuple(mask.shape[-2:])}, expected ({num_queries}, {num_keys})")
        return mask.to(dtype)
    if allowed.shape[-2:] != (num_queries, num_keys):
        raise ValueError(f"mask ends in {tuple(allowed.shape[-2:])}, expected ({num_queries}, {num_keys})")
    bias = torch.zeros(allowed.shape, device=device, dtype=dtype)
    return bias.masked_fill(~allowed, float("-inf"))


def masked_softmax_attention(
    scores: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of ``scores [b, h, t, s]`` applied to ``values [b, s, h|1, e]``.

    Returns ``out [b, t, h, e]`` and ``lse [b, h, t]``; fully masked rows give 0 and ``-inf``.
    """
    if bias is not None:
        scores = scores + bias
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # [b, h, t, s]
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    lse = (row_max + row_sum.log()).squeeze(-1)
    if values.shape[2] == 1:  # shared values (MQA): one matmul for all heads
        out = torch.einsum("bhts,bse->bthe", probs, values[:, :, 0])
    else:
        out = torch.einsum("bhts,bshe->bthe", probs, values)
    return out, lse


def latent_attention_expanded(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill path: expand per-head keys/values from the latent, then attend.

    q_nope ``[b, t, h, n]``, q_rope ``[b, t, h, 2p]`` (rotated), latent ``[b, s, r]``,
    k_rope ``[b, s, 2p]`` (rotated), w_uk ``[h, n, r]``, w_uv ``[h, v, r]``, v_bias ``[h, v]``.
    Returns ``[b, t, h, v]`` in q's dtype.
    """
    dtype = _compute_dtype(q_rope.dtype)
    t, s = q_rope.shape[1], latent.shape[1]
    latent_c = latent.to(dtype)
    k_nope = torch.einsum("bsr,hnr->bshn", latent_c, w_uk.to(dtype))
    values = torch.einsum("bsr,hvr->bshv", latent_c, w_uv.to(dtype))
    scores = torch.einsum("bthn,bshn->bhts", q_nope.to(dtype), k_nope)
    scores = scores + torch.einsum("bthp,bsp->bhts", q_rope.to(dtype), k_rope.to(dtype))
    bias = attention_bias(mask, t, s, latent.device, dtype)
    out, _ = masked_softmax_attention(scores * softmax_scale, values, bias)
    if v_bias is not None:
        out = out + v_bias.to(dtype)
    return out.to(q_rope.dtype)


def _sdpa_mask(
    mask: torch.Tensor | None, t: int, s: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for torch SDPA meaning the same as :func:`attention_bias`."""
    if mask is None and (t == s or t == 1):
        return None, t == s and t > 1  # a single last query sees every key
    if mask is not None and mask.dim() == 4:
        return (mask if mask.dtype == torch.bool else mask.to(dtype)), False
    return attention_bias(mask, t, s, device, torch.float32) == 0, False


def expand_latent_kv(
    latent: torch.Tensor, k_rope: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys and values from the latent, in ``dtype``: latent ``[b, s, r]``, k_rope ``[b, s, 2p]``
    (rotated, shared by the heads), w_uk ``[h, n, r]``, w_uv ``[h, v, r]`` -> keys ``[b, h, s, n + 2p]``,
    values ``[b, h, s, v]``."""
    b, s = latent.shape[:2]
    latent = latent.to(dtype)
    k_nope = torch.einsum("bsr,hnr->bhsn", latent, w_uk.to(dtype))
    keys = torch.cat((k_nope, k_rope.to(dtype)[:, None].expand(b, w_uk.shape[0], s, -1)), dim=-1)
    values = torch.einsum("bsr,hvr->bhsv", latent, w_uv.to(dtype))
    return keys, values


def latent_attention_expanded_sdpa(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`latent_attention_expanded` through torch's fused SDPA (no ``[t, s]`` score matrix in memory
    for causal prefill); computes in the inputs' dtype. Same arguments and result."""
    dtype = q_rope.dtype
    keys, values = expand_latent_kv(latent, k_rope, w_uk, w_uv, dtype)  # [b, h, s, n + 2p], [b, h, s, v]
    queries = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [b, h, t, n + 2p]
    out = sdpa_zeroing_dead_queries(queries, keys, values, mask, softmax_scale).transpose(1, 2)  # [b, t, h, v]
    if v_bias is not None:
        out = out + v_bias.to(dtype)
    return out


def sdpa_zeroing_dead_queries(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, softmax_scale: float
) -> torch.Tensor:
    """torch SDPA of ``queries [b, h, t, e]`` over ``keys [b, h, s, e]``, ``values [b, h, s, v]`` under
    ``mask`` (as :func:`attention_bias` reads it) -> ``[b, h, t, v]``; queries that see no key give 0."""
    t, s = queries.shape[2], keys.shape[2]
    attn_mask, is_causal = _sdpa_mask(mask, t, s, keys.device, queries.dtype)
    dead = None
    if attn_mask is not None:
        # Queries that see no key (left padding): CUDA's fused SDPA kernels return NaN there, which
        # then leaks into later layers through 0 * NaN. Let them see every key, then zero them.
        visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        dead = ~visible.any(dim=-1, keepdim=True)  # [b|1, h|1, t, 1]
        attn_mask = attn_mask | dead if attn_mask.dtype == torch.bool else attn_mask.masked_fill(dead, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=attn_mask, is_causal=is_causal, scale=softmax_scale
    )
    return out if dead is None else out.masked_fill(dead, 0.0)


def grouped_attention_from_rows(
    q_rope: torch.Tensor,
    rows: torch.Tensor,
    kv_rank: int,
    head_groups: int,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    fused_softmax: bool | None = None,
) -> torch.Tensor:
    """GQA over a *grouped* layer's cache rows (``m2la.conversion.grouped_head_count``: the lossless
    conversion of a GQA attention with ``G = head_groups`` KV heads): head ``h`` of group
    ``g = h // (h / G)`` scores only its group's ``P`` RoPE pairs and reads only its group's latent slice.

    q_rope ``[b, t, h, 2P]`` (each head's own pairs, x half then y half; rotated), rows
    ``[b, s, r + 2p]`` with ``p = G P`` in the half layout -> ``[b, t, h, r / G]`` in q's dtype: head
    ``h``'s attention output over latent columns ``[g r/G, (g+1) r/G)``. Equal to :func:`latent_mqa`
    with a query that is zero outside those columns. Queries with no visible key give 0.

    ``fused_softmax`` (prefill): torch SDPA over each group's keys gathered into ``[b, G, s, 2P]``,
    GQA's work (no ``[t, s]`` scores in memory). False (decode): two GEMMs with ``M = t h`` over the
    rows as they lie, the scores over the RoPE columns only (the latent query is zero) with each
    head's query at its group's pairs: one pass over the cache. Per-group GEMMs over strided column
    slices ran 4-5x slower on CPU. None picks SDPA for more than 16 queries.
    """
    b, t, h, width = q_rope.shape
    s = rows.shape[1]
    groups, pairs = head_groups, width // 2
    per_group, value_dim = h // groups, kv_rank // groups
    dtype = q_rope.dtype
    rows = rows.to(dtype)
    if fused_softmax if fused_softmax is not None else t > 16:
        keys = rows[..., kv_rank:].unflatten(-1, (2, groups, pairs)).permute(0, 3, 1, 2, 4)  # [b, G, s, 2, P]
        keys = keys.reshape(b, groups, s, width)
        values = rows[..., :kv_rank].unflatten(-1, (groups, value_dim)).transpose(1, 2)  # [b, G, s, r/G]
        queries = q_rope.transpose(1, 2)  # [b, h, t, 2P]
        if per_group > 1:  # GQA's usual repeat (enable_gqa measured no faster on CPU)
            keys = keys.repeat_interleave(per_group, dim=1)
            values = values.repeat_interleave(per_group, dim=1)
        return sdpa_zeroing_dead_queries(queries, keys, values, mask, softmax_scale).transpose(1, 2)
    placed = q_rope.new_zeros(b, t, groups, per_group, 2, groups, pairs)  # [b, t, g, i, half, g', P]
    placed.diagonal(dim1=2, dim2=5).copy_(q_rope.view(b, t, groups, per_group, 2, pairs).permute(0, 1, 3, 4, 5, 2))
    scores = torch.bmm(placed.view(b, t * h, 2 * groups * pairs), rows[..., kv_rank:].transpose(1, 2))
    scores = scores * softmax_scale  # [b, t h, s]
    if mask is not None or t > 1:
        bias = attention_bias(mask, t, s, rows.device, dtype)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).transpose(1, 2)  # [b|1, t, h|1, s]
        scores = (scores.view(b, t, h, s) + bias).view(b, t * h, s)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.nan_to_num(0.0)  # queries with no visible key (padding) output 0
    out = torch.bmm(probs, rows[..., :kv_rank]).view(b, t, groups, per_group, groups, value_dim)
    return out.diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3).reshape(b, t, h, value_dim)  # head h's own group


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """Fold the key up-projection into the query: ``[b, t, h, n] x [h, n, r] -> [b, t, h, r]``."""
    return torch.einsum("bthn,hnr->bthr", q_nope, w_uk)


def absorbed_query(q_nope: torch.Tensor, q_rope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """The absorbed decode's query ``[q_nope W_uk | q_rope]`` ``[b, t, h, r + 2p]``, in q_nope's dtype;
    for a layer with ``n = 0`` (no latent query) ``q_rope [b, t, h, 2p]`` alone, which `latent_mqa`
    and the decode kernels take as the same query with a zero latent part."""
    if q_nope.shape[-1] == 0:
        return q_rope
    return torch.cat((absorb_query(q_nope, w_uk.to(q_nope.dtype)), q_rope), dim=-1)


def latent_mqa(
    query: torch.Tensor,
    rows: torch.Tensor,
    kv_rank: int,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absorbed attention as MQA over the cache rows themselves (the fused decode kernel's contract).

    query ``[b, t, h, r + 2p]`` (``[q_nope W_uk | q_rope]``), rows ``[b, s, r + 2p]`` (``[latent | k_rope]``).
    A layer without a no-RoPE part (``n = 0``: a lossless conversion, fine-tuned out of its grouped
    form) has a zero latent query; pass ``q_rope [b, t, h, 2p]`` alone and the scores skip those
    ``r`` columns. Returns ``out_latent [b, t, h, r]`` and ``lse [b, h, t]``. With
    ``return_lse=False`` (and not fp64) it computes in the inputs' dtype with two batched GEMMs and
    returns ``lse=None``; otherwise an explicit softmax in fp32/fp64 (the oracle).
    """
    t, s = query.shape[1], rows.shape[1]
    keys = rows if query.shape[-1] == rows.shape[-1] else rows[..., kv_rank:]  # [b, s, r + 2p] or [b, s, 2p]
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"query width {query.shape[-1]} matches neither the rows ({rows.shape[-1]}) nor their RoPE key "
            f"({rows.shape[-1] - kv_rank})"
        )
    if not return_lse and query.dtype != torch.float64:
        # two GEMMs with M = t*h against the shared rows; torch's SDPA with enable_gqa was ~50x slower
        # here on CPU (it expands the single key "head" to every query head)
        b, _, h, c = query.shape
        scores = torch.bmm(query.reshape(b, t * h, c), keys.transpose(1, 2).to(query.dtype)) * softmax_scale
        if mask is not None or t > 1:
            bias = attention_bias(mask, t, s, rows.device, scores.dtype)
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).transpose(1, 2)  # [b|1, t, h|1, s]
            scores = (scores.view(b, t, h, s) + bias).view(b, t * h, s)
        probs = torch.softmax(scores, dim=-1)
        if mask is not None:
            probs = probs.nan_to_num(0.0)  # queries with no visible key (padding) output 0
        out = torch.bmm(probs, rows[..., :kv_rank].to(query.dtype))  # [b, t*h, r]
        return out.view(b, t, h, kv_rank), None
    dtype = _compute_dtype(query.dtype)
    scores = torch.einsum("bthc,bsc->bhts", query.to(dtype), keys.to(dtype)) * softmax_scale
    bias = attention_bias(mask, t, s, rows.device, dtype)
    return masked_softmax_attention(scores, rows[:, :, None, :kv_rank].to(dtype), bias)


def latent_attention_absorbed(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode path: attention in latent space (MQA over ``[latent | k_rope]`` with V = latent).

    Same arguments as :func:`latent_attention_expanded`. Returns ``out [b, t, h, v]`` in q's dtype
    and ``lse [b, h, t]`` (natural log, compute dtype).
    """
    dtype = _compute_dtype(q_rope.dtype)
    query = torch.cat((absorb_query(q_nope.to(dtype), w_uk.to(dtype)), q_rope.to(dtype)), dim=-1)
    out, lse = absorbed_from_rows(query, torch.cat((latent, k_rope), dim=-1), w_uv, softmax_scale, mask, v_bias)
    return out.to(q_rope.dtype), lse


def absorbed_from_rows(
    query: torch.Tensor,
    rows: torch.Tensor,
    w_uv: torch.Tensor,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`latent_mqa` followed by the value up-projection: ``out [b, t, h, v]``, ``lse``."""
    kv_rank = w_uv.shape[-1]
    out_latent, lse = latent_mqa(query, rows, kv_rank, softmax_scale, mask, return_lse)
    out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv.to(out_latent.dtype))  # [b, t, h, v]
    if v_bias is not None:
        out = out + v_bias.to(out.dtype)
    return out, lse


# The last mask `causal_window_starts` checked: (weak reference to it, its version and the call's
# shapes, the answer). Every layer of a forward gets the same mask object.
_last_window_check: tuple | None = None

NOT_LEFT_PADDING = (
    "the triton backend takes causal masks with left padding only; use the reference backend "
    "for other masks (sliding windows, custom masks)"
)


def causal_window_starts(
    mask: torch.Tensor | None, batch: int, num_queries: int, num_keys: int, device: torch.device,
    query_offset: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """Per-sequence first visible key ``[b]`` int32 if ``mask`` is "causal, keys before a start hidden".

    ``query_offset``: the first query's key position, a 0-d tensor (a static-capacity cache, whose
    keys past the queries are unfilled capacity); None puts the queries at the end of the keys.

    That is the only mask form the fused kernels take (left padding); returns None for any other
    mask (e.g. sliding windows or holes), so callers can refuse rather than compute something else.
    Checking a mask reads one flag on the host (a device sync), so the answer for the last mask is
    kept while that tensor lives unmodified (its version counter; inference tensors, which have
    none, are checked every call): the other layers of the forward reuse it without a sync, also
    when each passes its own view of the same columns of one mask (a static cache's layers). The
    returned tensor may be shared between calls: read it, do not modify it.

    Under torch.compile the check cannot return None (a data-dependent branch is a graph break):
    it asserts on the device instead (`torch._assert_async`, message `NOT_LEFT_PADDING`), and the
    memo is skipped.
    """
    global _last_window_check
    if mask is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    if torch.compiler.is_compiling():
        starts, left_padding = causal_window(mask, batch, num_queries, num_keys, device, query_offset)
        torch._assert_async(left_padding, NOT_LEFT_PADDING)
        return starts
    if query_offset is not None:  # the memo keys on shapes, not on an offset's value
        return _check_causal_window(mask, batch, num_queries, num_keys, device, query_offset)
    # A view's values are fixed by its base tensor, its place in it and their shared version counter,
    # so layers that each slice the same mask (a static cache's filled columns) share one check.
    base = mask if mask._base is None else mask._base
    key = None
    if not mask.is_inference():
        geometry = (mask.dtype, mask.storage_offset(), tuple(mask.shape), mask.stride())
        key = (mask._version, geometry, batch, num_queries, num_keys, torch.device(device))
    last = _last_window_check
    if key is not None and last is not None and last[0]() is base and last[1] == key:
        return last[2]
    starts = _check_causal_window(mask, batch, num_queries, num_keys, device)
    if key is not None:
        _last_window_check = (weakref.ref(base), key, starts)
    return starts


def _check_causal_window(
    mask: torch.Tensor, batch: int, num_queries: int, num_keys: int, device: torch.device,
    query_offset: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    starts, left_padding = causal_window(mask, batch, num_queries, num_keys, device, query_offset)
    return starts if bool(left_padding) else None  # the one host sync


def causal_window(
    mask: torch.Tensor, batch: int, num_queries: int, num_keys: int, device: torch.device,
    query_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(starts ``[b]`` int32: each sequence's first visible key, left_padding: 0-d bool, whether
    ``mask`` is exactly "causal, keys before the start hidden" for every head), computed without a
    host sync or a data-dependent shape. Queries before the start (padding queries) may see anything.
    ``query_offset`` (0-d tensor): the first query's key position; None = the last ``t`` keys."""
    bias = attention_bias(mask, num_queries, num_keys, device, torch.float32)
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # [b|1, h|1, t, s]
    same_for_every_head = (bias == bias[:, :1]).all()
    allowed = (bias == 0).expand(batch, -1, num_queries, num_keys)[:, 0]  # [b, t, s]
    visible_last = allowed[:, -1]  # [b, s]: the last query sees every key it may see
    starts = torch.where(visible_last.any(-1), visible_last.float().argmax(-1), num_keys)  # [b]
    key_idx = torch.arange(num_keys, device=device)
    offset = num_keys - num_queries if query_offset is None else query_offset
    query_pos = torch.arange(num_queries, device=device)[:, None] + offset  # [t, 1]
    expected = (key_idx[None, None, :] <= query_pos[None]) & (key_idx[None, None, :] >= starts[:, None, None])
    real_query = query_pos[None, :, 0] >= starts[:, None]  # [b, t]
    matches = ((allowed == expected) | ~real_query[..., None]).all()
    return starts.to(torch.int32), same_for_every_head & matches
