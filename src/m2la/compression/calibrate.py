"""Stream calibration statistics out of a running model with forward pre-hooks (no activations kept).

:func:`collect_statistics` runs ``forward(batch)`` for every calibration batch with a pre-hook on the
chosen attention modules. The hook turns the module's call into an :class:`AttentionCall` (via the
integration's ``extract``), adds it to that layer's :class:`~m2la.compression.stats.LayerStatistics`,
and, when ``stop_after`` names that layer, raises a private exception that ends the forward early:
layer ``i`` costs only the layers before it. Only the held-out batch's call at each hooked layer is
kept (to measure errors), never the activations of the whole calibration set.

Layer errors (:func:`layer_errors`, :func:`measure_layer_errors`) compare a fitted
:class:`~m2la.module.M2LAttention` with the source attention on the same inputs: relative error of the
attention scores (keys), of every head's values, and of the attention output. When the integration
marks vision tokens (a boolean ``[b, t]`` mask, e.g. image/video placeholder tokens of a VLM), each error
is also split into text and vision tokens: keys by the token whose key is scored (score column), values
by the token whose value it is, the output by the query token. Every figure is ``|error| / |reference|``
over its tokens, so ``overall^2 = (e_text^2 R_text^2 + e_vision^2 R_vision^2) / (R_text^2 + R_vision^2)``
with ``R`` the reference norm over those tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .. import attention_math, rope
from ..conversion import SourceAttention
from ..module import M2LAttention
from .stats import LayerStatistics, RefitStatistics, _rotate, accumulate, accumulate_refit, source_projections

__all__ = [
    "AttentionCall",
    "LayerErrors",
    "collect_statistics",
    "layer_errors",
    "measure_layer_errors",
    "source_attention_output",
]


@dataclass
class AttentionCall:
    """One attention call: input ``hidden [b, t, d]``, unscaled per-pair ``cos, sin [b|1, t, P]``, mask.

    ``vision [b, t]`` (bool, optional): True where the token is a vision token (image/video), for
    error reports split by token type; None when the caller does not distinguish token types.
    """

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attention_mask: torch.Tensor | None = None
    vision: torch.Tensor | None = None


@dataclass
class LayerErrors:
    """Relative errors of one converted layer on held-out tokens.

    ``key``/``value``/``output``: over all tokens. ``*_text``/``*_vision``: over text or vision tokens
    only (keys: the scored key's token, values: the value's token, output: the query token); None when
    no token-type mask was given or that type has no tokens.
    """

    key: float
    value: float
    output: float
    key_text: float | None = None
    key_vision: float | None = None
    value_text: float | None = None
    value_vision: float | None = None
    output_text: float | None = None
    output_vision: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _StopForward(Exception):
    """Raised by a hook once the last layer of interest has been seen."""


@torch.no_grad()
def collect_statistics(
    forward: Callable[[Any], Any],
    batches: Sequence[Any],
    targets: dict[int, tuple[nn.Module, SourceAttention]],
    extract: Callable[[nn.Module, tuple, dict], AttentionCall],
    token_weight: Callable[[Any], torch.Tensor | None] = lambda batch: None,
    stop_after: int | None = None,
    heldout: int | None = None,
    uniform_mix: float = 0.25,
    vision_mask: Callable[[Any], torch.Tensor | None] = lambda batch: None,
    parts: str = "all",
) -> tuple[dict[int, Any], dict[int, AttentionCall]]:
    """Statistics of every target layer over ``batches`` (except batch ``heldout``, whose calls are returned).

    ``targets``: layer index -> (attention module to hook, its source description). ``forward(batch)``
    runs the model. ``stop_after``: a layer index whose hook ends every forward (layer-wise streaming).
    ``vision_mask(batch)``: bool ``[b, t]`` marking vision tokens (or None); attached to the held-out
    calls when its shape matches the attention input's ``[b, t]``. ``parts``: ``"all"`` gives
    :class:`LayerStatistics` with refit sums, ``"base"`` without them, ``"refit"`` only the
    :class:`RefitStatistics` (the large sums, so a caller can gather them a few layers at a time).
    """
    if parts not in ("all", "base", "refit"):
        raise ValueError(f"parts must be 'all', 'base' or 'refit', got {parts!r}")
    stats: dict[int, Any] = {
        idx: RefitStatistics.zeros(src) if parts == "refit" else LayerStatistics.zeros(src, refit=parts == "all")
        for idx, (_, src) in targets.items()
    }
    calls: dict[int, AttentionCall] = {}
    state: dict[str, Any] = {}

    def make_hook(idx: int, src: SourceAttention):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = extract(module, args, kwargs)
            if state["heldout"]:  # keep one sequence of the held-out batch, for error reports
                mask = call.attention_mask
                mask = mask[:1] if mask is not None and mask.shape[0] > 1 else mask
                vision = state["vision"]
                if vision is not None and tuple(vision.shape) == tuple(call.hidden.shape[:2]):
                    vision = vision[:1].to(device=call.hidden.device, dtype=torch.bool)
                else:
                    vision = None
                calls[idx] = AttentionCall(call.hidden[:1], call.cos[:1], call.sin[:1], mask, vision)
            else:
                weight = state["weight"]
                if weight is not None and tuple(weight.shape) != tuple(call.hidden.shape[:2]):
                    weight = None
                if parts == "refit":
                    stats[idx] = accumulate_refit(
                        stats[idx], src, call.hidden, call.cos, call.sin, call.attention_mask, weight
                    )
                else:
                    stats[idx] = accumulate(
                        stats[idx], src, call.hidden, call.cos, call.sin, call.attention_mask, weight, uniform_mix
                    )
            if stop_after == idx:
                raise _StopForward
            return None

        return hook

    handles = [
        module.register_forward_pre_hook(make_hook(idx, src), with_kwargs=True)
        for idx, (module, src) in targets.items()
    ]
    try:
        for number, batch in enumerate(batches):
            state["heldout"] = number == heldout
            state["weight"] = token_weight(batch)
            state["vision"] = vision_mask(batch) if number == heldout else None
            try:
                forward(batch)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats, calls


def _source_scores(src: SourceAttention, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Source attention logits (before the softmax scale) ``[b, H, t, s]`` and values ``[b, s, G, D]``."""
    q, k, v = source_projections(src, call.hidden.float())
    P = src.rotary_dim // 2
    cos, sin = call.cos.float()[:, :, None], call.sin.float()[:, :, None]
    if src.rope_interleaved:
        qx, qy, kx, ky = q[..., 0 : 2 * P : 2], q[..., 1 : 2 * P : 2], k[..., 0 : 2 * P : 2], k[..., 1 : 2 * P : 2]
    else:
        qx, qy, kx, ky = q[..., :P], q[..., P : 2 * P], k[..., :P], k[..., P : 2 * P]
    rq = _rotate(qx, qy, cos, sin, src)
    rk = _rotate(kx, ky, cos, sin, src).repeat_interleave(src.group_size, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", rq, rk) * src.rope_scaling**2
    return scores, v


def _mask_bias(call: AttentionCall, t: int, heads: int) -> torch.Tensor:
    mask = call.attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[..., -t:, -t:]
        if mask.shape[1] not in (1, heads):
            mask = mask[:, :1]
    return attention_math.attention_bias(mask, t, t, call.hidden.device, torch.float32)


def source_attention_output(src: SourceAttention, call: AttentionCall) -> torch.Tensor:
    """The source layer's attention output ``[b, t, d]`` (reference for error reports)."""
    scores, v = _source_scores(src, call)
    t = scores.shape[-1]
    bias = _mask_bias(call, t, src.num_heads)
    probs = torch.softmax(scores * src.softmax_scale + bias, dim=-1).nan_to_num(0.0)
    values = v.repeat_interleave(src.group_size, dim=2)  # [b, s, H, D]
    out = torch.einsum("bhts,bshd->bthd", probs, values).flatten(-2)
    out = out @ src.o_weight.float().T
    return out if src.o_bias is None else out + src.o_bias.float()


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.norm() / reference.norm().clamp_min(1e-30))


