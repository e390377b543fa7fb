"""The Triton backend inside a converted transformers model (CPU, TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
pytest.importorskip("transformers")
from kernel_cases import module_errors_vs_fp32, random_layer, record_calls  # noqa: E402

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


@pytest.mark.parametrize("mode", ["flash", "decode"])
def test_lossless_prefill_and_extend_through_grouped_prefill(mode, monkeypatch):
    """A lossless conversion's prefill (left-padded) and a 5-token extend over its cache run through
    `grouped_prefill_attention` under the Triton backend, in either mode, and give the reference
    backend's logits."""
    import m2la.kernels.latent_prefill.triton as prefill_module

    calls = []
    record_calls(monkeypatch, prefill_module, "grouped_prefill_triton", calls)
    record_calls(monkeypatch, prefill_module, "latent_prefill_triton", calls)
    monkeypatch.setattr(prefill_module, "choose_grouped_prefill_mode", lambda *args: mode)
    model = tiny_hf.build("llama", 6, 2, 12)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 21), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    logits = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            with use_backend(backend):
                cache = m2la.M2LACache.for_model(model)
                first = model(ids[:, :16], attention_mask=mask[:, :16], cache=cache, use_cache=True).logits
                extend = model(ids[:, 16:], attention_mask=mask, cache=cache, use_cache=True).logits
                logits[backend] = torch.cat((first, extend), dim=1)
    assert calls == ["grouped_prefill_triton"] * 2 * model.config.num_hidden_layers
    keep = mask.bool()
    torch.testing.assert_close(logits["triton"][keep], logits["reference"][keep], rtol=1e-4, atol=1e-4)


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


def test_causal_window_starts_over_a_static_capacity():
    """A static cache's mask covers its whole capacity: with the first query's position given, the
    unfilled keys after the queries must be hidden, and the padding start is found as before."""
    dev = torch.device("cpu")
    offset = torch.tensor(3)  # 2 queries at keys 3 and 4 of a capacity of 7
    causal = (torch.arange(7)[None] <= (offset + torch.arange(2))[:, None])[None, None]  # [1, 1, t, s]
    padding = torch.tensor([[False, True] + [True] * 5, [True] * 7])[:, None, None]  # sequence 0 starts at 1
    assert causal_window_starts(causal & padding, 2, 2, 7, dev, offset).tolist() == [1, 0]
    assert causal_window_starts(causal, 2, 2, 7, dev, offset).tolist() == [0, 0]
    assert causal_window_starts(causal, 2, 2, 7, dev) is None  # read as "queries last" it is not causal
    sees_unfilled = causal.clone()
    sees_unfilled[..., 1, 6] = True
    assert causal_window_starts(sees_unfilled, 2, 2, 7, dev, offset) is None


def test_causal_window_starts_checks_each_mask_once(monkeypatch):
    """Every layer of a forward passes the same mask: its check (two device syncs) runs once, again
    after the mask changes in place or for other shapes, and every call for inference tensors."""
    from m2la import attention_math

    checks = []
    record_calls(monkeypatch, attention_math, "_check_causal_window", checks)
    dev = torch.device("cpu")
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for _ in range(3):
        assert causal_window_starts(pad, 2, 1, 5, dev).tolist() == [2, 0]
    assert len(checks) == 1
    pad[1, 0] = 0  # in place: a new version
    assert causal_window_starts(pad, 2, 1, 5, dev).tolist() == [2, 1]
    assert causal_window_starts(pad, 2, 5, 5, dev).tolist() == [2, 1]  # other shapes
    assert causal_window_starts(pad.clone(), 2, 5, 5, dev).tolist() == [2, 1]  # another tensor
    assert len(checks) == 4
    with torch.inference_mode():
        frozen = pad.clone()
    assert [causal_window_starts(frozen, 2, 1, 5, dev).tolist() for _ in range(2)] == [[2, 1]] * 2
    assert len(checks) == 6
    holes = torch.tensor([[1, 0, 1, 1, 1]])
    assert causal_window_starts(holes, 1, 1, 5, dev) is None and causal_window_starts(holes, 1, 1, 5, dev) is None
    assert len(checks) == 7  # a refusal is remembered too


