"""Compressed conversion of MHA/GQA attention to M²LA (pure torch; see ``driver`` for the pipeline).

- :mod:`.stats`: streamed per-layer second moments (keys/values, queries, rotation, output sensitivity)
- :mod:`.calibrate`: forward pre-hooks that stream those statistics and early-stop the forward
- :mod:`.fit`: RoPE head mixing and selection, NoPE mean rotation, weighted latent PCA, weight assembly
- :mod:`.allocate`: per-layer ranks and RoPE pairs under a total cache budget
- :mod:`.driver`: planning + layer-by-layer (sequential) calibration, fit and replacement

Methods: ``m2la`` (default) and the baselines ``mha2mla``, ``transmla``, ``care`` (see ``fit.rope_plan``
and ``fit._latent_problem``).
"""

from __future__ import annotations

from .allocate import LayerChoice, allocate_budget, width_budget
from .calibrate import AttentionCall, LayerErrors, collect_statistics, layer_errors, measure_layer_errors
from .driver import CompressionOptions, LayerResult, compress_layers, default_key_weight, plan_choices
from .fit import METHODS, fit_layer, rope_plan
from .stats import LayerStatistics, accumulate

__all__ = [
    "METHODS",
    "AttentionCall",
    "CompressionOptions",
    "LayerChoice",
    "LayerErrors",
    "LayerResult",
    "LayerStatistics",
    "accumulate",
    "allocate_budget",
    "default_key_weight",
    "collect_statistics",
    "compress_layers",
    "fit_layer",
    "layer_errors",
    "measure_layer_errors",
    "plan_choices",
    "rope_plan",
    "width_budget",
]
