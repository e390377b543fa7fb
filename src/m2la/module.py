"""The M²LA attention layer: holds the weights and calls the functions in ``m2la.attention_math``."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from . import attention_math, rope
from .backends import resolve_backend
from .cache import records_grad
from .config import M2LAConfig

__all__ = ["M2LAttention", "RMSNorm", "LatentCacheProtocol", "pin_head_groups"]


class LatentCacheProtocol(Protocol):
    def append_latent(self, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """Append ``rows [b, t, r + 2p]`` to layer ``layer_idx`` and return all its rows ``[b, s, r + 2p]``.

        A cache that stores fp8 rows may also offer ``quantized_rows(layer_idx) -> (rows, scales [b, s])``
        for the Triton kernels to read directly; such a cache's ``append_latent`` also takes
        ``dequantize=False``, which skips dequantizing the whole layer and returns None when it holds fp8 rows.

        A cache may also offer ``reserve_latent(layer_idx, b, t, width, dtype, device) -> (rows [b, s, width],
        scales [b, s] | None)``, whose last ``t`` rows (and fp8 scales) are left for the caller to write:
        the Triton backend then rotates, quantizes and stores the new rows with one fused kernel.

        A static-capacity cache (fixed shapes, for torch.compile and CUDA graphs) also offers
        ``static_length(layer_idx) -> Tensor``: a 0-d int64 count of the rows held, updated in place.
        Its ``append_latent`` / ``reserve_latent`` / ``quantized_rows`` then return all ``capacity``
        rows ``[b, capacity, r + 2p]``; the new rows end at ``static_length`` after the call, and
        attention reads only up to there.
        """


# The last step's index tensors (see `_step_indices`): ((b, t, s, device), (slots, seqlens)).
_last_step_indices: tuple | None = None


def _step_indices(batch: int, new_tokens: int, total: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a step of `new_tokens` rows appended to contiguous rows `[b, total, d]` (addressed as `b`
    pages of `total` slots): the new rows' cache slots `[b * t]` int64 (sequence i's token j ->
    `i * total + total - t + j`) and every sequence's length `[b]` int32. Each layer of a step needs
    the same two, so they are made once a step (two small device ops a layer before); callers read
    them and never write them."""
    global _last_step_indices
    if torch.compiler.is_compiling():  # traced: the memo would only add graph breaks
        return _make_step_indices(batch, new_tokens, total, device)
    key = (batch, new_tokens, total, torch.device(device))
    last = _last_step_indices
    if last is not None and last[0] == key:
        return last[1]
    indices = _make_step_indices(batch, new_tokens, total, device)
    _last_step_indices = (key, indices)
    return indices