def test_causal_window_check_traces_without_graph_breaks():
    """Under torch.compile the memo (weak reference, version counter, module state) is skipped and
    the check asserts on the device instead of branching on the host: no graph break."""
    torch._dynamo.reset()
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    args = (pad, 2, 1, 5, torch.device("cpu"))
    explained = torch._dynamo.explain(lambda *a: causal_window_starts(*a) + 1)(*args)  # traced code after the check
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


def test_padding_mask_checked_once_per_forward(monkeypatch):
    """A converted model's layers share the host's mask, so one forward checks it once, not once a
    layer (each check syncs the device twice)."""
    from m2la import attention_math

    model = tiny_hf.build("llama", 3, 1, 16)
    m2la.convert(model)
    checks = []
    record_calls(monkeypatch, attention_math, "_check_causal_window", checks)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad(), use_backend("triton"):
        model(input_ids=ids, attention_mask=mask)
    assert model.config.num_hidden_layers >= 2 and len(checks) == 1


def test_static_cache_layers_share_one_mask_check_per_forward(monkeypatch):
    """Eager layers over an M2LAStaticCache each slice the capacity-wide mask to the filled rows (a
    new view each layer): still one check a forward, not one a layer, and the right logits."""
    from m2la import attention_math

    model = tiny_hf.build("llama", 3, 1, 16)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        m2la.convert(model)
        want = model(input_ids=ids, attention_mask=mask).logits
        checks = []
        record_calls(monkeypatch, attention_math, "_check_causal_window", checks)
        cache = m2la.M2LAStaticCache.for_model(model, 12, batch_size=2)
        with use_backend("triton"):
            got = [model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True).logits]
            assert len(checks) == 1
            got.append(model(input_ids=ids[:, 6:], attention_mask=mask, cache=cache, use_cache=True).logits)
    assert model.config.num_hidden_layers >= 2 and len(checks) == 2
    torch.testing.assert_close(torch.cat(got, dim=1)[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "family, compression",
    [("llama", 2.0), ("qwen3", 3.0), ("qwen2_5_vl", 2.0), ("qwen3_vl", None)],
    ids=["llama-2x", "qwen3-3x", "qwen2.5-vl-2x", "qwen3-vl-lossless"],
)
def test_compressed_and_vision_models_match_reference(family, compression):
    """The layouts the other model tests leave out, through the Triton kernels: a compressed
    conversion (per-layer ranks and RoPE widths that are no power of two, a no-RoPE key part, the
    value mean as a kv_b bias) and the VL families (M-RoPE positions from an image). Logits and
    generated tokens equal the reference backend's; an fp8 cache too, for the text model."""
    vision = family.endswith("_vl")
    model = tiny_hf.build(family, 7 if not vision else 4, 7 if not vision else 2, 12 if not vision else 16)
    if vision:
        inputs = tiny_hf.image_inputs(model, batch=2)
    else:
        ids = torch.randint(10, tiny_hf.VOCAB, (2, 13), generator=torch.Generator().manual_seed(9))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        inputs = dict(input_ids=ids, attention_mask=mask)
    if compression is None:
        m2la.convert(model)
    else:
        if vision:
            batches = [tiny_hf.image_inputs(model, batch=2) for _ in range(2)]
        else:
            batches = [
                torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)
            ]
        report = m2la.convert(model, compression=compression, calibration=batches, pair_grid_points=4)
        layouts = [(layer.kv_rank, layer.rope_dim) for layer in report.layers]
        attn = [m for m in model.modules() if isinstance(m, m2la.M2LAttention)]
        assert all(m.config.qk_nope_dim > 0 and m.kv_b_proj.bias is not None for m in attn)
        assert any(w & (w - 1) for layout in layouts for w in layout), layouts  # a width no power of two
        if family == "llama":  # per-layer budgets, not one layout for all
            assert len(set(layouts)) > 1, layouts
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cache_dtypes = [None] if vision else [None, torch.float8_e4m3fn]
    results = {}
    for backend in ("reference", "triton"):
        with use_backend(backend), torch.no_grad():
            logits = model(**inputs).logits
            tokens = [
                model.generate(**inputs, **kwargs, cache=m2la.M2LACache.for_model(model, dt)) for dt in cache_dtypes
            ]
            results[backend] = logits, tokens
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(results["triton"][0][keep], results["reference"][0][keep], rtol=1e-4, atol=1e-4)
    for got, expected in zip(results["triton"][1], results["reference"][1], strict=True):
        assert torch.equal(got, expected)


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


