"""Configuration of one M²LA attention layer (see DESIGN.md for the layout)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["M2LAConfig", "M2LAConfigError"]


class M2LAConfigError(ValueError):
    """An M²LA configuration is inconsistent."""


@dataclass
class M2LAConfig:
    """Dimensions, options and RoPE pairs of one latent attention layer.

    Cache per token = ``kv_rank + rope_dim`` values. ``rope_inv_freq``, ``rope_axis`` and
    ``rope_source_column`` have one entry per rotary pair of the shared key (``rope_dim // 2``).
    """

    hidden_size: int
    num_heads: int
    kv_rank: int  # r: latent width
    rope_dim: int  # 2p: shared RoPE key width
    qk_nope_dim: int  # n: per-head no-RoPE query/key dims
    v_head_dim: int  # v: per-head value dims
    softmax_scale: float
    q_in_dim: int | None = None  # per-head width of q_proj's output when a per-head q_up follows
    q_rank: int | None = None  # DeepSeek-style low-rank query (q_a_proj -> norm -> q_b_proj)
    query_norm: bool = False  # per-head RMSNorm on the query before q_up (QK-norm sources)
    kv_in_dim: int | None = None  # width of kv_a_proj's output when key_norm + kv_a_mix follow
    key_norm_heads: int = 0  # per-head RMSNorm over the first key_norm_heads*key_norm_dim kv features
    key_norm_dim: int = 0
    norm_eps: float = 1e-6
    q_bias: bool = False
    kv_a_bias: bool = False
    kv_b_bias: bool = False
    o_bias: bool = False
    rope_inv_freq: list[float] = field(default_factory=list)
    rope_axis: list[int] = field(default_factory=list)
    rope_source_column: list[int] = field(default_factory=list)
    rope_scaling: float = 1.0  # multiplies cos/sin (YaRN attention factor)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_rope_pairs(self) -> int:
        return self.rope_dim // 2

    @property
    def query_head_dim(self) -> int:
        """Width of one head's query after q_up: ``n + 2p``."""
        return self.qk_nope_dim + self.rope_dim

    @property
    def q_proj_head_dim(self) -> int:
        return self.q_in_dim if self.q_in_dim is not None else self.query_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token: ``r + 2p``."""
        return self.kv_rank + self.rope_dim

    def cache_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.cache_width * dtype_bytes

    def validate(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise M2LAConfigError(message)

        for name in ("hidden_size", "num_heads", "kv_rank", "v_head_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.rope_dim >= 0 and self.rope_dim % 2 == 0, f"rope_dim must be even and >= 0, got {self.rope_dim}")
        need(self.qk_nope_dim >= 0, f"qk_nope_dim must be >= 0, got {self.qk_nope_dim}")
        need(self.query_head_dim > 0, "a head needs at least one query/key dim (qk_nope_dim + rope_dim > 0)")
        need(math.isfinite(self.softmax_scale) and self.softmax_scale > 0, "softmax_scale must be positive")
        pairs = self.num_rope_pairs
        for name in ("rope_inv_freq", "rope_axis", "rope_source_column"):
            need(
                len(getattr(self, name)) == pairs,
                f"{name} needs {pairs} entries (rope_dim / 2), got {len(getattr(self, name))}",
            )
        need(all(a in (0, 1, 2) for a in self.rope_axis), "rope_axis entries must be 0, 1 or 2")
        if self.query_norm:
            need(self.q_in_dim is not None, "query_norm needs q_in_dim (the normalised per-head width)")
        if self.q_in_dim is not None:
            need(self.q_in_dim > 0, f"q_in_dim must be positive, got {self.q_in_dim}")
        if self.q_rank is not None:
            need(self.q_rank > 0, f"q_rank must be positive, got {self.q_rank}")
        if self.key_norm_heads:
            need(self.kv_in_dim is not None, "key_norm needs kv_in_dim (kv_a_proj's width before kv_a_mix)")
            need(self.key_norm_dim > 0, "key_norm_dim must be positive when key_norm_heads > 0")
            need(
                self.key_norm_heads * self.key_norm_dim <= self.kv_in_dim,
                f"key norm covers {self.key_norm_heads}x{self.key_norm_dim} features, more than kv_in_dim={self.kv_in_dim}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M2LAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise M2LAConfigError(f"unknown M2LAConfig fields {unknown}; written by a newer m2la?")
        return cls(**data)