def _make_step_indices(batch: int, new_tokens: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if new_tokens == 1:  # decode: one op, not four
        slots = torch.arange(total - 1, batch * total, total, device=device)  # [b] int64
    else:
        positions = torch.arange(total - new_tokens, total, device=device)
        slots = (torch.arange(batch, device=device)[:, None] * total + positions).flatten()  # [b * t] int64
    return slots, torch.full((batch,), total, dtype=torch.int32, device=device)


def _filled_rows(
    end: torch.Tensor, new_tokens: int, rows: torch.Tensor, quantized: tuple | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """What attention reads of a static-capacity cache's rows ``[b, capacity, w]`` (fp8: ``quantized``
    rows and scales ``[b, capacity]``) once the ``new_tokens`` queries' rows are written, ``end``
    (0-d tensor) rows being held -> (rows, quantized, mask, query_offset).

    Eager: reads ``end`` on the host (one sync) and keeps the first ``end`` rows and mask columns,
    so the queries are the last keys as with a growing cache (query_offset None). Traced
    (torch.compile): keeps every row, so shapes stay fixed, and returns the first query's position
    ``end - new_tokens`` as a tensor; with no mask, a causal one from that position hides the
    unfilled rows."""
    capacity = rows.shape[1]
    if torch.compiler.is_compiling():
        offset = end - new_tokens
        if mask is None:
            query_pos = torch.arange(new_tokens, device=rows.device)[:, None] + offset
            mask = (torch.arange(capacity, device=rows.device) <= query_pos)[None, None]  # [1, 1, t, capacity]
        return rows, quantized, mask, offset
    filled = int(end)
    rows = rows[:, :filled]
    if quantized is not None:
        quantized = (quantized[0][:, :filled], quantized[1][:, :filled])
    if mask is not None and mask.shape[-1] == capacity:  # a mask over the whole capacity (transformers')
        mask = mask[..., :filled]  # a new view each layer; the mask check keys on its base and place
    return rows, quantized, mask, None


def pin_head_groups(model: nn.Module) -> list[int]:
    """Check every M²LA layer of ``model`` for the grouped layout now and let traced code
    (``torch.compile``) rely on the answer: compiled decode steps of grouped layers (lossless
    conversions of GQA attention) then run ``grouped_decode_attention``, GQA's work, instead of the
    plain decode. Returns each layer's group count (0: not grouped).

    Eager calls check the weights themselves; compiled code cannot see a weight change, so call this
    again after changing the weights (training, editing). A layer's ``pinned_head_groups = 0`` sends
    its compiled decode back to the plain kernel.
    """
    groups = []
    for module in model.modules():
        if isinstance(module, M2LAttention):
            module.pinned_head_groups = module.head_groups()
            groups.append(module.pinned_head_groups)
    return groups


def grouped_queries(q_rope: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped layer's RoPE queries ``[b, t, h, 2p]`` (zero outside each head's group) -> each head's
    own pairs ``[b, t, h, 2P]`` (x half then y half), ``p = G P``. Heads are group-major
    (``h = g * H/G + i``), so this is a diagonal of ``[.., g, i, half, g', P]``."""
    b, t, h, width = q_rope.shape
    pairs = width // (2 * groups)
    q = q_rope.reshape(b, t, groups, h // groups, 2, groups, pairs).diagonal(dim1=2, dim2=5)  # [b, t, i, 2, P, g]
    return q.movedim(-1, 2).reshape(b, t, h, 2 * pairs)


def grouped_value_maps(w_uv: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped layer's value up-projection ``[h, v, r]`` (zero outside each head's group's latent
    slice) -> head h's map from its group's slice, ``[h, v, r / G]``."""
    h, v, r = w_uv.shape
    w = w_uv.reshape(groups, h // groups, v, groups, r // groups).diagonal(dim1=0, dim2=3)  # [i, v, r/G, g]
    return w.movedim(-1, 0).reshape(h, v, r // groups)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 and cast back (as the source models do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class M2LAttention(nn.Module):
    """Multi-head latent attention in the InternVideo3 / DeepSeek-V3 layout.

    Only ``[latent | rotated k_rope]`` (``r + 2p`` values per token) is ever cached.
    """

    def __init__(self, config: M2LAConfig, layer_idx: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.layer_idx = layer_idx
        c = config
        h = c.num_heads
        if c.q_rank is not None:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_rank, bias=c.q_bias)
            self.q_a_norm = RMSNorm(c.q_rank, c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_rank, h * c.q_proj_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, h * c.q_proj_head_dim, bias=c.q_bias)
        self.q_norm = RMSNorm(c.q_in_dim, c.norm_eps) if c.query_norm else None
        # per-head [out = n + 2p, in = q_in] map, like a Linear weight per head
        self.q_up = nn.Parameter(torch.zeros(h, c.query_head_dim, c.q_in_dim)) if c.q_in_dim is not None else None
        kv_a_width = c.kv_in_dim if c.kv_in_dim is not None else c.cache_width
        self.kv_a_proj = nn.Linear(c.hidden_size, kv_a_width, bias=c.kv_a_bias)
        self.key_norm = RMSNorm(c.key_norm_dim, c.norm_eps) if c.key_norm_heads else None
        self.kv_a_mix = nn.Linear(c.kv_in_dim, c.cache_width, bias=False) if c.kv_in_dim is not None else None
        self.kv_b_proj = nn.Linear(c.kv_rank, h * (c.qk_nope_dim + c.v_head_dim), bias=c.kv_b_bias)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=c.o_bias)
        # plain tensors, not buffers: module.to(bfloat16) must not round the frequencies
        self.rope_inv_freq = torch.tensor(c.rope_inv_freq, dtype=torch.float64)
        self.rope_axis = torch.tensor(c.rope_axis, dtype=torch.long)
        self.rope_source_column = torch.tensor(c.rope_source_column, dtype=torch.long)
        self.pinned_head_groups = 0  # what traced code takes for `head_groups()`; see `pin_head_groups`

    # --- pieces -------------------------------------------------------------------------------

    def project_queries(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, t, d] -> q_nope [b, t, h, n], q_rope [b, t, h, 2p]`` (RoPE not applied yet)."""
        c = self.config
        if c.q_rank is not None:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.unflatten(-1, (c.num_heads, c.q_proj_head_dim))  # [b, t, h, q_in]
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.q_up is not None:
            q = torch.einsum("bthi,hoi->btho", q, self.q_up.to(q.dtype))
        return q[..., : c.qk_nope_dim], q[..., c.qk_nope_dim :]

    def encode_kv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, t, d] -> latent [b, t, r], k_rope [b, t, 2p]`` (RoPE not applied yet)."""
        c = self.config
        kv = self.kv_a_proj(hidden)
        if self.key_norm is not None:
            n_key = c.key_norm_heads * c.key_norm_dim
            keys = self.key_norm(kv[..., :n_key].unflatten(-1, (c.key_norm_heads, c.key_norm_dim)))
            kv = torch.cat((keys.flatten(-2), kv[..., n_key:]), dim=-1)
        if self.kv_a_mix is not None:
            kv = self.kv_a_mix(kv)
        return kv[..., : c.kv_rank], kv[..., c.kv_rank :]

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``w_uk [h, n, r]``, ``w_uv [h, v, r]`` and the value bias ``[h, v]`` (key bias cancels in softmax)."""
        c = self.config
        w = self.kv_b_proj.weight.unflatten(0, (c.num_heads, c.qk_nope_dim + c.v_head_dim))
        v_bias = None
        if self.kv_b_proj.bias is not None:
            v_bias = self.kv_b_proj.bias.unflatten(0, (c.num_heads, -1))[:, c.qk_nope_dim :]
        return w[:, : c.qk_nope_dim], w[:, c.qk_nope_dim :], v_bias

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair ``cos, sin [b, t, p]`` from positions ``[b, t]`` or M-RoPE ``[3, b, t]``."""
        angles = rope.rope_angles(positions, self.rope_inv_freq, self.rope_axis)  # fp64
        cos, sin = rope.cos_sin(angles, self.config.rope_scaling)
        dtype = torch.float64 if self.kv_a_proj.weight.dtype == torch.float64 else torch.float32
        return cos.to(dtype), sin.to(dtype)

    def head_groups(self) -> int:
        """``G`` if this layer is grouped (``m2la.conversion.grouped_head_count``: a lossless conversion of
        a GQA attention whose weights kept that layout), else 0. Eagerly it is checked on the weights
        once per change of them (their version counters). Traced code cannot see weights change, so
        there it is what :func:`pin_head_groups` pinned (0 unless pinned)."""
        if torch.compiler.is_compiling():  # no data pointers or version counters in traced code
            return self.pinned_head_groups
        q_up, kv_b = self.q_up, self.kv_b_proj.weight
        key = tuple(
            (t.data_ptr(), None if t.is_inference() else t._version)
            for t in (kv_b,) + (() if q_up is None else (q_up,))
        )
        memo = getattr(self, "_head_groups_memo", None)
        if memo is None or memo[0] != key:
            from .conversion import grouped_head_count

            memo = (key, grouped_head_count(self.config, q_up, self.up_projections()[1]))
            self._head_groups_memo = memo
        return memo[1]

    def use_absorbed(self, num_queries: int) -> bool:
        """Absorbed costs ~2r per query and key, expanded ~r(n+v) per key: absorb for short query blocks."""
        c = self.config
        return 2 * num_queries <= max(c.qk_nope_dim + c.v_head_dim, 1)

    # --- forward ------------------------------------------------------------------------------

    def attend(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCacheProtocol | None = None,
        absorbed: bool | None = None,
    ) -> torch.Tensor:
        """hidden ``[b, t, d]``, per-pair cos/sin ``[b|1, t, p]`` -> ``[b, t, d]``.

        ``attention_mask``: see :func:`m2la.attention_math.attention_bias` (None = causal).
        ``absorbed``: force the decode (True) or prefill (False) path; None picks by query count.
        """
        c = self.config
        q_nope, q_rope = self.project_queries(hidden)
        latent, k_rope = self.encode_kv(hidden)
        q_rope = rope.apply_rope_half(q_rope, cos[:, :, None], sin[:, :, None])
        fused = resolve_backend(None, hidden) == "triton"
        reserve = getattr(cache, "reserve_latent", None) if fused and not records_grad(latent, k_rope) else None
        stored = getattr(cache, "quantized_rows", None) if fused else None
        static_length = getattr(cache, "static_length", None)  # static-capacity caches only
        quantized = None
        if reserve is not None:  # one fused kernel rotates, quantizes and writes the new rows in place
            rows, scales = self._write_cache_fused(reserve, latent, k_rope, cos, sin, static_length)
            quantized = (rows, scales) if scales is not None else None
        else:
            rows = torch.cat((latent, rope.apply_rope_half(k_rope, cos, sin)), dim=-1)  # [b, t, r + 2p]
            if stored is not None:
                # the kernels read fp8 rows as stored: skip dequantizing the whole layer every step
                rows = cache.append_latent(self.layer_idx, rows, dequantize=False)  # [b, s, r + 2p] or None
                quantized = stored(self.layer_idx)
            elif cache is not None:
                rows = cache.append_latent(self.layer_idx, rows)  # [b, s, r + 2p]
        query_offset = None  # None: the queries are the last t keys
        if static_length is not None:
            rows, quantized, attention_mask, query_offset = _filled_rows(
                static_length(self.layer_idx), hidden.shape[1], rows, quantized, attention_mask
            )
        w_uk, w_uv, v_bias = self.up_projections()
        groups = 0 if fused or records_grad(q_rope, w_uv) else self.head_groups()  # grouped: GQA's work
        if groups:
            use_sdpa = None if absorbed is None else not absorbed
            out_group = attention_math.grouped_attention_from_rows(
                grouped_queries(q_rope, groups), rows, c.kv_rank, groups, c.softmax_scale, attention_mask, use_sdpa
            )  # [b, t, h, r / G]
            out = torch.einsum("bthr,hvr->bthv", out_group, grouped_value_maps(w_uv, groups).to(out_group.dtype))
            if v_bias is not None:
                out = out + v_bias.to(out.dtype)
        elif fused:
            out = self._attend_fused(q_nope, q_rope, rows, w_uk, w_uv, attention_mask, quantized, query_offset)
            if v_bias is not None:
                out = out + v_bias.to(out.dtype)
        elif absorbed if absorbed is not None else self.use_absorbed(hidden.shape[1]):
            out, _ = attention_math.absorbed_from_rows(
                attention_math.absorbed_query(q_nope, q_rope, w_uk),
                rows,
                w_uv,
                c.softmax_scale,
                attention_mask,
                v_bias,
                return_lse=False,
            )
        else:
            out = attention_math.latent_attention_expanded_sdpa(
                q_nope,
                q_rope,
                rows[..., : c.kv_rank],
                rows[..., c.kv_rank :],
                w_uk,
                w_uv,
                c.softmax_scale,
                attention_mask,
                v_bias,
            )
        return self.o_proj(out.to(hidden.dtype).flatten(-2))

    def _write_cache_fused(
        self, reserve, latent, k_rope, cos, sin, static_length=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Store ``[latent [b, t, r] | RoPE(k_rope [b, t, 2p])]`` into the cache with the fused write kernel.

        ``reserve``: the cache's ``reserve_latent``. Returns the layer's rows ``[b, s, r + 2p]`` (and fp8
        scales ``[b, s]``), the new ones last. Those rows are a paged cache of ``b`` blocks of ``s`` slots,
        so sequence ``i``'s token ``j`` goes to slot ``i * s + s - t + j``. A static-capacity cache
        (``static_length``) returns all its rows instead; the new ones end at its length (a tensor).
        """
        from . import kernels

        b, t, r = latent.shape
        p = cos.shape[-1]
        rows, scales = reserve(self.layer_idx, b, t, r + k_rope.shape[-1], latent.dtype, latent.device)
        if static_length is None:
            slots, _ = _step_indices(b, t, rows.shape[1], latent.device)
        else:  # no host read: the slots come from the length tensor
            positions = static_length(self.layer_idx) - t + torch.arange(t, device=latent.device)  # [t]
            slots = (torch.arange(b, device=latent.device)[:, None] * rows.shape[1] + positions).flatten()
        kernels.write_latent_cache(
            rows, latent.flatten(0, 1), k_rope.flatten(0, 1), cos.expand(b, t, p).reshape(b * t, p),
            sin.expand(b, t, p).reshape(b * t, p), slots, kv_scale=scales, backend="triton",
        )  # fmt: skip
        return rows, scales

    def _attend_fused(
        self, q_nope, q_rope, rows, w_uk, w_uv, attention_mask, quantized=None, query_offset=None
    ) -> torch.Tensor:  # fmt: skip
        """The Triton kernels over the contiguous cache rows: decode for one query, chunked prefill otherwise.

        q_nope ``[b, t, h, n]``, q_rope ``[b, t, h, 2p]``, rows ``[b, s, r + 2p]``; returns ``[b, t, h, v]``
        without the value bias. ``quantized``: an fp8 cache's stored ``(rows, scales [b, s])``, which
        the kernels then read instead of ``rows`` (then None). ``query_offset`` (0-d tensor): the first
        query's row, the rows after the queries being unfilled capacity; None: the queries are the last rows.
        """
        from . import kernels

        c = self.config
        b, t, h = q_rope.shape[:3]
        rows, kv_scale = quantized if quantized is not None else (rows, None)
        s = rows.shape[1]
        starts = attention_math.causal_window_starts(attention_mask, b, t, s, rows.device, query_offset)
        if starts is None:
            raise ValueError(attention_math.NOT_LEFT_PADDING)
        if query_offset is None:
            _, seqlens = _step_indices(b, t, s, rows.device)
        else:  # every sequence holds the rows up to its last query
            seqlens = (query_offset + t).to(torch.int32).reshape(1).expand(b).contiguous()  # [b]
        cu_seqlens = None if t == 1 else torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=rows.device)
        groups = self.head_groups()
        if groups:  # GQA's work: each KV group's heads read only their group's columns
            q = grouped_queries(q_rope, groups)  # [b, t, h, 2P]
            if t == 1:
                out_group, _ = kernels.grouped_decode_attention(
                    q[:, 0], rows, seqlens, c.softmax_scale, c.kv_rank, groups, kv_start=starts, kv_scale=kv_scale
                )  # [b, h, r / G]
            else:
                out_group, _ = kernels.grouped_prefill_attention(
                    q.flatten(0, 1), rows, cu_seqlens, seqlens, c.softmax_scale, c.kv_rank, groups, None, starts,
                    kv_scale=kv_scale, max_seqlen_q=t,
                )  # [b t, h, r / G]  # fmt: skip
            w_group = grouped_value_maps(w_uv, groups).to(out_group.dtype)
            return torch.einsum("bthr,hvr->bthv", out_group.view(b, t, h, -1), w_group)
        if t == 1:
            q = attention_math.absorbed_query(q_nope, q_rope, w_uk)[:, 0]  # [b, h, r + 2p], or [b, h, 2p] for n = 0
            out_latent, _ = kernels.decode_attention(
                q, rows, seqlens, c.softmax_scale, c.kv_rank, kv_start=starts, kv_scale=kv_scale
            )
            return torch.einsum("bhr,hvr->bhv", out_latent, w_uv.to(out_latent.dtype))[:, None]
        w_uk_t, w_uv_t = w_uk.transpose(1, 2), w_uv.transpose(1, 2)  # kernels take [h, r, n], [h, r, v]
        # Left padding: kv_start hides each sequence's padding keys; padding queries see no key -> 0.
        out, _ = kernels.prefill_attention(
            q_nope.flatten(0, 1), q_rope.flatten(0, 1), rows, w_uk_t, w_uv_t, cu_seqlens, seqlens,
            c.softmax_scale, None, starts, kv_scale=kv_scale, max_seqlen_q=t, max_seqlen_k=s,
        )  # fmt: skip
        return out.unflatten(0, (b, t))

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCacheProtocol | None = None,
    ) -> torch.Tensor:
        """hidden ``[b, t, d]``, positions ``[b, t]`` or ``[3, b, t]`` (M-RoPE) -> ``[b, t, d]``."""
        cos, sin = self.rope_cos_sin(positions)
        return self.attend(hidden, cos, sin, attention_mask, cache)
