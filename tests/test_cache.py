"""Latent cache storage: appends write in place into buffers with growth room (amortized O(t) a step)
and always hold exactly what torch.cat would, through crops, reorders and batch selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2la import LatentCache
from m2la.cache import GROWTH_FRACTION, GROWTH_MIN_TOKENS, append_rows, reserved_nbytes


def test_decode_steps_write_in_place_after_one_regrowth():
    prompt = torch.randn(2, 40, 12)
    rows = append_rows(None, prompt)
    assert reserved_nbytes(rows) == prompt.numel() * 4  # a first write is exact: no room reserved
    expected = prompt
    pointers = set()
    for _ in range(GROWTH_MIN_TOKENS + 1):  # the last step fills the buffer exactly
        step = torch.randn(2, 1, 12)
        rows = append_rows(rows, step)
        expected = torch.cat((expected, step), dim=1)
        pointers.add(rows.data_ptr())
        assert torch.equal(rows, expected)
    assert len(pointers) == 1  # one regrowth (the first step), then every step wrote in place
    assert reserved_nbytes(rows) == rows.numel() * 4 == 2 * (40 + 1 + GROWTH_MIN_TOKENS) * 12 * 4


def test_growth_room_is_a_sixteenth_of_long_caches():
    rows = append_rows(None, torch.zeros(1, 16 * 1024, 4))
    rows = append_rows(rows, torch.zeros(1, 1, 4))
    assert rows._base.shape[1] == 16 * 1024 + 1 + (16 * 1024 + 1) // GROWTH_FRACTION


def test_cropped_rows_are_overwritten_not_leaked():
    rows = append_rows(append_rows(None, torch.zeros(1, 8, 3)), torch.ones(1, 4, 3))  # [b, 12, w]
    cropped = rows[:, :6]  # what DynamicLayer.crop keeps
    rows = append_rows(cropped, torch.full((1, 2, 3), 7.0))
    assert rows.shape == (1, 8, 3) and rows.data_ptr() == cropped.data_ptr()
    assert torch.equal(rows[0, :, 0], torch.tensor([0, 0, 0, 0, 0, 0, 7, 7.0]))


def test_caller_tensors_are_never_written():
    first, second = torch.zeros(1, 3, 2), torch.ones(1, 5, 2)
    view_of_caller = second[:, 1:4]
    rows = append_rows(append_rows(None, first), view_of_caller)
    append_rows(rows, torch.full((1, 1, 2), 9.0))
    assert (first == 0).all() and (second == 1).all()
    rows = append_rows(None, view_of_caller)  # a view of the caller's tensor is copied, not extended
    append_rows(rows, torch.full((1, 1, 2), 9.0))
    assert (second == 1).all()


def test_autograd_appends_concatenate():
    held = append_rows(append_rows(None, torch.randn(1, 2, 3)), torch.randn(1, 1, 3))
    new = torch.randn(1, 1, 3, requires_grad=True)
    rows = append_rows(held, new)
    assert rows.data_ptr() != held.data_ptr()
    rows.sum().backward()
    assert torch.equal(new.grad, torch.ones(1, 1, 3))


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 300)),
            st.tuples(st.just("crop"), st.integers(1, 50)),
            st.tuples(st.just("reorder"), st.just(0)),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_any_sequence_matches_concatenation(ops):
    """Random appends (prompt-sized and decode-sized), crops and batch reorders against torch.cat."""
    gen = torch.Generator().manual_seed(len(ops))
    rows = expected = None
    peak = 0  # longest length held so far: no buffer is ever longer than it plus growth room
    for op, n in ops:
        if op == "append":
            new = torch.randn(2, n, 5, generator=gen)
            rows = append_rows(rows, new)
            expected = new if expected is None else torch.cat((expected, new), dim=1)
        elif expected is not None and op == "crop":
            keep = max(expected.shape[1] - n, 1)
            rows, expected = rows[:, :keep], expected[:, :keep]
        elif expected is not None:
            rows, expected = rows.index_select(0, torch.tensor([1, 0])), expected.flip(0)
        if expected is not None:
            assert torch.equal(rows, expected)
            peak = max(peak, expected.shape[1])
            assert reserved_nbytes(rows) <= (peak + max(GROWTH_MIN_TOKENS, peak // GROWTH_FRACTION)) * 2 * 5 * 4


@pytest.mark.parametrize("dtype", [None, torch.float8_e4m3fn])
def test_latent_cache_decode_keeps_its_buffers(dtype):
    cache = LatentCache(1, dtype=dtype)
    cache.append_latent(0, torch.randn(1, 30, 8))
    cache.append_latent(0, torch.randn(1, 1, 8))
    pointers = {(cache.rows[0].data_ptr(), None if dtype is None else cache.scales[0].data_ptr())}
    for _ in range(20):
        cache.append_latent(0, torch.randn(1, 1, 8), dequantize=False)
        pointers.add((cache.rows[0].data_ptr(), None if dtype is None else cache.scales[0].data_ptr()))
    assert len(pointers) == 1 and cache.seq_length(0) == 51
    assert cache.nbytes < cache.reserved_nbytes <= cache.nbytes + GROWTH_MIN_TOKENS * (8 + 4) * 4
