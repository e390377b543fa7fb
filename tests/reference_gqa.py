"""Plain GQA attention written from scratch: the oracle the lossless conversion must reproduce."""

from __future__ import annotations

import torch

from m2la import rope
from m2la.conversion import SourceAttention


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def gqa_attention(
    src: SourceAttention, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """hidden ``[b, t, d]``, positions ``[b, t]`` or ``[3, b, t]``; causal (and ``mask [b, t]`` padding)."""
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim

    def linear(x, w, b):
        return x @ w.T + (b if b is not None else 0)

    q = linear(hidden, src.q_weight, src.q_bias).unflatten(-1, (H, D))
    k = linear(hidden, src.k_weight, src.k_bias).unflatten(-1, (G, D))
    v = linear(hidden, src.v_weight, src.v_bias).unflatten(-1, (G, D))
    if src.q_norm_weight is not None:
        q = _rms(q, src.q_norm_weight, src.norm_eps)
        k = _rms(k, src.k_norm_weight, src.norm_eps)
    angles = rope.rope_angles(positions, src.rope_inv_freq.to(hidden.dtype), src.rope_axis)
    cos, sin = rope.cos_sin(angles, src.rope_scaling)
    q = rope.apply_partial_rope(q, cos[:, :, None], sin[:, :, None], src.rope_interleaved)
    k = rope.apply_partial_rope(k, cos[:, :, None], sin[:, :, None], src.rope_interleaved)
    k = k.repeat_interleave(src.group_size, dim=2)
    v = v.repeat_interleave(src.group_size, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * src.softmax_scale
    t = hidden.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, v).flatten(-2)
    return linear(out, src.o_weight, src.o_bias)


def random_source(
    hidden_size: int = 40,
    num_heads: int = 6,
    num_kv_heads: int = 2,
    head_dim: int = 12,
    rotary_dim: int | None = None,
    bias: bool = False,
    qk_norm: bool = False,
    interleaved: bool = False,
    mrope_axis: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> SourceAttention:
    g = torch.Generator().manual_seed(seed)
    rotary_dim = head_dim if rotary_dim is None else rotary_dim

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    d, H, G, D = hidden_size, num_heads, num_kv_heads, head_dim
    w = d**-0.5
    inv_freq = rope.default_inv_freq(rotary_dim, 10_000.0, torch.float64)
    axis = mrope_axis if mrope_axis is not None else torch.zeros(rotary_dim // 2, dtype=torch.long)
    return SourceAttention(
        hidden_size=d,
        num_heads=H,
        num_kv_heads=G,
        head_dim=D,
        q_weight=rand(H * D, d, scale=w),
        k_weight=rand(G * D, d, scale=w),
        v_weight=rand(G * D, d, scale=w),
        o_weight=rand(d, H * D, scale=(H * D) ** -0.5),
        softmax_scale=D**-0.5,
        rope_inv_freq=inv_freq,
        rope_axis=axis,
        rope_source_column=torch.arange(rotary_dim // 2),
        rope_interleaved=interleaved,
        q_bias=rand(H * D, scale=0.3) if bias else None,
        k_bias=rand(G * D, scale=0.3) if bias else None,
        v_bias=rand(G * D, scale=0.3) if bias else None,
        o_bias=rand(d, scale=0.3) if bias else None,
        q_norm_weight=(1 + rand(D, scale=0.2)) if qk_norm else None,
        k_norm_weight=(1 + rand(D, scale=0.2)) if qk_norm else None,
    )
