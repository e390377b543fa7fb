"""Latent cache storage: appends write in place into buffers with growth room (amortized O(t) a step)
and always hold exactly what torch.cat would, through crops, reorders and batch selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2la import LatentCache
from m2la.cache import GROWTH_FRACTION, GROWTH_MIN_TOKENS, append_rows, views_prefix_of


def append_all(*chunks):
    buffer = rows = None
    for chunk in chunks:
        buffer, rows = append_rows(buffer, rows, chunk)
    return buffer, rows


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_decode_steps_write_in_place_after_one_regrowth(mode):
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        prompt = torch.randn(2, 40, 12)
        buffer, rows = append_rows(None, None, prompt)
        assert buffer.shape == prompt.shape  # a first write is exact: no room reserved
        expected = prompt
        pointers = set()
        for _ in range(GROWTH_MIN_TOKENS + 1):  # the last step fills the buffer exactly
            step = torch.randn(2, 1, 12)
            buffer, rows = append_rows(buffer, rows, step)
            expected = torch.cat((expected, step), dim=1)
            pointers.add(rows.data_ptr())
            assert torch.equal(rows, expected) and views_prefix_of(rows, buffer)
    assert len(pointers) == 1  # one regrowth (the first step), then every step wrote in place
    assert buffer.shape == rows.shape == (2, 40 + 1 + GROWTH_MIN_TOKENS, 12)


def test_growth_room_is_a_sixteenth_of_long_caches():
    buffer, _ = append_all(torch.zeros(1, 16 * 1024, 4), torch.zeros(1, 1, 4))
    assert buffer.shape[1] == 16 * 1024 + 1 + (16 * 1024 + 1) // GROWTH_FRACTION


def test_cropped_rows_are_overwritten_not_leaked():
    buffer, rows = append_all(torch.zeros(1, 8, 3), torch.ones(1, 4, 3))  # [b, 12, w]
    cropped = rows[:, :6]  # what DynamicLayer.crop keeps
    buffer, rows = append_rows(buffer, cropped, torch.full((1, 2, 3), 7.0))
    assert rows.shape == (1, 8, 3) and rows.data_ptr() == cropped.data_ptr()
    assert torch.equal(rows[0, :, 0], torch.tensor([0, 0, 0, 0, 0, 0, 7, 7.0]))


def test_caller_tensors_are_never_written():
    first, second = torch.zeros(1, 3, 2), torch.ones(1, 5, 2)
    buffer, rows = append_all(first, second[:, 1:4])
    append_rows(buffer, rows[:, :1], torch.full((1, 2, 2), 9.0))  # crop, then append over the crop
    assert (first == 0).all() and (second == 1).all()
    buffer, rows = append_rows(None, None, second)  # a first write copies too
    append_rows(buffer, rows[:, :1], torch.full((1, 1, 2), 9.0))
    assert (second == 1).all()


def test_rows_not_viewing_the_buffer_move_to_a_new_one():
    buffer, rows = append_all(torch.zeros(2, 4, 3), torch.ones(2, 1, 3))
    reordered = rows.index_select(0, torch.tensor([1, 0]))
    new_buffer, new_rows = append_rows(buffer, reordered, torch.full((2, 1, 3), 5.0))
    assert new_buffer.data_ptr() != buffer.data_ptr() and new_rows.shape == (2, 6, 3)
    assert torch.equal(buffer[:, :5], torch.cat((torch.zeros(2, 4, 3), torch.ones(2, 1, 3)), dim=1))


def test_autograd_appends_concatenate():
    buffer, held = append_all(torch.randn(1, 2, 3), torch.randn(1, 1, 3))
    new = torch.randn(1, 1, 3, requires_grad=True)
    _, rows = append_rows(buffer, held, new)
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
    buffer = rows = expected = None
    peak = 0  # longest length held so far: no buffer is ever longer than it plus growth room
    for op, n in ops:
        if op == "append":
            new = torch.randn(2, n, 5, generator=gen)
            buffer, rows = append_rows(buffer, rows, new)
            expected = new if expected is None else torch.cat((expected, new), dim=1)
        elif expected is not None and op == "crop":
            keep = max(expected.shape[1] - n, 1)
            rows, expected = rows[:, :keep], expected[:, :keep]
        elif expected is not None:
            rows, expected = rows.index_select(0, torch.tensor([1, 0])), expected.flip(0)
        if expected is not None:
            assert torch.equal(rows, expected)
            peak = max(peak, expected.shape[1])
            assert buffer.shape[1] <= peak + max(GROWTH_MIN_TOKENS, peak // GROWTH_FRACTION)


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
    row_bytes = 8 * (1 if dtype else 4) + (4 if dtype else 0)
    assert cache.nbytes == 51 * row_bytes
    assert cache.reserved_nbytes == (31 + GROWTH_MIN_TOKENS) * row_bytes


@pytest.mark.parametrize("dtype", [None, torch.float8_e4m3fn], ids=["plain", "fp8"])
def test_reserve_latent_leaves_the_new_rows_to_the_caller(dtype):
    """reserve_latent (the fused cache write's entry): the held rows stay, the last t rows and scales
    are what the caller writes there, decode steps reserve in place, and a mismatched shape is refused."""
    cache = LatentCache(1, dtype)
    prompt = torch.randn(2, 5, 12)
    cache.append_latent(0, prompt)
    rows, scales = cache.reserve_latent(0, 2, 1, 12, torch.float32, torch.device("cpu"))
    assert rows.shape == (2, 6, 12) and (scales is None) == (dtype is None)
    assert rows is cache.rows[0] and (scales is None or scales is cache.scales[0])
    stored = cache.quantized_rows(0)
    expected_prefix = prompt if dtype is None else stored[0][:, :5].float() * stored[1][:, :5, None]
    if dtype is not None:
        torch.testing.assert_close(expected_prefix, prompt, rtol=0.07, atol=0)
    rows[:, 5:] = 0  # the caller's write
    pointer = rows.data_ptr()
    again, _ = cache.reserve_latent(0, 2, 1, 12, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == pointer and again.shape[1] == 7 and cache.seq_length(0) == 7
    assert torch.equal(again[:, 5].float(), torch.zeros(2, 12))
    with pytest.raises(ValueError, match=r"caches \[b=2, width=12\] rows, got \[b=2, width=10\]"):
        cache.reserve_latent(0, 2, 1, 10, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [None, torch.float8_e4m3fn], ids=["plain", "fp8"])
def test_static_latent_cache_holds_what_the_growing_cache_holds(dtype):
    """StaticLatentCache: rows written after those held, in buffers that never move, zero past the
    length; the same stored bytes as LatentCache; reserve counts rows for the caller; reset keeps
    the buffers; overfilling and mismatched shapes are refused."""
    from m2la import StaticLatentCache

    growing, static = LatentCache(1, dtype), StaticLatentCache(1, 12, dtype)
    chunks = [torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 3, 8)]
    for chunk in chunks:
        want = growing.append_latent(0, chunk)
        got = static.append_latent(0, chunk)
        held = growing.seq_length(0)
        assert got.shape == (2, 12, 8) and torch.equal(got[:, :held], want) and not got[:, held:].any()
        assert static.seq_length(0) == int(static.static_length(0)) == held
    pointer = static.rows[0].data_ptr()
    assert static.nbytes == growing.nbytes and static.reserved_nbytes == 12 * growing.nbytes // 9
    if dtype is not None:
        assert torch.equal(static.quantized_rows(0)[0][:, :9].view(torch.uint8), growing.rows[0].view(torch.uint8))
        assert static.append_latent(0, torch.randn(2, 1, 8), dequantize=False) is None
    else:
        assert static.quantized_rows(0) is None
        static.append_latent(0, torch.randn(2, 1, 8))
    rows, scales = static.reserve_latent(0, 2, 2, 8, torch.float32, torch.device("cpu"))
    assert rows.data_ptr() == pointer and rows.shape == (2, 12, 8) and static.seq_length(0) == 12
    assert (scales is None) == (dtype is None)
    with pytest.raises(ValueError, match="holds 12 of 12 tokens and cannot take 1 more"):
        static.append_latent(0, torch.randn(2, 1, 8))
    static.reset()
    assert static.seq_length(0) == 0 and not static.rows[0].any() and static.rows[0].data_ptr() == pointer
    with pytest.raises(ValueError, match=r"caches \[b=2, width=8\] rows, got \[b=2, width=6\]"):
        static.append_latent(0, torch.randn(2, 1, 6))
    with pytest.raises(ValueError, match="max_cache_len must be positive"):
        StaticLatentCache(1, 0)