@pytest.mark.parametrize("layers_kind", ["grouped", "grouped-unpinned", "plain"])
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["fp32-cache", "fp8-cache"])
def test_compiled_converted_model_runs_the_kernels(cache_dtype, layers_kind, monkeypatch):
    """torch.compile of a whole converted model (aot_eager: dynamo + AOT autograd, no C++ compiler
    needed): under the Triton backend the compiled prefill and decode steps call the Triton kernels
    (custom ops, opaque to the compiler; the cache write mutates the cache in place) and give the
    eager model's logits. A lossless conversion prefills and decodes through the grouped kernels
    eagerly, and compiled once `pin_head_groups` pinned it (else through the plain ones there); with
    its query map moved off the group blocks, through the plain ones in both."""
    import m2la.kernels.cache_write.triton as write_module
    import m2la.kernels.latent_decode.triton as decode_module
    import m2la.kernels.latent_prefill.triton as prefill_module

    torch._dynamo.reset()  # else earlier cases' recompiles may reach dynamo's limit and run frames eagerly
    calls = []
    record_calls(monkeypatch, decode_module, "latent_decode_triton", calls)
    record_calls(monkeypatch, decode_module, "grouped_decode_triton", calls)
    record_calls(monkeypatch, prefill_module, "latent_prefill_triton", calls)
    record_calls(monkeypatch, prefill_module, "grouped_prefill_triton", calls)
    record_calls(monkeypatch, write_module, "write_latent_cache_triton", calls)
    model = tiny_hf.build("qwen3", 6, 2, 12)
    m2la.convert(model)
    if layers_kind == "plain":
        with torch.no_grad():
            for attention in model.modules():
                if isinstance(attention, m2la.M2LAttention):
                    attention.q_up.add_(1e-3 * torch.randn_like(attention.q_up))
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(10, tiny_hf.VOCAB, (2, 2), generator=torch.Generator().manual_seed(1))

    def run(forward):
        cache = m2la.M2LACache.for_model(model, cache_dtype)
        logits = [forward(input_ids=ids, cache=cache, use_cache=True).logits]
        logits += [forward(input_ids=steps[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(2)]
        return logits

    with torch.no_grad(), use_backend("triton"):
        if layers_kind != "grouped-unpinned":
            assert m2la.pin_head_groups(model) == [0 if layers_kind == "plain" else 2] * model.config.num_hidden_layers
        compiled = run(torch.compile(model, backend="aot_eager"))  # traced code takes the pinned groups
        compiled_calls, calls[:] = list(calls), []
        eager = run(model)
        eager_calls = list(calls)
    layers = model.config.num_hidden_layers
    # one prefill, two decode steps; the fused cache write every step. The grouped prefill of 9
    # tokens a sequence at 3 heads a group takes its decode route (`choose_grouped_prefill_mode`).
    assert prefill_module.choose_grouped_prefill_mode(2 * 9, 2, 3) == "decode"
    plain = ["latent_prefill_triton"] + ["latent_decode_triton"] * 2
    grouped = ["grouped_prefill_triton", "grouped_decode_triton"] + ["grouped_decode_triton"] * 2
    writes = ["write_latent_cache_triton"] * 3 * layers
    assert sorted(eager_calls) == sorted((plain if layers_kind == "plain" else grouped) * layers + writes)
    assert sorted(compiled_calls) == sorted((grouped if layers_kind == "grouped" else plain) * layers + writes)
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["fp32-cache", "fp8-cache"])
@pytest.mark.parametrize("cache_kind", ["hf", "plain"])
def test_fused_cache_write_stores_what_the_reference_path_stores(cache_kind, cache_dtype, monkeypatch):
    """Under the Triton backend the new rows reach the cache through the fused write kernel (RoPE,
    fp8 scale and store in one pass, in place in the cache's buffer): the stored rows and scales
    equal the reference path's, prefill and decode, M2LACache and LatentCache alike."""
    import m2la.kernels.cache_write.triton as write_module

    writes = []
    record_calls(monkeypatch, write_module, "write_latent_cache_triton", writes)
    model = tiny_hf.build("qwen3", 6, 2, 12)
    m2la.convert(model)
    attention = next(m for m in model.modules() if isinstance(m, m2la.M2LAttention))
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(10, tiny_hf.VOCAB, (2, 3), generator=torch.Generator().manual_seed(5))

    def stored(backend):
        cache = m2la.M2LACache.for_model(model, cache_dtype)
        plain = m2la.LatentCache(model.config.num_hidden_layers, cache_dtype)
        hidden = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
        positions = torch.arange(7)[None].expand(2, 7)
        pointers = []
        with use_backend(backend), torch.no_grad():
            if cache_kind == "hf":
                model(input_ids=ids, cache=cache, use_cache=True)
                for i in range(3):
                    model(input_ids=steps[:, i : i + 1], cache=cache, use_cache=True)
                    pointers.append(cache.layers[0].keys.data_ptr())
                rows, scales = cache.layers[0].keys, cache.layers[0].values
            else:
                attention.attend(hidden, *attention.rope_cos_sin(positions), cache=plain)
                for i in range(3):
                    cos, sin = attention.rope_cos_sin(positions[:, :1] + 7 + i)
                    attention.attend(hidden[:, i : i + 1], cos, sin, cache=plain)
                    pointers.append(plain.rows[0].data_ptr())
                rows, scales = plain.rows[0], plain.scales[0]
        assert len(set(pointers)) == 1  # decode steps write in place
        return rows.float(), (None if scales is None else scales.float().reshape(2, -1))

    expected_rows, expected_scales = stored("reference")
    assert not writes
    got_rows, got_scales = stored("triton")
    assert writes  # the fused kernel wrote the rows
    assert got_rows.shape == expected_rows.shape == (2, 10, attention.config.cache_width)
    if cache_dtype is None:
        torch.testing.assert_close(got_rows, expected_rows, rtol=1e-5, atol=1e-5)
    else:  # same fp8 codes up to one grid step where fp32 rounding of the rotation differs
        torch.testing.assert_close(got_scales, expected_scales, rtol=1e-5, atol=0)
        torch.testing.assert_close(got_rows, expected_rows, rtol=0.07, atol=2**-9)
        assert (got_rows == expected_rows).float().mean() > 0.99


def test_fused_cache_write_is_skipped_while_autograd_records(monkeypatch):
    """The cache write kernel has no backward: while autograd records, the rows are appended in torch."""
    import m2la.kernels.cache_write.triton as write_module

    monkeypatch.setattr(write_module, "write_latent_cache_triton", lambda *a, **kw: pytest.fail("fused write ran"))
    model = tiny_hf.build("qwen2", 6, 2, 12)
    m2la.convert(model)
    attention = next(m for m in model.modules() if isinstance(m, m2la.M2LAttention))
    cache = m2la.LatentCache(model.config.num_hidden_layers)
    hidden = torch.randn(1, 5, model.config.hidden_size, requires_grad=True)
    with use_backend("triton"):
        attention.attend(hidden, *attention.rope_cos_sin(torch.arange(5)[None]), cache=cache)
    assert cache.rows[0].requires_grad and cache.seq_length(0) == 5


@pytest.mark.parametrize("batch,new_tokens,total", [(1, 1, 1), (3, 1, 17), (2, 5, 5), (4, 3, 70)])
def test_step_indices_made_once_a_step(batch, new_tokens, total):
    """The new rows' cache slots and the sequence lengths are the same for every layer of a step:
    made once (the same tensors come back for the same step shape), with the values each layer
    used to make for itself."""
    from m2la import module

    slots, seqlens = module._step_indices(batch, new_tokens, total, torch.device("cpu"))
    expected = torch.tensor([i * total + total - new_tokens + j for i in range(batch) for j in range(new_tokens)])
    assert torch.equal(slots, expected) and slots.dtype == torch.int64
    assert seqlens.tolist() == [total] * batch and seqlens.dtype == torch.int32
    again = module._step_indices(batch, new_tokens, total, "cpu")
    assert again[0] is slots and again[1] is seqlens
    other = module._step_indices(batch, new_tokens, total + 1, "cpu")
    assert other[0] is not slots and other[1].tolist() == [total + 1] * batch


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.integers(1, 7),
    rank=st.integers(1, 40),
    nope=st.integers(0, 12),
    rope_pairs=st.integers(0, 9),
    v_dim=st.integers(1, 20),
    q_rank=st.one_of(st.none(), st.integers(1, 8)),
    kv_b_bias=st.booleans(),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    padding=st.lists(st.integers(0, 4), min_size=2, max_size=2),
    cache_kind=st.sampled_from(["latent", "latent-fp8", "static"]),
    seed=st.integers(0, 2**16),
)
def test_triton_module_matches_reference_over_random_layouts(
    heads, rank, nope, rope_pairs, v_dim, q_rank, kv_b_bias, chunks, padding, cache_kind, seed
):  # fmt: skip
    """`M2LAttention.attend` under the Triton backend (fused cache write, decode for one new token,
    chunked prefill otherwise) against the reference backend, step by step over one cache: random
    layer layouts (no RoPE key, no no-RoPE part, widths no power of two, low-rank queries, a value
    bias), chunk sequences, left padding, growing fp32 or fp8 caches and a static-capacity cache."""
    if nope + 2 * rope_pairs == 0:
        nope = 1
    torch.manual_seed(seed)
    module = random_layer(heads, rank, nope, rope_pairs, v_dim, std=0.4, q_rank=q_rank, kv_b_bias=kv_b_bias)
    hidden = torch.randn(2, sum(chunks), 24)
    expected, real = attend_in_chunks(module, "reference", hidden, chunks, padding, cache_kind)
    got, _ = attend_in_chunks(module, "triton", hidden, chunks, padding, cache_kind)
    keep = real  # padding queries see no key on the Triton path (0 there); the reference gives NaN or 0
    bound = 5e-2 if cache_kind == "latent-fp8" else 2e-5  # fp32: rounding of a different summation order
    torch.testing.assert_close(got[keep], expected[keep], rtol=bound, atol=bound * float(expected[keep].abs().max()))


