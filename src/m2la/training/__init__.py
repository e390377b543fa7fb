"""Training-stage recipes. Stage 1 seed: recovery of a compressed model by distillation (``distill``)."""

from .distill import DistillConfig, DistillResult, distill, kl_distill_loss

__all__ = ["DistillConfig", "DistillResult", "distill", "kl_distill_loss"]
