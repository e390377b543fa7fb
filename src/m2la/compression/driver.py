"""Compress every attention layer of a model: plan the budget, calibrate layer by layer, fit, replace.

Framework-neutral: the integration supplies ``forward(batch)``, the attention modules to hook, their
:class:`~m2la.conversion.SourceAttention` descriptions, ``extract`` (module call -> AttentionCall)
and ``replace(index, config, state) -> M2LAttention`` (installs the fitted layer in the model).

Order of work:

1. Ranks and RoPE pairs per layer: explicit (``kv_rank``/``rope_dim``), a fixed split (transmla,
   mha2mla), or allocated under the byte budget from one streamed pass over the original model
   (m2la: RoPE error + latent spectrum per candidate pair count; care: normalised spectra).
2. Statistics: by default one streamed pass over the original model (hooks on every layer, only
   per-layer sums kept). With ``sequential=True`` the statistics of layer ``i`` come instead from
   forwards that stop right after layer ``i``'s attention input *with layers ``< i`` already
   converted*, so each layer is fitted to the inputs it will really see. Measured on SmolLM2-135M at
   4x (uniform 64 + 32), sequential calibration made zero-shot perplexity worse (5.3x vs 4.1x the
   original's): fitting each layer to its own source function on drifted inputs does not pull the
   model back towards the original outputs. It stays available, off by default.
3. m2la's refit sums (:class:`~m2la.compression.stats.RefitStatistics`, ``O(H (2GD)^2)`` per layer:
   32 MB for a SmolLM2-135M layer, 2.7 GB for a Llama-3-8B one) are the largest. When every layer's
   would not fit in ``refit_memory_gib``, the first pass leaves them out and further passes over the
   *original* model gather them for a group of consecutive layers at a time (each forward stops after
   the group's last layer); the group is fitted and its sums dropped before the next. Layers are
   replaced only once every group is fitted, so every pass sees the original model and the result
   equals the one-pass conversion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import M2LAConfig
from ..conversion import ConversionError, SourceAttention, source_cache_width
from ..module import M2LAttention
from . import allocate, fit
from .calibrate import AttentionCall, LayerErrors, collect_statistics, measure_layer_errors
from .stats import LayerStatistics, RefitStatistics

__all__ = ["CompressionOptions", "LayerResult", "compress_layers", "default_key_weight", "plan_choices", "refit_groups"]


@dataclass
class CompressionOptions:
    method: str = "m2la"
    key_weight: float | None = None  # m2la: multiplies the modelled score-error term (the iid-key model
    #                                  underestimates it); None = `default_key_weight(compression ratio)`
    attention_share: float = 1.0  # m2la: weight latent statistics by the attention each token receives
    uniform_mix: float = 0.25  # share of uniform causal attention in the RoPE distance distribution
    sequential: bool = False  # calibrate layer i with layers < i already converted (see module docstring)
    pair_grid_points: int = 16  # candidate RoPE pair counts per layer evaluated by the m2la allocator
    allocation: str = "layer"  # m2la: "layer" = equal width per layer, modelled rank/RoPE split inside each
    #                              layer; "global" = widths also moved across layers by the modelled error
    key_refit: bool = True  # m2la: least-squares refit of the NoPE score map with true rotations (fit.key_refit_map)
    value_refit: str = "output"  # m2la: value map refit: "output" | "attended" | "none" (fit.value_refit_map)
    refit_memory_gib: float = 0.25  # m2la: most refit sums held at once; more layers -> grouped passes

    def __post_init__(self) -> None:
        fit._check_method(self.method)
        if self.allocation not in ("layer", "global"):
            raise ConversionError(f"allocation must be 'layer' or 'global', got {self.allocation!r}")
        if self.value_refit not in fit.VALUE_REFITS:
            raise ConversionError(f"value_refit must be one of {', '.join(fit.VALUE_REFITS)}, got {self.value_refit!r}")
        if not self.refit_memory_gib > 0:
            raise ConversionError(f"refit_memory_gib must be > 0, got {self.refit_memory_gib}")

    @property
    def uses_refit(self) -> bool:
        return self.method == "m2la" and (self.key_refit or self.value_refit != "none")


def default_key_weight(ratio: float) -> float:
    """m2la's score-error weight by cache compression ratio: 5 up to 4x, 3 from 8x, log-linear between.

    Chosen on validation perplexity (calibration-split tokens never fitted on) of SmolLM2-135M,
    sweeping 2-12 at 2x, 4x and 8x; only 8x moved clearly, from 5 (8.49x) to 3 (8.20x). At 2x and 4x
    the best validation value (8) was within 0.3% of 5, so the default stays (benchmarks/RESULTS.md).
    """
    if ratio <= 4.0:
        return 5.0
    if ratio >= 8.0:
        return 3.0
    return 5.0 - 2.0 * math.log2(ratio / 4.0)


@dataclass
class LayerResult:
    index: int
    config: M2LAConfig
    errors: LayerErrors | None = None  # on the held-out calibration batch; None without one
    extra: dict[str, Any] = field(default_factory=dict)


def _curve(
    src: SourceAttention, stats: LayerStatistics, options: CompressionOptions, pairs: list[int]
) -> allocate.LayerCurve:
    plan = fit.rope_plan(src, stats, options.method, options.key_weight)
    spectra = {}
    for p in pairs:
        layout = fit.nope_layout(src, plan, p)
        spectra[p] = fit.latent_spectrum(
            src, stats, layout, options.method, options.key_weight, options.attention_share
        )
    costs = plan.cost.flatten()[plan.order]
    if options.method == "m2la":  # errors relative to the layer's attention output energy
        energy = max(stats.mean_output_energy, 1e-30)
        costs = costs / energy
        spectra = {p: spectrum / energy for p, spectrum in spectra.items()}
    return allocate.LayerCurve(pair_costs=costs, spectra=spectra, value_dims=src.num_kv_heads * src.head_dim)


def plan_choices(
    sources: Sequence[SourceAttention],
    options: CompressionOptions,
    compression: float | None = None,
    kv_rank: int | None = None,
    rope_dim: int | None = None,
    stats: Sequence[LayerStatistics] | None = None,
) -> list[allocate.LayerChoice]:
    """Per-layer ``(kv_rank, num_pairs)``; ``stats`` (from the original model) are needed by m2la/care budgets."""
    if rope_dim is not None and (rope_dim < 0 or rope_dim % 2):
        raise ConversionError(f"rope_dim must be even and >= 0, got {rope_dim}")
    max_pairs = [s.num_kv_heads * s.rotary_dim // 2 for s in sources]
    if compression is None:
        if kv_rank is None:
            raise ConversionError("rope_dim alone does not set a cache size; also pass kv_rank= or compression=")
        if kv_rank < 1:
            raise ConversionError(f"kv_rank must be >= 1, got {kv_rank}")
        choices = []
        for src, most in zip(sources, max_pairs, strict=True):
            pairs = min(src.head_dim, 2 * most) // 2 if rope_dim is None else rope_dim // 2
            if pairs > most:
                raise ConversionError(f"rope_dim {2 * pairs} exceeds the {2 * most} rotary key dims of a layer")
            choices.append(allocate.LayerChoice(kv_rank, pairs))
        return choices
    if kv_rank is not None:
        raise ConversionError("pass either compression= or kv_rank= (with rope_dim=), not both")
    widths = [source_cache_width(s) for s in sources]
    budget = allocate.width_budget(widths, compression)
    per_layer = budget // len(sources)
    if per_layer < 1:
        raise ConversionError(f"compression {compression} leaves less than one cached value per layer")
    if rope_dim is not None and any(rope_dim // 2 > m for m in max_pairs):
        raise ConversionError(f"rope_dim {rope_dim} exceeds the rotary key dims of a layer")
    if options.method in ("transmla", "mha2mla"):
        choices = []
        for most in max_pairs:
            split = allocate.uniform_split(per_layer, most)
            if rope_dim is not None:
                split = allocate.LayerChoice(per_layer - rope_dim, rope_dim // 2)
            if split.kv_rank < 1:
                raise ConversionError(f"rope_dim {rope_dim} leaves no latent rank within {per_layer} values per layer")
            choices.append(split)
        return choices
    if stats is None:
        raise ConversionError(f"method {options.method!r} allocates ranks from calibration statistics; none given")
    if options.method == "care":
        pairs = (
            rope_dim // 2
            if rope_dim is not None
            else min(allocate.uniform_split(per_layer, min(max_pairs)).num_pairs, min(max_pairs))
        )
        curves = []
        for src, st in zip(sources, stats, strict=True):
            curve = _curve(src, st, options, [pairs])
            spectrum = curve.spectra[pairs]
            curve.spectra[pairs] = spectrum / spectrum.sum().clamp_min(1e-30)  # relative energy per layer
            curves.append(curve)
        return allocate.allocate_budget(curves, budget, fixed_pairs=pairs)
    curves = []
    for src, st, most in zip(sources, stats, max_pairs, strict=True):
        if rope_dim is not None:
            grid = [rope_dim // 2]
        else:
            step = max(1, most // options.pair_grid_points)
            grid = sorted(set(range(0, most + 1, step)) | {most})
        curves.append(_curve(src, st, options, grid))
    fixed = None if rope_dim is None else rope_dim // 2
    if options.allocation == "global":
        return allocate.allocate_budget(curves, budget, fixed_pairs=fixed)
    widths = [per_layer + (1 if i < budget - per_layer * len(curves) else 0) for i in range(len(curves))]
    choices = [
        allocate.allocate_budget([curve], width, fixed_pairs=fixed)[0]
        for curve, width in zip(curves, widths, strict=True)
    ]
    return allocate.fill(curves, choices, budget, allow_pairs=fixed is None)


def refit_groups(sources: Sequence[SourceAttention], memory_gib: float) -> list[list[int]]:
    """Consecutive layer indices whose refit sums fit ``memory_gib`` together (one layer at least per group)."""
    budget = memory_gib * 2**30
    groups: list[list[int]] = []
    held = 0
    for idx, src in enumerate(sources):
        size = RefitStatistics.layer_bytes(src)
        if groups and held + size <= budget:
            groups[-1].append(idx)
            held += size
        else:
            groups.append([idx])
            held = size
    return groups


def compress_layers(
    forward: Callable[[Any], Any],
    batches: Sequence[Any],
    modules: Sequence[nn.Module],
    sources: Sequence[SourceAttention],
    extract: Callable[[nn.Module, tuple, dict], AttentionCall],
    replace: Callable[[int, M2LAConfig, dict[str, torch.Tensor]], M2LAttention],
    options: CompressionOptions,
    compression: float | None = None,
    kv_rank: int | None = None,
    rope_dim: int | None = None,
    token_weight: Callable[[Any], torch.Tensor | None] = lambda batch: None,
    progress: Callable[[str], None] | None = None,
    vision_mask: Callable[[Any], torch.Tensor | None] = lambda batch: None,
) -> list[LayerResult]:
    """Convert every layer; returns per-layer configs and held-out errors.

    ``vision_mask(batch)``: optional bool ``[b, t]`` marking vision tokens of a batch; when given, the
    held-out errors are also reported over text and vision tokens separately.
    """
    for src in sources:
        fit.check_compressible(src)
    if not batches:
        raise ConversionError("calibration is empty; pass an iterable of model-input batches")
    heldout = len(batches) - 1 if len(batches) >= 2 else None
    stat_batches = list(batches)  # the held-out batch is skipped by index
    say = progress or (lambda message: None)

    groups = refit_groups(sources, options.refit_memory_gib) if options.uses_refit else [list(range(len(sources)))]
    grouped = not options.sequential and len(groups) > 1  # refit sums gathered group by group

    one_shot: list[LayerStatistics] | None = None
    one_shot_calls: dict[int, AttentionCall] = {}
    needs_one_shot = (compression is not None and options.method in ("m2la", "care")) or not options.sequential
    if needs_one_shot:
        parts = "all" if options.uses_refit and not (grouped or options.sequential) else "base"
        say(
            "calibration statistics of the original model (all layers, one pass"
            + (", refit sums in later passes)" if grouped else ")")
        )
        targets = dict(enumerate(zip(modules, sources, strict=True)))
        found, one_shot_calls = collect_statistics(
            forward,
            stat_batches,
            targets,
            extract,
            token_weight,
            heldout=heldout,
            uniform_mix=options.uniform_mix,
            vision_mask=vision_mask,
            parts=parts,
        )
        one_shot = [found[i] for i in range(len(sources))]
    if options.key_weight is None:  # resolved before planning: the m2la allocator uses it too
        if compression is None:  # explicit ranks: the ratio they give
            choices = plan_choices(sources, options, None, kv_rank, rope_dim, one_shot)
            ratio = sum(source_cache_width(s) for s in sources) / sum(c.width for c in choices)
        else:
            ratio = compression
        options = dataclasses.replace(options, key_weight=default_key_weight(ratio))
    choices = plan_choices(sources, options, compression, kv_rank, rope_dim, one_shot)

    def fit_one(idx: int, stats: LayerStatistics) -> tuple[M2LAConfig, dict[str, torch.Tensor]]:
        choice = choices[idx]
        return fit.fit_layer(
            sources[idx],
            stats,
            choice.kv_rank,
            choice.num_pairs,
            options.method,
            options.key_weight,
            options.attention_share,
            options.key_refit,
            options.value_refit,
        )

    def install(
        idx: int, config: M2LAConfig, state: dict[str, torch.Tensor], call: AttentionCall | None
    ) -> LayerResult:
        new = replace(idx, config, state)
        errors = measure_layer_errors(sources[idx], new, call) if call is not None else None
        say(
            f"layer {idx}: rank {config.kv_rank}, rope {config.rope_dim}, "
            f"output error {errors.output if errors is not None else None}"
        )
        return LayerResult(index=idx, config=config, errors=errors)

    if options.sequential:
        results = []
        for idx, (module, src) in enumerate(zip(modules, sources, strict=True)):
            say(f"layer {idx}: streaming statistics")
            found, calls = collect_statistics(
                forward,
                stat_batches,
                {idx: (module, src)},
                extract,
                token_weight,
                stop_after=idx,
                heldout=heldout,
                uniform_mix=options.uniform_mix,
                vision_mask=vision_mask,
                parts="all" if options.uses_refit else "base",
            )
            config, state = fit_one(idx, found[idx])
            results.append(install(idx, config, state, calls.get(idx)))
        return results
    if not grouped:
        return [install(idx, *fit_one(idx, one_shot[idx]), one_shot_calls.get(idx)) for idx in range(len(sources))]
    # grouped refit passes run on the original model, so layers are installed only after every fit
    fit_batches = [batch for number, batch in enumerate(stat_batches) if number != heldout]
    fitted: list[tuple[M2LAConfig, dict[str, torch.Tensor]]] = []
    for group in groups:
        say(f"layers {group[0]}-{group[-1]}: refit statistics")
        found, _ = collect_statistics(
            forward,
            fit_batches,
            {i: (modules[i], sources[i]) for i in group},
            extract,
            token_weight,
            stop_after=group[-1],
            parts="refit",
        )
        for idx in group:
            fitted.append(fit_one(idx, dataclasses.replace(one_shot[idx], refit=found.pop(idx))))
    return [install(idx, config, state, one_shot_calls.get(idx)) for idx, (config, state) in enumerate(fitted)]
