"""Distillation recovery: the loss is a true KL and training moves a damaged student back to its teacher."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
import m2la  # noqa: E402
import tiny_hf  # noqa: E402
from m2la.training import DistillConfig, distill, kl_distill_loss  # noqa: E402


def test_kl_loss_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kl_distill_loss(s, t), expected)
    assert float(kl_distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]])
    per_token = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(kl_distill_loss(s, t, mask=mask), (per_token[0, 0] + per_token[1, 2]) / 2)


def _kl(student, teacher, ids):
    with torch.no_grad():
        return float(kl_distill_loss(student(ids).logits, teacher(ids).logits))


def test_distillation_recovers_damaged_attention():
    teacher = tiny_hf.build("qwen3", 6, 2, 12)
    student = copy.deepcopy(teacher)
    m2la.convert(student)
    torch.manual_seed(0)
    with torch.no_grad():  # damage the latent up-projections, as a lossy compression would
        for layer in student.modules():
            if isinstance(layer, m2la.M2LAttention):
                layer.kv_b_proj.weight.mul_(0.6).add_(torch.randn_like(layer.kv_b_proj.weight) * 0.2)
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(10, tiny_hf.VOCAB, (4, 16), generator=g) for _ in range(16)]
    held_out = torch.randint(10, tiny_hf.VOCAB, (4, 16), generator=g)
    before = _kl(student, teacher, held_out)
    frozen = {n: p.clone() for n, p in student.named_parameters() if "self_attn" not in n}
    result = distill(student, teacher, train, DistillConfig(steps=80, lr=1e-3, warmup_steps=5))
    after = _kl(student, teacher, held_out)
    assert before > 1e-3
    assert after < 0.5 * before
    assert len(result.losses) == 80 and result.losses[-1] < result.losses[0]
    for name, p in student.named_parameters():  # only the attention was trained
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        assert not p.requires_grad


def test_attention_only_needs_a_converted_student():
    model = tiny_hf.build("llama")
    with pytest.raises(ValueError, match="m2la-converted student"):
        distill(model, model, [torch.zeros(1, 4, dtype=torch.long)], DistillConfig(steps=1))
