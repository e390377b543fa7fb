"""A pure-torch latent KV cache: per layer, rows ``[latent r | rotated k_rope 2p]`` and nothing else."""

from __future__ import annotations

import torch

from .quantization import check_cache_dtype, dequantize_rows, quantize_rows

__all__ = ["LatentCache"]


class LatentCache:
    """Growable per-layer store of ``[b, s, r + 2p]`` rows (for use without transformers).

    ``dtype=torch.float8_e4m3fn`` (or ``float8_e5m2``) stores each row in fp8 with one fp32 scale per
    token (:mod:`m2la.quantization`); attention then reads the dequantized rows, so the quality cost
    of the fp8 cache is part of every result.
    """

    def __init__(self, num_layers: int, dtype: torch.dtype | None = None) -> None:
        self.dtype = check_cache_dtype(dtype)
        self.rows: list[torch.Tensor | None] = [None] * num_layers
        self.scales: list[torch.Tensor | None] = [None] * num_layers  # [b, s] fp32, fp8 caches only

    def append_latent(self, layer_idx: int, rows: torch.Tensor, dequantize: bool = True) -> torch.Tensor | None:
        """Append ``rows [b, t, r + 2p]``; return the layer's rows so far ``[b, s, r + 2p]`` in ``rows.dtype``.

        ``dequantize=False``: an fp8 cache returns None instead (for callers that read ``quantized_rows``).
        """
        held = self.rows[layer_idx]
        if held is not None and (held.shape[0] != rows.shape[0] or held.shape[2] != rows.shape[2]):
            raise ValueError(
                f"layer {layer_idx} caches [b={held.shape[0]}, width={held.shape[2]}] rows, "
                f"got [b={rows.shape[0]}, width={rows.shape[2]}]"
            )
        if self.dtype is None:
            self.rows[layer_idx] = rows if held is None else torch.cat((held, rows), dim=1)
            return self.rows[layer_idx]
        quantized, scale = quantize_rows(rows, self.dtype)
        scales = self.scales[layer_idx]
        self.rows[layer_idx] = quantized if held is None else torch.cat((held, quantized), dim=1)
        self.scales[layer_idx] = scale if scales is None else torch.cat((scales, scale), dim=1)
        if not dequantize:
            return None
        return dequantize_rows(self.rows[layer_idx], self.scales[layer_idx], rows.dtype)

    def quantized_rows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp8 caches: the stored ``rows [b, s, r + 2p]`` and ``scales [b, s]`` (what the kernels read); else None."""
        if self.dtype is None or self.rows[layer_idx] is None:
            return None
        return self.rows[layer_idx], self.scales[layer_idx]

    def seq_length(self, layer_idx: int = 0) -> int:
        held = self.rows[layer_idx]
        return 0 if held is None else held.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds right now (rows and, for fp8, their scales)."""
        held = [t for t in (*self.rows, *self.scales) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)
