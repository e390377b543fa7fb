"""Rotary position embeddings: every variant the supported models use, as pure functions.

Pairs are described by three per-pair vectors of length ``p``: ``inv_freq`` (angle per position),
``axis`` (which position axis drives the pair: 0 for 1-D RoPE; 0/1/2 = t/h/w for M-RoPE) and, when a
host model supplies cos/sin tables, the column of that table the pair reads.

Two ways of laying pairs out in a vector of ``2p`` dims:
- half (rotate-half, Llama/Qwen): pair ``j`` is ``(x[j], x[p + j])``;
- interleaved (GPT-J/GLM style): pair ``j`` is ``(x[2j], x[2j + 1])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "default_inv_freq",
    "rope_angles",
    "cos_sin",
    "rotate_half",
    "apply_rope_half",
    "apply_rope_interleaved",
    "apply_partial_rope",
    "mrope_axes_sectioned",
    "mrope_axes_interleaved",
    "half_to_interleaved_order",
    "interleaved_to_half_order",
]


def default_inv_freq(rotary_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard RoPE frequencies ``theta ** (-2j / rotary_dim)``. Returns ``[rotary_dim // 2]``."""
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (1.0 / theta**exponent).to(dtype)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation angle of every pair at every position.

    positions: ``[b, t]`` (1-D RoPE) or ``[a, b, t]`` (M-RoPE with ``a`` position axes, e.g. t/h/w).
    inv_freq: ``[p]``; axis: ``[p]`` long, which axis of ``positions`` drives each pair (M-RoPE only).
    Returns ``[b, t, p]`` in float32 (float64 if ``inv_freq`` is float64).
    """
    dtype = torch.float64 if inv_freq.dtype == torch.float64 else torch.float32
    inv_freq = inv_freq.to(device=positions.device, dtype=dtype)
    if positions.dim() == 2:
        return positions.to(dtype)[..., None] * inv_freq
    if positions.dim() != 3:
        raise ValueError(f"positions must be [b, t] or [axes, b, t], got shape {tuple(positions.shape)}")
    if axis is None:
        raise ValueError("3-D (M-RoPE) positions need a per-pair axis vector")
    highest = int(axis.max())  # read where axis lives (the layers keep it on the CPU): no device sync
    if highest >= positions.shape[0]:
        raise ValueError(f"axis refers to position axis {highest} but positions has {positions.shape[0]}")
    axis = axis.to(device=positions.device, dtype=torch.long)
    per_pair_positions = positions.to(dtype).permute(1, 2, 0)[..., axis]  # [b, t, p]
    return per_pair_positions * inv_freq


def cos_sin(angles: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``angles`` times ``scaling`` (YaRN-style attention scaling)."""
    return angles.cos() * scaling, angles.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[j], x[p + j])``. x: ``[..., 2p]``; cos/sin: ``[..., p]`` broadcastable to x's."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2j], x[2j + 1])``. x: ``[..., 2p]``; cos/sin: ``[..., p]``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def apply_partial_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first ``2p`` dims of ``x`` (``p = cos.shape[-1]``) and pass the rest through."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary dims {rotary_dim} exceed the vector's {x.shape[-1]}")
    apply = apply_rope_interleaved if interleaved else apply_rope_half
    return torch.cat((apply(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


def mrope_axes_sectioned(sections: Sequence[int]) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL M-RoPE: consecutive blocks of frequencies per axis. Returns ``[sum(sections)]``."""
    return torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])


def mrope_axes_interleaved(sections: Sequence[int]) -> torch.Tensor:
    """Qwen3-VL interleaved M-RoPE: frequencies cycle t, h, w, t, h, w, ...

    Frequency ``j`` belongs to h if ``j % 3 == 1`` and ``j < 3 * sections[1]``, to w if ``j % 3 == 2``
    and ``j < 3 * sections[2]``, and to t otherwise. Returns ``[sum(sections)]``.
    """
    n_pairs = int(sum(sections))
    axis = torch.zeros(n_pairs, dtype=torch.long)
    for ax in (1, 2):
        axis[ax : 3 * sections[ax] : 3] = ax
    return axis


def half_to_interleaved_order(dim: int) -> torch.Tensor:
    """Index vector ``i`` such that ``x_half[..., i]`` is the same pairs in interleaved layout."""
    half = dim // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).flatten()


def interleaved_to_half_order(dim: int) -> torch.Tensor:
    """Index vector ``i`` such that ``x_interleaved[..., i]`` is the same pairs in half layout."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))
