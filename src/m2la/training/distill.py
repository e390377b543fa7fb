"""Recovery by distillation: bring a compressed model back toward its unconverted teacher.

The seed of training stage 1 (continued pretraining): KL(teacher || student) on next-token logits,
teacher frozen, student's latent-attention weights (or everything) trainable. Works on any pair of
causal LMs with the same vocabulary whose forward returns ``.logits``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..module import M2LAttention

__all__ = ["DistillConfig", "DistillResult", "kl_distill_loss", "trainable_parameters", "distill"]


@dataclass
class DistillConfig:
    steps: int = 200
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    temperature: float = 1.0
    grad_clip: float = 1.0
    trainable: str = "attention"  # "attention": only M²LA layers; "all": every parameter
    log_every: int = 10


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)  # KL per step
    seconds: float = 0.0
    trainable_parameters: int = 0


def kl_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher / T) || softmax(student / T)) * T^2``.

    logits ``[b, t, vocab]``; mask ``[b, t]`` (1 = count the token). Computed in fp32.
    """
    log_p_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [b, t]
    if mask is not None:
        per_token = per_token * mask
        return per_token.sum() / mask.sum().clamp(min=1) * temperature**2
    return per_token.mean() * temperature**2


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    if which == "all":
        return [p for p in model.parameters()]
    if which == "attention":
        params = [p for m in model.modules() if isinstance(m, M2LAttention) for p in m.parameters()]
        if not params:
            raise ValueError("trainable='attention' needs an m2la-converted student (no M2LAttention layers found)")
        return params
    raise ValueError(f"trainable must be 'attention' or 'all', got {which!r}")


def _lr_at(step: int, config: DistillConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _cycle(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    cached = list(batches)
    if not cached:
        raise ValueError("distillation needs at least one batch of token ids")
    return itertools.cycle(cached)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[torch.Tensor],
    config: DistillConfig | None = None,
    progress: bool = False,
) -> DistillResult:
    """Train ``student`` in place to match ``teacher``'s logits on ``batches`` (``[b, t]`` token ids, cycled).

    The teacher runs under ``no_grad``; the student without a cache. Returns the per-step KL.
    """
    config = config or DistillConfig()
    params = trainable_parameters(student, config.trainable)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    teacher.eval()
    was_training = student.training
    student.eval()  # no dropout: the teacher's targets are deterministic too
    result = DistillResult(trainable_parameters=sum(p.numel() for p in params))
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="distilling", unit="step")
    start = time.perf_counter()
    data = _cycle(batches)
    try:
        for step in steps:
            input_ids = next(data)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
            student_logits = student(input_ids=input_ids, use_cache=False).logits
            loss = kl_distill_loss(student_logits, teacher_logits, config.temperature)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            result.losses.append(float(loss.detach()))
            if progress and step % config.log_every == 0:
                steps.set_postfix(kl=f"{result.losses[-1]:.4f}")
    finally:
        for p in student.parameters():
            p.requires_grad_(False)
        student.train(was_training)
    result.seconds = time.perf_counter() - start
    return result