def _split(
    error: torch.Tensor, reference: torch.Tensor, vision: torch.Tensor | None, allowed: torch.Tensor | None = None
) -> tuple[float, float | None, float | None]:
    """Relative error over all elements, over text and over vision tokens.

    ``vision`` is already broadcast to ``error``'s shape (True where the element belongs to a vision
    token); ``allowed`` (same shape) restricts every figure to the unmasked elements.
    """
    if allowed is None:
        allowed = torch.ones_like(error, dtype=torch.bool)
    overall = _relative(error[allowed], reference[allowed])
    if vision is None:
        return overall, None, None
    parts = []
    for select in (allowed & ~vision, allowed & vision):
        parts.append(_relative(error[select], reference[select]) if bool(select.any()) else None)
    return overall, parts[0], parts[1]


@torch.no_grad()
def measure_layer_errors(src: SourceAttention, module: M2LAttention, call: AttentionCall) -> LayerErrors:
    """Relative errors of ``module`` against ``src`` on ``call``, split by token type when ``call.vision`` is set."""
    c = module.config
    hidden = call.hidden.to(module.kv_a_proj.weight.dtype)
    columns = module.rope_source_column.to(call.cos.device)
    cos = call.cos.float().index_select(-1, columns)
    sin = call.sin.float().index_select(-1, columns)
    q_nope, q_rope = module.project_queries(hidden)
    latent, k_rope = module.encode_kv(hidden)
    q_rope = rope.apply_rope_half(q_rope.float(), cos[:, :, None], sin[:, :, None]) * c.rope_scaling
    k_rope = rope.apply_rope_half(k_rope.float(), cos, sin) * c.rope_scaling
    w_uk, w_uv, v_bias = module.up_projections()
    k_nope = torch.einsum("bsr,hnr->bshn", latent.float(), w_uk.float())
    scores = torch.einsum("bthn,bshn->bhts", q_nope.float(), k_nope)
    scores = scores + torch.einsum("bthp,bsp->bhts", q_rope, k_rope)
    reference_scores, reference_v = _source_scores(src, call)
    b, t = call.hidden.shape[:2]
    vision = call.vision
    if vision is not None:
        vision = vision.to(scores.device, torch.bool).expand(b, t)
    allowed = torch.isfinite(_mask_bias(call, t, src.num_heads)).expand_as(scores)
    key = _split(
        scores - reference_scores,
        reference_scores,
        None if vision is None else vision[:, None, None, :].expand_as(scores),
        allowed,
    )
    values = torch.einsum("bsr,hvr->bshv", latent.float(), w_uv.float())
    if v_bias is not None:
        values = values + v_bias.float()
    reference_values = reference_v.repeat_interleave(src.group_size, dim=2)
    value = _split(
        values - reference_values,
        reference_values,
        None if vision is None else vision[:, :, None, None].expand_as(values),
    )
    out = module.attend(hidden, cos * c.rope_scaling, sin * c.rope_scaling, _mask_for_module(call), None).float()
    reference_out = source_attention_output(src, call)
    output = _split(out - reference_out, reference_out, None if vision is None else vision[:, :, None].expand_as(out))
    return LayerErrors(
        key[0],
        value[0],
        output[0],
        key_text=key[1],
        key_vision=key[2],
        value_text=value[1],
        value_vision=value[2],
        output_text=output[1],
        output_vision=output[2],
    )


def layer_errors(src: SourceAttention, module: M2LAttention, call: AttentionCall) -> tuple[float, float, float]:
    """Relative errors (scores, values, attention output) of ``module`` against ``src`` on ``call``."""
    errors = measure_layer_errors(src, module, call)
    return errors.key, errors.value, errors.output


def _mask_for_module(call: AttentionCall) -> torch.Tensor | None:
    mask = call.attention_mask
    if mask is not None and mask.dim() == 4:
        t = call.hidden.shape[1]
        mask = mask[..., -t:, -t:]
    return mask
