"""Split a total cache budget (values per token, all layers) into per-layer latent ranks and RoPE pairs.

A layer ``l`` with ``p`` kept RoPE pairs and latent rank ``r`` caches ``r + 2p`` values per token. Its
estimated error is ``rope_tail_l(p) + sum(eigenvalues_l(p)[r:])`` (both in the same units for m2la:
attention-output error). :func:`allocate_budget` minimises the sum over layers under the budget by a
Lagrangian sweep over ``(p, r)`` tables, then fills what is left greedily (``+8`` rank or ``+1`` pair,
best error reduction per cached value). Ranks are multiples of 8 (kernel-friendly) unless a layer has
fewer than 8 compressible dims; RoPE pairs absorb the remainder so the total lands within one value of
the budget whenever the layers can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..conversion import ConversionError

__all__ = ["LayerCurve", "LayerChoice", "width_budget", "allocate_budget", "fill", "uniform_split", "rank_steps"]

RANK_MULTIPLE = 8


@dataclass
class LayerCurve:
    """Error model of one layer: per candidate pair count, the RoPE error and the latent spectrum."""

    pair_costs: torch.Tensor  # [G*P] cost of dropping RoPE from each component, most important first
    spectra: dict[int, torch.Tensor]  # num_pairs -> latent eigenvalues, descending [m + GD]
    value_dims: int  # G*D

    def rope_tail(self, num_pairs: int) -> float:
        return float(self.pair_costs[num_pairs:].sum())

    def spectrum(self, num_pairs: int) -> torch.Tensor:
        """Spectrum of the nearest evaluated pair count at or below ``num_pairs``."""
        known = max(p for p in self.spectra if p <= num_pairs)
        return self.spectra[known]

    def latent_dims(self, num_pairs: int) -> int:
        """Compressible dims left with ``num_pairs`` kept: the NoPE key components and the values."""
        return 2 * (self.pair_costs.numel() - num_pairs) + self.value_dims


@dataclass
class LayerChoice:
    kv_rank: int
    num_pairs: int

    @property
    def width(self) -> int:
        return self.kv_rank + 2 * self.num_pairs


def width_budget(source_widths: list[int], compression: float) -> int:
    """Cache values per token allowed in total for a target ``compression`` (original / converted)."""
    if not (isinstance(compression, (int, float)) and math.isfinite(compression) and compression >= 1.0):
        raise ConversionError(
            f"compression must be a finite ratio >= 1 (original / converted bytes), got {compression!r}"
        )
    return int(math.floor(sum(source_widths) / compression + 1e-9))


def rank_steps(max_rank: int) -> list[int]:
    """Allowed latent ranks: multiples of 8 up to ``max_rank`` (or just ``max_rank`` below 8)."""
    if max_rank < RANK_MULTIPLE:
        return [max_rank] if max_rank >= 1 else []
    return list(range(RANK_MULTIPLE, max_rank + 1, RANK_MULTIPLE))


def _options(curve: LayerCurve, pair_choices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[LayerChoice]]:
    """Every allowed ``(r, p)`` of a layer: widths ``[k]``, modelled errors ``[k]`` and the choices."""
    widths, errors, choices = [], [], []
    for p in pair_choices:
        eig = curve.spectrum(p)
        tail = torch.cat((eig.flip(0).cumsum(0).flip(0), eig.new_zeros(1)))  # tail[r] = sum(eig[r:])
        rope = curve.rope_tail(p)
        for r in rank_steps(min(curve.latent_dims(p), eig.numel())):
            widths.append(r + 2 * p)
            errors.append(rope + float(tail[r]))
            choices.append(LayerChoice(r, p))
    return torch.tensor(widths, dtype=torch.float64), torch.tensor(errors, dtype=torch.float64), choices


def allocate_budget(curves: list[LayerCurve], budget: int, fixed_pairs: int | None = None) -> list[LayerChoice]:
    """Per-layer ``(kv_rank, num_pairs)`` with total width ``<= budget``, minimising the modelled error.

    ``fixed_pairs`` pins every layer's RoPE pairs (then only ranks are allocated).
    """
    pair_sets = [[fixed_pairs] if fixed_pairs is not None else sorted(c.spectra) for c in curves]
    floor = sum(
        min(rank_steps(c.latent_dims(p))[0] + 2 * p for p in pairs) for c, pairs in zip(curves, pair_sets, strict=True)
    )
    if budget < floor:
        raise ConversionError(
            f"the cache budget of {budget} values per token cannot hold {len(curves)} layers "
            f"(at least {floor} needed: rank >= {RANK_MULTIPLE} per layer); ask for less compression"
        )

    tables = [_options(c, pairs) for c, pairs in zip(curves, pair_sets, strict=True)]

    def solve(price: float) -> list[LayerChoice]:
        return [choices[int(torch.argmin(errors + price * widths))] for widths, errors, choices in tables]

    scale = max(float(sum(c.spectrum(min(c.spectra)).sum() + c.pair_costs.sum() for c in curves)), 1e-30)
    low, high = math.log(scale) - 70.0, math.log(scale) + 14.0  # log prices: widest .. narrowest

    def width(log_price: float) -> int:
        return sum(ch.width for ch in solve(math.exp(log_price)))

    if width(high) > budget:
        choices = [
            min((LayerChoice(rank_steps(c.latent_dims(p))[0], p) for p in pairs), key=lambda ch: ch.width)
            for c, pairs in zip(curves, pair_sets, strict=True)
        ]
    else:
        for _ in range(50):
            mid = (low + high) / 2
            if width(mid) <= budget:
                high = mid
            else:
                low = mid
        choices = solve(math.exp(high))
    return fill(curves, choices, budget, allow_pairs=fixed_pairs is None)


def fill(curves: list[LayerCurve], choices: list[LayerChoice], budget: int, allow_pairs: bool) -> list[LayerChoice]:
    """Spend what the budget has left: +8 rank or +1 RoPE pair, best error drop per cached value first."""
    left = budget - sum(ch.width for ch in choices)
    while left > 0:
        best_gain, best_move = -1.0, None
        for idx, (curve, ch) in enumerate(zip(curves, choices, strict=True)):
            eig = curve.spectrum(ch.num_pairs)
            dims = min(curve.latent_dims(ch.num_pairs), eig.numel())
            step = RANK_MULTIPLE if ch.kv_rank % RANK_MULTIPLE == 0 else 1
            step = min(step, dims - ch.kv_rank)
            if 0 < step <= left:
                gain = float(eig[ch.kv_rank : ch.kv_rank + step].sum()) / step
                if gain > best_gain:
                    best_gain, best_move = gain, (idx, step, 0)
            if allow_pairs and ch.num_pairs < curve.pair_costs.numel() and left >= 2:
                gain = float(curve.pair_costs[ch.num_pairs]) / 2
                if gain > best_gain:
                    best_gain, best_move = gain, (idx, 0, 1)
        if best_move is None:
            break
        idx, extra_rank, extra_pairs = best_move
        ch = choices[idx]
        choices[idx] = LayerChoice(ch.kv_rank + extra_rank, ch.num_pairs + extra_pairs)
        left = budget - sum(c.width for c in choices)
    return choices


def uniform_split(width: int, max_pairs: int) -> LayerChoice:
    """Baselines' fixed split of one layer's width: rank ~2/3 (multiple of 8), RoPE pairs the rest."""
    if width < 1:
        raise ConversionError(f"a layer needs at least one cached value, got width {width}")
    rank = max((2 * width // 3) // RANK_MULTIPLE * RANK_MULTIPLE, min(RANK_MULTIPLE, width))
    return LayerChoice(rank, min((width - rank) // 2, max_pairs))