@pytest.mark.parametrize("nope", [0, 5])
def test_expanded_prefill_reads_kv_b_proj_in_place(nope, monkeypatch):
    """The module's expanded prefill up-projects with `kv_b_proj.weight` itself: `expansion_weight`
    finds the two views it is passed to be that weight's row blocks and makes no copy."""
    import m2la.kernels.latent_prefill.triton as prefill_module

    torch.manual_seed(nope)
    module = random_layer(3, 20, nope, 4, 6, std=0.4)
    seen = []
    real = prefill_module.expansion_weight
    monkeypatch.setattr(prefill_module, "choose_prefill_mode", lambda *args: "expanded")
    monkeypatch.setattr(prefill_module, "expansion_weight", lambda *args: seen.append(real(*args)) or seen[-1])
    hidden = torch.randn(2, 7, 24)
    got, _ = attend_in_chunks(module, "triton", hidden, [7], [0, 2], "latent")
    want, real_tokens = attend_in_chunks(module, "reference", hidden, [7], [0, 2], "latent")
    torch.testing.assert_close(got[real_tokens], want[real_tokens], rtol=2e-5, atol=2e-5)
    assert len(seen) == 1 and seen[0].data_ptr() == module.kv_b_proj.weight.data_ptr()
    assert torch.equal(seen[0], module.kv_b_proj.weight.t())


