"""fp8 latent cache rows (m2la.quantization) and the pure-torch LatentCache that stores them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2la import LatentCache
from m2la.quantization import dequantize_rows, quantize_rows

HALF_STEP = {torch.float8_e4m3fn: 2**-4, torch.float8_e5m2: 2**-3}  # relative, normal range


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 70),
    tokens=st.integers(1, 9),
    log_range=st.floats(0.0, 6.0),
    fp8=st.sampled_from(list(HALF_STEP)),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_half_a_step(width, tokens, log_range, fp8, seed):
    """Every value comes back within half an fp8 step: relative for normals, absolute below the
    smallest normal (scaled by the row's amax); the row's largest value maps to the fp8 max."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(tokens, width, generator=gen) * torch.exp(torch.rand(tokens, width, generator=gen) * -log_range)
    quantized, scale = quantize_rows(rows, fp8)
    assert quantized.dtype == fp8 and scale.dtype == torch.float32 and scale.shape == (tokens,)
    back = dequantize_rows(quantized, scale)
    finfo = torch.finfo(fp8)
    floor = finfo.tiny * finfo.eps * scale[:, None] / 2  # half a subnormal step, unscaled
    allowed = torch.maximum(rows.abs() * HALF_STEP[fp8], floor) * 1.0001
    assert ((back - rows).abs() <= allowed).all()
    assert torch.equal(quantized.float().abs().amax(-1), torch.full((tokens,), finfo.max))


def test_zero_rows_get_scale_one():
    quantized, scale = quantize_rows(torch.zeros(2, 5), torch.float8_e4m3fn)
    assert scale.tolist() == [1.0, 1.0] and (quantized.float() == 0).all()


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_latent_cache_stores_fp8_rows_and_scales(fp8):
    cache = LatentCache(2, dtype=fp8)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(3, 4, 40, generator=gen), torch.randn(3, 2, 40, generator=gen)
    cache.append_latent(1, first)
    rows = cache.append_latent(1, second)
    expected = torch.cat([first, second], dim=1)
    assert rows.dtype == torch.float32 and rows.shape == (3, 6, 40)
    assert ((rows - expected).abs() <= expected.abs() * HALF_STEP[fp8] + 1e-3).all()
    assert not torch.equal(rows, expected)  # it really was quantized
    stored, scales = cache.quantized_rows(1)
    assert stored.dtype == fp8 and scales.shape == (3, 6)
    assert cache.nbytes == 3 * 6 * (40 + 4) and cache.seq_length(1) == 6
    assert cache.quantized_rows(0) is None and LatentCache(1).quantized_rows(0) is None
    # dequantize=False (the Triton path) stores the same bits and returns nothing to dequantize
    third = torch.randn(3, 1, 40, generator=gen)
    assert cache.append_latent(1, third, dequantize=False) is None
    stored, scales = cache.quantized_rows(1)
    assert torch.equal(stored[:, -1:], quantize_rows(third, fp8)[0]) and scales.shape == (3, 7)
    plain = LatentCache(1)
    assert torch.equal(plain.append_latent(0, third, dequantize=False), third)  # non-fp8: rows as stored


def test_latent_cache_rejects_other_dtypes():
    with pytest.raises(ValueError, match="latent cache dtype must be None or one of"):
        LatentCache(1, dtype=torch.float16)
