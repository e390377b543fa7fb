"""M2LAStaticCache: the fixed-capacity latent cache for transformers (reference backend, eager).

Compiled and Triton-backend runs over it are in tests/kernels/test_kernel_compile.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf  # noqa: E402

import m2la  # noqa: E402
import tiny_hf  # noqa: E402
from m2la.integrations import hf  # noqa: E402


def _cache_widths(model) -> list[int]:
    return [m.config.cache_width for m in model.modules() if isinstance(m, m2la.M2LAttention)]


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_static_cache_generate_matches_the_original(family):
    """Both routes to a static latent cache give the source model's greedy tokens: an
    M2LAStaticCache passed in, and transformers' cache_implementation="static" (swapped for one)."""
    model = tiny_hf.build(family)
    inputs = tiny_hf.family_inputs(model, family, batch=1, length=11)
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    m2la.convert(model)
    capacity = expected.shape[1] + 3
    cache = m2la.M2LAStaticCache.for_model(model, capacity)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False, cache=cache), expected)
    if family == "mistral":  # sliding-window layers: transformers' static cache would hold the window only
        with pytest.raises(ValueError, match="keeps only the window"):
            model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
    else:
        static = model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
        assert torch.equal(static, expected)
    tokens = expected.shape[1] - 1  # the last token is never fed back
    for layer, width in zip(cache.layers, _cache_widths(model), strict=True):
        assert layer.keys.shape == (1, capacity, width) and layer.values.shape == (1, capacity, 0)
        assert int(layer.get_seq_length()) == tokens
        assert not layer.keys[:, tokens:].any()  # capacity past the rows held stays unwritten
    assert cache.nbytes == tokens * sum(_cache_widths(model)) * 4
    assert cache.reserved_nbytes == capacity * sum(_cache_widths(model)) * 4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_cache_left_padded_batch_and_beam_search(family):
    model = tiny_hf.build(family)
    ids, mask = tiny_hf.left_padded_ids()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs)
    beams = model.generate(**kwargs, num_beams=3)
    m2la.convert(model)
    assert torch.equal(model.generate(**kwargs, cache=m2la.M2LAStaticCache.for_model(model, 20)), expected)
    assert torch.equal(model.generate(**kwargs, num_beams=3, cache_implementation="static"), beams)


def test_static_cache_chunks_decode_in_place_and_crop_rewrites():
    """Chunked prefill and decode steps into an allocated static cache give the full forward's
    logits and never move its buffers; a crop (negative, as transformers' static layers take it)
    rolls back, and the next call overwrites the dropped rows."""
    model = tiny_hf.build("qwen3", 6, 2, 12)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
        m2la.convert(model)
        cache = m2la.M2LAStaticCache.for_model(model, 19, batch_size=2)
        pointers = [layer.keys.data_ptr() for layer in cache.layers]
        assert all(layer.keys.dtype == torch.float32 and not layer.keys.any() for layer in cache.layers)
        logits = [model(ids[:, :9], cache=cache, use_cache=True).logits]
        logits.append(model(ids[:, 9:12], cache=cache, use_cache=True).logits)
        for step in range(12, 16):
            logits.append(model(ids[:, step : step + 1], cache=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=1e-5, atol=1e-5)
        assert [layer.keys.data_ptr() for layer in cache.layers] == pointers
        assert int(cache.get_seq_length()) == 16
        cache.crop(-4)  # keep 12 of 16
        redo = model(ids[:, 12:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(redo, expected[:, 12:], rtol=1e-5, atol=1e-5)
        cache.reset()  # the same buffers serve a new prompt
        again = model(ids[:, :5], cache=cache, use_cache=True).logits
        torch.testing.assert_close(again, expected[:, :5], rtol=1e-5, atol=1e-5)
        assert [layer.keys.data_ptr() for layer in cache.layers] == pointers


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_static_fp8_cache_matches_the_growing_fp8_cache(fp8):
    """fp8 rows and per-token scales in fixed buffers: the same logits as an fp8 M2LACache (same
    quantization), also when the buffers are allocated up front, and the same bytes held."""
    model = tiny_hf.build("qwen3", 6, 2, 12)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        growing = m2la.M2LACache.for_model(model, fp8)
        expected = [model(ids[:, :10], cache=growing, use_cache=True).logits]
        expected += [model(ids[:, i : i + 1], cache=growing, use_cache=True).logits for i in range(10, 13)]
        for batch_size in (None, 2):
            static = m2la.M2LAStaticCache.for_model(model, 16, batch_size=batch_size, dtype=fp8)
            got = [model(ids[:, :10], cache=static, use_cache=True).logits]
            got += [model(ids[:, i : i + 1], cache=static, use_cache=True).logits for i in range(10, 13)]
            for want, have in zip(expected, got, strict=True):
                torch.testing.assert_close(have, want, rtol=0, atol=0)
            assert static.nbytes == growing.nbytes == 2 * 13 * sum(w + 4 for w in _cache_widths(model))
            assert all(layer.keys.dtype == fp8 and layer.values.shape == (2, 16, 1) for layer in static.layers)


def test_static_cache_errors():
    model = tiny_hf.build("llama")
    with pytest.raises(ValueError, match="no m2la attention layers"):
        m2la.M2LAStaticCache.for_model(model, 8)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 5))
    with torch.no_grad():
        dense = tf.StaticCache(config=model.config, max_cache_len=8)
        model(ids, cache=dense, use_cache=True)
    m2la.convert(model)
    with pytest.raises(ValueError, match="max_cache_len must be positive"):
        m2la.M2LAStaticCache(2, 0)
    with pytest.raises(ValueError, match="latent cache dtype"):
        m2la.M2LAStaticCache(2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        with pytest.raises(TypeError, match="decompressed keys/values"):
            model(ids, cache=dense)  # a filled transformers StaticCache
        cache = m2la.M2LAStaticCache.for_model(model, 6)
        model(ids, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="holds 5 of 6 tokens and cannot take 2 more"):
            model(ids[:, :2], cache=cache, use_cache=True)
        assert int(cache.get_seq_length()) == 5  # the refused call wrote nothing
        with pytest.raises(ValueError, match=r"layer 0 caches \[b=2, width=\d+\] rows, got \[b=1"):
            model(ids[:1, :1], cache=cache, use_cache=True)
        with pytest.raises(TypeError, match="M2LAStaticCache stores latent rows"):
            cache.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), 0)
        layer = hf.StaticLatentLayer(4)
        with pytest.raises(ValueError, match=r"take rows \[b, t, width\]"):
            layer.lazy_initialization(torch.zeros(2, 1, 0, 4), torch.zeros(2, 1, 0, 4))  # early_initialization's shapes
