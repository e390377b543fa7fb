"""The Triton backend inside a converted transformers model (CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")
import m2la  # noqa: E402
import tiny_hf  # noqa: E402
from m2la.attention_math import causal_window_starts  # noqa: E402
from m2la.backends import use_backend  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_same_tokens_as_reference(family):
    model = tiny_hf.build(family, 3, 1, 16)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding exercises kv_start in decode and per-sequence prefill
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with use_backend("reference"):
        expected = model.generate(**kwargs)
    with use_backend("triton"):
        got = model.generate(**kwargs)
    assert torch.equal(got, expected)


def test_triton_logits_match_reference():
    model = tiny_hf.build("qwen2", 6, 2, 12)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 11), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with use_backend("reference"):
            expected = model(ids).logits
        with use_backend("triton"):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_triton_refuses_masks_it_cannot_express():
    model = tiny_hf.build("mistral", 3, 1, 16)  # sliding window of 5
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (1, 9))
    with use_backend("triton"), pytest.raises(ValueError, match="causal masks with left padding only"):
        model(ids)


def test_causal_window_starts():
    dev = torch.device("cpu")
    assert causal_window_starts(None, 2, 3, 7, dev).tolist() == [0, 0]
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert causal_window_starts(pad, 2, 5, 5, dev).tolist() == [2, 0]
    assert causal_window_starts(pad, 2, 1, 5, dev).tolist() == [2, 0]
    holes = torch.tensor([[1, 0, 1, 1, 1]])
    assert causal_window_starts(holes, 1, 1, 5, dev) is None
    window = torch.ones(4, 4, dtype=torch.bool).tril() & ~torch.ones(4, 4, dtype=torch.bool).tril(-2)
    assert causal_window_starts(window[None, None], 1, 4, 4, dev) is None  # 4-D: a full mask, not padding


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp8_cache_generate_same_tokens_as_reference(family):
    """With an fp8 M2LACache the Triton path reads the stored fp8 rows and scales (the reference
    path dequantizes them): same tokens, and logits equal to fp32 rounding."""
    model = tiny_hf.build(family, 3, 1, 16)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    results = {}
    for backend in ("reference", "triton"):
        with use_backend(backend), torch.no_grad():
            cache = m2la.M2LACache.for_model(model, torch.float8_e4m3fn)
            tokens = model.generate(**kwargs, cache=cache)
            logits = model(ids, attention_mask=mask, cache=m2la.M2LACache.for_model(model, torch.float8_e4m3fn)).logits
            results[backend] = tokens, logits
    assert torch.equal(results["triton"][0], results["reference"][0])
    keep = mask.bool()
    torch.testing.assert_close(results["triton"][1][keep], results["reference"][1][keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["fp32-cache", "fp8-cache"])
def test_compiled_converted_model_runs_the_kernels(cache_dtype, monkeypatch):
    """torch.compile of a whole converted model (aot_eager: dynamo + AOT autograd, no C++ compiler
    needed): under the Triton backend the compiled prefill and decode steps call the Triton kernels
    (custom ops, opaque to the compiler) and give the eager model's logits."""
    import m2la.kernels.latent_decode.triton as decode_module
    import m2la.kernels.latent_prefill.triton as prefill_module

    calls = []
    for module, name in ((decode_module, "latent_decode_triton"), (prefill_module, "latent_prefill_triton")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    model = tiny_hf.build("qwen3", 6, 2, 12)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(10, tiny_hf.VOCAB, (2, 2), generator=torch.Generator().manual_seed(1))

    def run(forward):
        cache = m2la.M2LACache.for_model(model, cache_dtype)
        logits = [forward(input_ids=ids, cache=cache, use_cache=True).logits]
        logits += [forward(input_ids=steps[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(2)]
        return logits

    with torch.no_grad(), use_backend("triton"):
        eager = run(model)
        eager_calls, calls[:] = list(calls), []
        compiled = run(torch.compile(model, backend="aot_eager"))
    layers = model.config.num_hidden_layers
    assert sorted(eager_calls) == sorted(calls) == sorted(
        ["latent_prefill_triton"] * layers + ["latent_decode_triton"] * 2 * layers
    )
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
