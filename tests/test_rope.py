"""RoPE variants against independent formulations and the transformers implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2la import rope


def _rotate_pairs_complex(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Oracle: treat each pair as a complex number and multiply by exp(i * angle)."""
    p = angles.shape[-1]
    if interleaved:
        re, im = x[..., 0::2], x[..., 1::2]
    else:
        re, im = x[..., :p], x[..., p:]
    z = torch.complex(re, im) * torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@settings(max_examples=30, deadline=None)
@given(pairs=st.integers(1, 9), t=st.integers(1, 7), interleaved=st.booleans(), extra=st.integers(0, 5))
def test_apply_matches_complex_rotation(pairs, t, interleaved, extra):
    x = torch.randn(2, t, 2 * pairs + extra, dtype=torch.float64)
    angles = torch.randn(2, t, pairs, dtype=torch.float64) * 3
    cos, sin = angles.cos(), angles.sin()
    got = rope.apply_partial_rope(x, cos, sin, interleaved)
    expected = _rotate_pairs_complex(x[..., : 2 * pairs], angles, interleaved)
    torch.testing.assert_close(got[..., : 2 * pairs], expected)
    torch.testing.assert_close(got[..., 2 * pairs :], x[..., 2 * pairs :])  # partial rotary passes the rest


def test_layouts_are_permutations_of_each_other():
    x = torch.randn(3, 10, dtype=torch.float64)
    angles = torch.rand(3, 5, dtype=torch.float64)
    half = rope.apply_rope_half(x, angles.cos(), angles.sin())
    to_inter = rope.half_to_interleaved_order(10)
    inter = rope.apply_rope_interleaved(x[..., to_inter], angles.cos(), angles.sin())
    torch.testing.assert_close(inter, half[..., to_inter])
    assert torch.equal(to_inter[rope.interleaved_to_half_order(10)], torch.arange(10))


def test_rotate_half_matches_transformers():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16)
    angles = torch.rand(2, 5, 8) * 10
    cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rope.apply_rope_half(q, angles.cos()[:, None], angles.sin()[:, None]), q_hf)
    torch.testing.assert_close(rope.apply_rope_half(k, angles.cos()[:, None], angles.sin()[:, None]), k_hf)


def test_default_inv_freq():
    torch.testing.assert_close(
        rope.default_inv_freq(8, 10_000.0, torch.float64),
        torch.tensor([10_000.0 ** (-i / 8) for i in range(0, 8, 2)], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="even"):
        rope.default_inv_freq(7, 1.0)


def test_rope_angles_1d_and_3d():
    inv_freq = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    positions = torch.tensor([[0, 1, 5]])
    torch.testing.assert_close(rope.rope_angles(positions, inv_freq), positions[..., None].double() * inv_freq)
    pos3 = torch.stack([positions, positions * 10, positions * 100])  # t, h, w
    axis = torch.tensor([0, 1, 2, 1])
    angles = rope.rope_angles(pos3, inv_freq, axis)
    assert angles[0, 2].tolist() == [5 * 1.0, 50 * 0.5, 500 * 0.25, 50 * 0.125]
    with pytest.raises(ValueError, match="per-pair axis"):
        rope.rope_angles(pos3, inv_freq)
    with pytest.raises(ValueError, match="positions must be"):
        rope.rope_angles(torch.zeros(5), inv_freq)


@pytest.mark.parametrize("sections", [[16, 24, 24], [2, 1, 1], [24, 20, 20]])
def test_sectioned_mrope_axes_match_qwen2_vl(sections):
    qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    pairs = sum(sections)
    freqs = torch.arange(3.0)[:, None, None, None].expand(3, 1, 1, pairs)  # value = axis index
    recomposed = qwen2_vl.Qwen2VLRotaryEmbedding.recomposition_frequencies(
        type("R", (), {"mrope_section": sections})(), freqs
    )
    assert recomposed[0, 0, :pairs].long().tolist() == rope.mrope_axes_sectioned(sections).tolist()


@pytest.mark.parametrize("sections", [[24, 20, 20], [2, 1, 1], [3, 2, 2]])
def test_interleaved_mrope_axes_match_qwen3_vl(sections):
    qwen3_vl = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
    pairs = sum(sections)
    freqs = torch.arange(3.0)[:, None, None, None].expand(3, 1, 1, pairs).clone()
    fake = type("R", (), {"mrope_section": sections})()
    recomposed = qwen3_vl.Qwen3VLTextRotaryEmbedding.recomposition_frequencies(fake, freqs)
    assert recomposed[0, 0, :pairs].long().tolist() == rope.mrope_axes_interleaved(sections).tolist()


def test_cos_sin_scaling():
    cos, sin = rope.cos_sin(torch.tensor([0.0, math.pi / 2]), scaling=2.0)
    torch.testing.assert_close(cos, torch.tensor([2.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
