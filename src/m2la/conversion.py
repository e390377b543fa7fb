"""Lossless reparameterisation of a pretrained MHA/GQA attention into M²LA form.

The source is described framework-neutrally by :class:`SourceAttention`; integrations (e.g.
``m2la.integrations.hf``) fill it from their modules.

Lossless layout for ``G`` KV heads of dim ``D`` with ``2P`` rotary dims each (``P`` pairs):

- shared RoPE key: all ``G*P`` source pairs, pair ``g*P + j`` = pair ``j`` of KV head ``g`` (half layout);
- latent: ``[k_pass (G*(D-2P)) | v (G*D)]``: the non-rotated key dims of partial-rotary sources, then values;
- per-head ``q_up`` copies head ``h``'s query into its group's slots and zeros the other groups';
- ``kv_b_proj`` selects head ``h``'s group's k_pass and values from the latent.

So cache bytes equal the source's (``2*G*D`` values per token) and every score is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import M2LAConfig

__all__ = [
    "SourceAttention",
    "ConversionError",
    "grouped_head_count",
    "lossless_config",
    "lossless_state_dict",
    "source_cache_width",
]


class ConversionError(ValueError):
    """The source attention cannot be converted as asked."""


@dataclass
class SourceAttention:
    """A pretrained MHA/GQA attention layer, weights in ``nn.Linear`` layout ``[out, in]``.

    Heads are laid out head-major (``[H*D]``), query head ``h`` uses KV head ``h // (H // G)``.
    ``rope_inv_freq``/``rope_axis``/``rope_source_column`` have one entry per rotary pair of a head.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_weight: torch.Tensor  # [H*D, d]
    k_weight: torch.Tensor  # [G*D, d]
    v_weight: torch.Tensor  # [G*D, d]
    o_weight: torch.Tensor  # [d, H*D]
    softmax_scale: float
    rope_inv_freq: torch.Tensor  # [P]
    rope_axis: torch.Tensor  # [P] long
    rope_source_column: torch.Tensor  # [P] long: column of the host's cos/sin table
    rope_interleaved: bool = False  # pairs (2j, 2j+1) instead of (j, P+j) within the rotary dims
    rope_scaling: float = 1.0
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm_weight: torch.Tensor | None = None  # [D] per-head RMSNorm (QK-norm)
    k_norm_weight: torch.Tensor | None = None  # [D]
    norm_eps: float = 1e-6

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.rope_inv_freq.numel())

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def validate(self) -> None:
        H, G, D, d = self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size
        if G <= 0 or H % G:
            raise ConversionError(f"{H} query heads cannot share {G} KV heads evenly")
        expected = {"q_weight": (H * D, d), "k_weight": (G * D, d), "v_weight": (G * D, d), "o_weight": (d, H * D)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ConversionError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.rotary_dim > D or self.rotary_dim == 0:
            raise ConversionError(f"rotary dims {self.rotary_dim} must be in (0, head_dim={D}]")
        if (self.q_norm_weight is None) != (self.k_norm_weight is None):
            raise ConversionError("QK-norm needs both a query and a key norm")


def source_cache_width(src: SourceAttention) -> int:
    """Values per token a standard K/V cache holds for this layer: ``2 * G * D``."""
    return 2 * src.num_kv_heads * src.head_dim


def _pair_columns(src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head dim indices of each pair's x and y component, and of the pass-through dims."""
    P, D = src.rotary_dim // 2, src.head_dim
    j = torch.arange(P)
    if src.rope_interleaved:
        x_cols, y_cols = 2 * j, 2 * j + 1
    else:
        x_cols, y_cols = j, j + P
    return x_cols, y_cols, torch.arange(2 * P, D)


def lossless_config(src: SourceAttention) -> M2LAConfig:
    src.validate()
    G, D = src.num_kv_heads, src.head_dim
    P = src.rotary_dim // 2
    n_pass = D - 2 * P
    qk_norm = src.q_norm_weight is not None
    return M2LAConfig(
        hidden_size=src.hidden_size,
        num_heads=src.num_heads,
        kv_rank=G * (n_pass + D),
        rope_dim=2 * G * P,
        qk_nope_dim=n_pass,
        v_head_dim=D,
        softmax_scale=float(src.softmax_scale),
        q_in_dim=D,
        query_norm=qk_norm,
        kv_in_dim=2 * G * D if qk_norm else None,
        key_norm_heads=G if qk_norm else 0,
        key_norm_dim=D if qk_norm else 0,
        norm_eps=float(src.norm_eps),
        q_bias=src.q_bias is not None,
        kv_a_bias=src.k_bias is not None or src.v_bias is not None,
        kv_b_bias=False,
        o_bias=src.o_bias is not None,
        rope_inv_freq=[float(f) for f in src.rope_inv_freq.repeat(G)],
        rope_axis=[int(a) for a in src.rope_axis.repeat(G)],
        rope_source_column=[int(c) for c in src.rope_source_column.repeat(G)],
        rope_scaling=float(src.rope_scaling),
    )


def _kv_feature_order(src: SourceAttention) -> torch.Tensor:
    """Index into ``[k (G*D) | v (G*D)]`` giving ``[latent | k_rope]`` in the lossless layout."""
    G, D = src.num_kv_heads, src.head_dim
    x_cols, y_cols, pass_cols = _pair_columns(src)
    heads = torch.arange(G)[:, None] * D
    k_pass = (heads + pass_cols).flatten()
    values = G * D + torch.arange(G * D)
    rope_x = (heads + x_cols).flatten()  # pair g*P + j
    rope_y = (heads + y_cols).flatten()
    return torch.cat((k_pass, values, rope_x, rope_y))


def lossless_state_dict(src: SourceAttention, config: M2LAConfig | None = None) -> dict[str, torch.Tensor]:
    """Weights of the lossless :class:`~m2la.module.M2LAttention` for ``src`` (dtype of the source)."""
    config = config or lossless_config(src)
    H, G, D = src.num_heads, src.num_kv_heads, src.head_dim
    P = src.rotary_dim // 2
    n_pass = D - 2 * P
    dtype, device = src.q_weight.dtype, src.q_weight.device
    x_cols, y_cols, pass_cols = _pair_columns(src)

    state: dict[str, torch.Tensor] = {"q_proj.weight": src.q_weight, "o_proj.weight": src.o_weight}
    if src.q_bias is not None:
        state["q_proj.bias"] = src.q_bias
    if src.o_bias is not None:
        state["o_proj.bias"] = src.o_bias

    # q_up[h]: [n_pass + 2GP, D]: pass dims, then the group's slots of the shared key's x and y halves
    q_up = torch.zeros(H, n_pass + 2 * G * P, D, dtype=dtype, device=device)
    for h in range(H):
        g = h // src.group_size
        q_up[h, torch.arange(n_pass), pass_cols] = 1
        q_up[h, n_pass + g * P + torch.arange(P), x_cols] = 1
        q_up[h, n_pass + G * P + g * P + torch.arange(P), y_cols] = 1
    state["q_up"] = q_up
    if src.q_norm_weight is not None:
        state["q_norm.weight"] = src.q_norm_weight

    kv_weight = torch.cat((src.k_weight, src.v_weight))  # [2GD, d]
    kv_bias = None
    if config.kv_a_bias:
        zeros = torch.zeros(G * D, dtype=dtype, device=device)
        kv_bias = torch.cat(
            (
                src.k_bias if src.k_bias is not None else zeros,
                src.v_bias if src.v_bias is not None else zeros,
            )
        )
    order = _kv_feature_order(src)
    if src.k_norm_weight is not None:
        # the key norm must see whole source heads, so the reordering moves into kv_a_mix
        state["kv_a_proj.weight"] = kv_weight
        if kv_bias is not None:
            state["kv_a_proj.bias"] = kv_bias
        state["key_norm.weight"] = src.k_norm_weight
        mix = torch.zeros(config.cache_width, 2 * G * D, dtype=dtype, device=device)
        mix[torch.arange(config.cache_width), order] = 1
        state["kv_a_mix.weight"] = mix
    else:
        state["kv_a_proj.weight"] = kv_weight[order]
        if kv_bias is not None:
            state["kv_a_proj.bias"] = kv_bias[order]

    # kv_b[h] = [k_nope_h (n_pass) | v_h (D)] selected from the latent [k_pass (G*n_pass) | v (G*D)]
    kv_b = torch.zeros(H, n_pass + D, config.kv_rank, dtype=dtype, device=device)
    for h in range(H):
        g = h // src.group_size
        kv_b[h, torch.arange(n_pass), g * n_pass + torch.arange(n_pass)] = 1
        kv_b[h, n_pass + torch.arange(D), G * n_pass + g * D + torch.arange(D)] = 1
    state["kv_b_proj.weight"] = kv_b.flatten(0, 1)
    return state


def grouped_head_count(config: M2LAConfig, q_up: torch.Tensor | None, w_uv: torch.Tensor) -> int:
    """The KV group count ``G`` if the layer is *grouped*, as the lossless conversion of a GQA source
    with full-rotary heads lays it out; else 0.

    Grouped: no no-RoPE key part (``n = 0``), ``r = G * v`` and ``2p = G * 2P``, and query head ``h``
    (group ``g = h // (H / G)``) uses only its group's ``P`` RoPE pairs (``q_up [H, 2p, q_in]`` is zero
    on the other groups' pairs, in the half layout: columns ``[gP, (g+1)P)`` and ``p + [gP, (g+1)P)``)
    and reads only its group's latent slice (``w_uv [H, v, r]`` is zero outside ``[g v, (g+1) v)``).
    Such a layer's decode is GQA's work (``m2la.kernels.grouped_decode_attention``). Checked on the
    weights, so a layer whose training moved weights off those blocks is not grouped.
    """
    c = config
    if c.qk_nope_dim != 0 or q_up is None or c.kv_rank % c.v_head_dim:
        return 0
    groups = c.kv_rank // c.v_head_dim
    if groups < 1 or c.num_heads % groups or c.rope_dim % (2 * groups) or c.rope_dim == 0:
        return 0
    pairs = c.rope_dim // (2 * groups)
    group = torch.arange(c.num_heads, device=w_uv.device) // (c.num_heads // groups)  # [H]
    own = torch.arange(groups, device=w_uv.device)[None, :] == group[:, None]  # [H, G]: head h's group
    query_rows = q_up.detach().unflatten(1, (2, groups, pairs))  # [H, 2, G, P, q_in]
    value_cols = w_uv.detach().unflatten(2, (groups, c.v_head_dim))  # [H, v, G, v]
    outside_query = query_rows.masked_fill(own[:, None, :, None, None], 0)
    outside_value = value_cols.masked_fill(own[:, None, :, None], 0)
    return groups if not (outside_query.any() or outside_value.any()) else 0