def attend_in_chunks(module, backend, hidden, chunks, padding, cache_kind) -> tuple[torch.Tensor, torch.Tensor]:
    """`module.attend` over `hidden [2, s, d]` in `chunks` of new tokens, one cache ("latent",
    "latent-fp8" or "static"), left padding of `padding` tokens a sequence (at most s - 1), under
    `backend` -> (outputs `[2, s, d]`, real-token mask `[2, s]`)."""
    total = sum(chunks)
    padding = torch.tensor(padding).clamp(max=total - 1)  # every sequence keeps a real token
    real = torch.arange(total)[None] >= padding[:, None]  # [b, s]: left padding
    cos, sin = module.rope_cos_sin((real.cumsum(-1) - 1).clamp(min=0))
    if cache_kind == "static":
        cache = m2la.StaticLatentCache(1, total)
    else:
        cache = m2la.LatentCache(1, torch.float8_e4m3fn if cache_kind == "latent-fp8" else None)
    outs, done = [], 0
    with use_backend(backend), torch.no_grad():
        for t in chunks:
            new = slice(done, done + t)
            allowed = torch.arange(done + t)[None, :] <= torch.arange(done, done + t)[:, None]  # causal [t, s]
            mask = (allowed[None] & real[:, None, : done + t])[:, None]  # [b, 1, t, s]
            if cache_kind == "static":  # transformers' layout: the mask spans the whole capacity
                mask = torch.nn.functional.pad(mask, (0, total - done - t))
            outs.append(module.attend(hidden[:, new].to(module.kv_a_proj.weight.dtype), cos[:, new], sin[:, new],
                                      mask, cache=cache))  # fmt: skip
            done += t
    return torch.cat(outs, dim=1), real


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv_heads=st.integers(1, 4),
    heads_per_group=st.integers(1, 4),
    head_dim=st.sampled_from([4, 6, 12, 16]),
    bias=st.booleans(),
    qk_norm=st.booleans(),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    padding=st.lists(st.integers(0, 4), min_size=2, max_size=2),
    cache_kind=st.sampled_from(["latent", "latent-fp8", "static"]),
    flash=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_layers_match_the_plain_path_over_random_sources(
    kv_heads, heads_per_group, head_dim, bias, qk_norm, chunks, padding, cache_kind, flash, seed
):  # fmt: skip
    """Lossless conversions of random GQA sources (1-4 KV heads, 1-4 heads a group, biases, QK-norm)
    attend through the grouped paths on both backends (Triton: grouped decode for one new token,
    grouped prefill, flash tiles or decode route, otherwise; reference: GQA over the rows) and give
    what the same layer gives through the plain paths (its `head_groups` answering 0) on the
    reference backend, chunk by chunk over one cache, with left padding and growing fp32 or fp8 or
    static caches."""
    import m2la.kernels.latent_prefill.triton as prefill_module
    from m2la.conversion import lossless_config, lossless_state_dict
    from reference_gqa import random_source

    source = random_source(24, kv_heads * heads_per_group, kv_heads, head_dim, bias=bias, qk_norm=qk_norm,
                           dtype=torch.float32, seed=seed)  # fmt: skip
    grouped = m2la.M2LAttention(lossless_config(source))
    grouped.load_state_dict(lossless_state_dict(source, grouped.config))
    assert grouped.head_groups() == kv_heads
    plain = m2la.M2LAttention(grouped.config)
    plain.load_state_dict(grouped.state_dict())
    plain.head_groups = lambda: 0  # this instance only: the plain paths
    hidden = torch.randn(2, sum(chunks), 24, generator=torch.Generator().manual_seed(seed))
    expected, real = attend_in_chunks(plain, "reference", hidden, chunks, padding, cache_kind)
    bound = 5e-2 if cache_kind == "latent-fp8" else 2e-5
    for backend in ("reference", "triton"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(prefill_module, "choose_grouped_prefill_mode", lambda *a: "flash" if flash else "decode")
            got, _ = attend_in_chunks(grouped, backend, hidden, chunks, padding, cache_kind)
        scale = float(expected[real].abs().max())
        torch.testing.assert_close(got[real], expected[real], rtol=bound, atol=bound * scale, msg=backend)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["fp32-cache", "fp8-cache"])
