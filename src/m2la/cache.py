"""A pure-torch latent KV cache: per layer, rows ``[latent r | rotated k_rope 2p]`` and nothing else."""

from __future__ import annotations

import torch

__all__ = ["LatentCache"]


class LatentCache:
    """Growable per-layer store of ``[b, s, r + 2p]`` rows (for use without transformers)."""

    def __init__(self, num_layers: int) -> None:
        self.rows: list[torch.Tensor | None] = [None] * num_layers

    def append_latent(self, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """Append ``rows [b, t, r + 2p]``; return the layer's rows so far ``[b, s, r + 2p]``."""
        held = self.rows[layer_idx]
        if held is not None and (held.shape[0] != rows.shape[0] or held.shape[2] != rows.shape[2]):
            raise ValueError(
                f"layer {layer_idx} caches [b={held.shape[0]}, width={held.shape[2]}] rows, "
                f"got [b={rows.shape[0]}, width={rows.shape[2]}]"
            )
        self.rows[layer_idx] = rows if held is None else torch.cat((held, rows), dim=1)
        return self.rows[layer_idx]

    def seq_length(self, layer_idx: int = 0) -> int:
        held = self.rows[layer_idx]
        return 0 if held is None else held.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds right now."""
        return sum(t.numel() * t.element_size() for t in self.rows if t is not None)