def test_assisted_generation_same_tokens_as_plain_greedy(cache_dtype):
    """Speculative decoding (transformers' assisted generation with a small draft model): the converted
    model verifies several draft tokens a step (short chunked extends, the prefill kernel's decode
    route) and crops its latent cache where the draft was wrong. Greedy tokens equal plain greedy
    generation on both backends."""
    main = tiny_hf.build("qwen3", 6, 2, 12)  # a random model whose greedy tokens vary
    draft = tiny_hf.build("qwen3", 6, 2, 12, layers=1)
    m2la.convert(main)
    attention = next(m for m in main.modules() if isinstance(m, m2la.M2LAttention))
    chunk_sizes = []
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: chunk_sizes.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    ids = torch.randint(10, tiny_hf.VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    kwargs = dict(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    results = {}
    for backend in ("reference", "triton"):
        with use_backend(backend), torch.no_grad():
            plain = main.generate(**kwargs, cache=m2la.M2LACache.for_model(main, cache_dtype))
            cache = m2la.M2LACache.for_model(main, cache_dtype)
            crops = []
            original_crop = cache.crop
            cache.crop = lambda length, crops=crops, crop=original_crop: (crops.append(length), crop(length))[1]
            chunk_sizes.clear()
            assisted = main.generate(**kwargs, assistant_model=draft, cache=cache)
            results[backend] = plain, assisted
            assert any(1 < t < 9 for t in chunk_sizes), chunk_sizes  # draft tokens verified as one chunk
            assert crops, "no draft token was rejected: the test would not exercise the cache crop"
    assert torch.equal(results["triton"][0], results["reference"][0])
    for plain, assisted in results.values():
        assert torch.equal(assisted, plain)


@pytest.mark.parametrize(
    "layout", [(3, 40, 12, 8, 16), (7, 24, 0, 9, 20), (1, 17, 5, 3, 9), (4, 64, 16, 0, 16)], ids=str
)
def test_fp16_module_error_within_twice_torch_fp16(layout):
    """An fp16 `M2LAttention` (heads, rank, nope, RoPE pairs, value dims) over an fp16 cache, prefill then
    decode steps then a chunk: the Triton path's error against the fp32 module is at most twice the
    same-dtype torch (reference backend) run's, FlashAttention's error budget. Measured ratios
    0.6-1.25 over eight cases."""
    torch_error, triton_error = module_errors_vs_fp32(layout, [7, 1, 1, 5], torch.float16, seed=layout[1])
    assert 0 < torch_error < 0.1 and triton_error <= 2 * torch_error, (triton_error, torch_error)
