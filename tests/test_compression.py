"""Compressed conversion: RoPE mixing, statistics streaming, budget allocation, every family, SmolLM2."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")

import m2la  # noqa: E402
import tiny_hf  # noqa: E402
from m2la import rope  # noqa: E402
from m2la.compression import allocate, fit  # noqa: E402
from m2la.compression.calibrate import AttentionCall, collect_statistics, layer_errors  # noqa: E402
from m2la.compression.driver import refit_groups  # noqa: E402
from m2la.compression.stats import LayerStatistics, RefitStatistics, accumulate, accumulate_refit, angles_cos_sin  # noqa: E402
from m2la.conversion import ConversionError  # noqa: E402
from m2la.evaluation import cache_bytes_per_token  # noqa: E402
from m2la.integrations import hf  # noqa: E402
from reference_gqa import gqa_attention, random_source  # noqa: E402

FAMILIES = tiny_hf.FAMILIES
MROPE_AXES = rope.mrope_axes_sectioned([2, 2, 2])  # 6 pairs of a 12-dim head: t, t, h, h, w, w


def _positions(batch: int, length: int, mrope: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if not mrope:
        return torch.arange(length).expand(batch, length)
    return torch.randint(0, 40, (3, batch, length), generator=g)


def _stats(src, hidden, positions, mix=0.25):
    cos, sin = angles_cos_sin(positions, src)
    return accumulate(LayerStatistics.zeros(src), src, hidden, cos, sin, uniform_mix=mix)


def _hidden(src, batch=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, src.hidden_size, generator=g, dtype=src.q_weight.dtype)


# --- RoPE mixing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", fit.METHODS)
@pytest.mark.parametrize("mrope", [False, True])
def test_head_mixing_commutes_with_rope(method, mrope):
    """Mixing KV heads per frequency (the same on both pair components) commutes with RoPE."""
    axis = MROPE_AXES if mrope else None
    src = random_source(mrope_axis=axis, dtype=torch.float64)
    positions = _positions(2, 24, mrope)
    stats = _stats(src, _hidden(src), positions)
    plan = fit.rope_plan(src, stats, method)
    G, P = src.num_kv_heads, src.rotary_dim // 2
    keys = torch.randn(2, 24, G, 2 * P, dtype=torch.float64)  # half layout per head
    cos, sin = angles_cos_sin(positions, src)
    cos, sin = cos.double()[:, :, None], sin.double()[:, :, None]

    def mix(k):  # [b, t, G, 2P] -> components [b, t, G(i), 2P]
        x, y = k[..., :P], k[..., P:]
        return torch.cat(
            (torch.einsum("fig,btgf->btif", plan.transform, x), torch.einsum("fig,btgf->btif", plan.transform, y)),
            dim=-1,
        )

    rotated_then_mixed = mix(rope.apply_rope_half(keys, cos, sin))
    mixed_then_rotated = rope.apply_rope_half(mix(keys), cos, sin)
    torch.testing.assert_close(rotated_then_mixed, mixed_then_rotated, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        plan.transform @ plan.inverse, torch.eye(G, dtype=torch.float64).expand(P, G, G), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("method", fit.METHODS)
@pytest.mark.parametrize("variant", ["plain", "bias", "qk_norm", "mrope", "mrope_qk_norm_fp32"])
def test_full_rank_compressed_layout_is_exact(method, variant):
    """Keeping every RoPE component and the full latent reproduces the source (incl. M-RoPE axes)."""
    mrope = variant.startswith("mrope")
    dtype = torch.float32 if variant.endswith("fp32") else torch.float64
    src = random_source(
        bias=variant == "bias", qk_norm="qk_norm" in variant, mrope_axis=MROPE_AXES if mrope else None, dtype=dtype
    )
    positions = _positions(2, 24, mrope)
    hidden = _hidden(src)
    stats = _stats(src, hidden, positions)
    G, D, P = src.num_kv_heads, src.head_dim, src.rotary_dim // 2
    config, state = fit.fit_layer(src, stats, kv_rank=G * D, num_pairs=G * P, method=method)
    module = m2la.M2LAttention(config).to(dtype)
    module.load_state_dict(state)
    assert config.cache_width == 2 * G * D
    assert sorted(set(config.rope_axis)) == (sorted(set(MROPE_AXES.tolist())) if mrope else [0])
    tol = 1e-4 if dtype == torch.float32 else 1e-6  # m2la mixing is not orthogonal: conditioning
    torch.testing.assert_close(module(hidden, positions), gqa_attention(src, hidden, positions), rtol=tol, atol=tol)


def test_nope_mean_rotation_sign():
    """The NoPE query map applies E[R(angle_s - angle_t)]: exact when every key sits at one angle offset."""
    src = random_source(num_heads=2, num_kv_heads=1, head_dim=4)
    stats = LayerStatistics.zeros(src)
    angle_t = torch.tensor([0.9, 2.3], dtype=torch.float64)  # fp64 throughout: the identity is exact
    angle_s = torch.tensor([0.2, -1.1], dtype=torch.float64)
    stats.tokens = torch.tensor(1.0, dtype=torch.float64)
    stats.rotation_cos = torch.cos(angle_s - angle_t).double().expand(2, 2).clone()
    stats.rotation_sin = torch.sin(angle_s - angle_t).double().expand(2, 2).clone()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g)
    source = rope.apply_rope_half(q, angle_t.cos(), angle_t.sin()) @ rope.apply_rope_half(
        k, angle_s.cos(), angle_s.sin()
    )
    q_nope = fit.nope_query_map(src, stats, "m2la")[0] @ q
    torch.testing.assert_close(q_nope @ k, source)


def test_score_sensitivity_statistic_brute_force():
    """sum over queries of sum_s p_ts^2 |u_s - u_bar_t|^2, u_s = W_o,h v_s, from explicit per-token outputs."""
    from m2la.compression.calibrate import _source_scores

    src = random_source(num_heads=6, num_kv_heads=2, head_dim=12, bias=True, dtype=torch.float64)
    positions = _positions(2, 13, False)
    hidden = _hidden(src, 2, 13)
    cos, sin = angles_cos_sin(positions, src)
    stats = _stats(src, hidden, positions)
    scores, v = _source_scores(src, AttentionCall(hidden, cos, sin))  # [b, H, t, s], [b, s, G, D] (fp32)
    scores, v = scores.double(), v.double()
    causal = torch.full((13, 13), float("-inf"), dtype=torch.float64).triu(1)
    probs = torch.softmax(scores * src.softmax_scale + causal, dim=-1)
    H, D = src.num_heads, src.head_dim
    o_heads = src.o_weight.double().unflatten(1, (H, D))  # [d, H, D]
    u = torch.einsum("dhe,bshe->bshd", o_heads, v.repeat_interleave(src.group_size, dim=2))  # [b, s, H, d]
    u_bar = torch.einsum("bhts,bshd->bhtd", probs, u)
    spread = (u[:, None].permute(0, 3, 1, 2, 4) - u_bar[:, :, :, None]).pow(2).sum(-1)  # [b, H, t, s]
    expected = (probs.pow(2) * spread).sum((0, 2, 3))
    torch.testing.assert_close(stats.score_sensitivity, expected, rtol=1e-4, atol=1e-9)


def test_mean_rotation_statistic_uniform_attention():
    src = random_source(num_heads=2, num_kv_heads=1, head_dim=4)
    positions = _positions(1, 10, False)
    stats = _stats(src, _hidden(src, 1, 10), positions, mix=1.0)  # uniform causal attention
    cos_mean, sin_mean = stats.mean_rotation
    freq = src.rope_inv_freq
    t = torch.arange(10, dtype=torch.float64)
    delta = t[None, :] - t[:, None]  # s - t
    allowed = (delta <= 0).double()
    expect_cos = ((torch.cos(delta[..., None] * freq) * allowed[..., None]).sum(1) / allowed.sum(1, keepdim=True)).mean(
        0
    )
    expect_sin = ((torch.sin(delta[..., None] * freq) * allowed[..., None]).sum(1) / allowed.sum(1, keepdim=True)).mean(
        0
    )
    torch.testing.assert_close(cos_mean[0], expect_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin_mean[1], expect_sin, rtol=1e-5, atol=1e-5)


# --- statistics ---------------------------------------------------------------------------------------


def test_batchwise_statistics_equal_one_shot():
    src = random_source(qk_norm=True, dtype=torch.float64)
    positions = _positions(4, 16, False)
    hidden = _hidden(src, 4, 16)
    cos, sin = angles_cos_sin(positions, src)
    whole = accumulate(LayerStatistics.zeros(src), src, hidden, cos, sin)
    streamed = LayerStatistics.zeros(src)
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        streamed = accumulate(streamed, src, hidden[rows], cos[rows], sin[rows])
    _assert_stats_close(streamed, whole, rtol=1e-9, atol=1e-9)


def _assert_stats_close(got, expected, **tolerance):
    """Every sum of two LayerStatistics (refit sums included) or RefitStatistics."""
    for name in type(expected).__dataclass_fields__:
        a, b = getattr(got, name), getattr(expected, name)
        if name == "refit":
            assert (a is None) == (b is None)
            if b is not None:
                _assert_stats_close(a, b, **tolerance)
        else:
            torch.testing.assert_close(a, b, **tolerance)


def test_refit_only_accumulation_equals_full_and_is_required():
    """accumulate_refit gives accumulate's refit sums exactly; fits that need them say when they are missing."""
    src = random_source(dtype=torch.float64)
    positions = _positions(2, 16, False)
    hidden = _hidden(src, 2, 16)
    cos, sin = angles_cos_sin(positions, src)
    weight = torch.ones(2, 16)
    weight[1, :5] = 0.0  # padding
    whole = accumulate(LayerStatistics.zeros(src), src, hidden, cos, sin, token_weight=weight)
    alone = accumulate_refit(RefitStatistics.zeros(src), src, hidden, cos, sin, token_weight=weight)
    _assert_stats_close(alone, whole.refit, rtol=0, atol=0)
    base = accumulate(LayerStatistics.zeros(src, refit=False), src, hidden, cos, sin, token_weight=weight)
    assert base.refit is None
    _assert_stats_close(base, dataclasses.replace(whole, refit=None), rtol=0, atol=0)
    assert sum(t.numel() * 8 for t in vars(whole.refit).values()) == RefitStatistics.layer_bytes(src)
    with pytest.raises(ConversionError, match="refit statistics"):
        fit.fit_layer(src, base, 8, 2, "m2la", key_refit=True)
    fit.fit_layer(src, base, 8, 2, "m2la", key_refit=False, value_refit="none")  # needs no refit sums


def test_refit_groups_are_consecutive_and_within_budget():
    sources = [random_source(head_dim=hd) for hd in (8, 16, 8, 8, 16)]
    sizes = [RefitStatistics.layer_bytes(s) for s in sources]
    for budget in (1e-12, sizes[0] / 2**30, (sizes[0] + sizes[2]) / 2**30, sum(sizes) / 2**30):
        groups = refit_groups(sources, budget)
        assert [i for g in groups for i in g] == list(range(5))
        for g in groups:
            assert len(g) == 1 or sum(sizes[i] for i in g) <= budget * 2**30
    assert refit_groups(sources, sum(sizes) / 2**30) == [list(range(5))]
    assert refit_groups(sources, 1e-12) == [[i] for i in range(5)]


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2_vl"])
def test_grouped_refit_passes_equal_one_pass_conversion(family):
    """Refit sums gathered layer by layer (forwards stopped early, original model) convert exactly as one pass."""
    base = tiny_hf.build(family, 6, 2, 16, layers=3)
    batches = [_family_inputs(base, family, seed) for seed in range(3)]
    models, reports = [], []
    for memory in (1.0, 1e-12):  # all layers at once; one layer per group
        model = copy.deepcopy(base)
        reports.append(
            m2la.convert(model, compression=2.0, calibration=batches, pair_grid_points=4, refit_memory_gib=memory)
        )
        models.append(model)
    one, grouped = (dict(m.state_dict()) for m in models)
    assert one.keys() == grouped.keys()
    for name in one:
        torch.testing.assert_close(grouped[name], one[name], rtol=0, atol=0, msg=name)
    assert [layer.output_error for layer in reports[1].layers] == [layer.output_error for layer in reports[0].layers]


def _hf_harness(model):
    _, decoder, sources, scaling, pairs = hf._sources(model)

    def extract(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return AttentionCall(
            kwargs["hidden_states"],
            cos[..., :pairs] / scaling,
            sin[..., :pairs] / scaling,
            kwargs.get("attention_mask"),
        )

    return decoder, sources, extract


def test_layer_streaming_statistics_equal_one_shot_pass():
    """Layer i's statistics from forwards stopped at layer i equal those of one full pass over all layers."""
    model = tiny_hf.build("qwen2", 6, 2, 16)
    decoder, sources, extract = _hf_harness(model)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(10, tiny_hf.VOCAB, (2, 12), generator=g) for _ in range(3)]
    targets = {i: (layer.self_attn, src) for i, (layer, src) in enumerate(zip(decoder.layers, sources, strict=True))}
    with torch.no_grad():
        one_shot, _ = collect_statistics(lambda ids: model(ids, use_cache=False), batches, targets, extract)
        for i in targets:
            streamed, _ = collect_statistics(
                lambda ids: model(ids, use_cache=False), batches, {i: targets[i]}, extract, stop_after=i
            )
            _assert_stats_close(streamed[i], one_shot[i])


# --- budget -------------------------------------------------------------------------------------------


def test_allocation_meets_budget_exactly():
    g = torch.Generator().manual_seed(0)
    curves = []
    for _ in range(7):
        costs = torch.rand(48, generator=g, dtype=torch.float64).sort(descending=True).values
        spectra = {
            p: torch.rand(2 * (48 - p) + 96, generator=g, dtype=torch.float64).sort(descending=True).values
            for p in range(0, 49, 6)
        }
        curves.append(allocate.LayerCurve(pair_costs=costs, spectra=spectra, value_dims=96))
    full = 7 * 192
    for ratio in (1.3, 2.0, 3.0, 4.0, 7.0):
        budget = allocate.width_budget([192] * 7, ratio)
        choices = allocate.allocate_budget(curves, budget)
        total = sum(c.width for c in choices)
        assert total <= budget and budget - total < 2, (ratio, total, budget)
        assert all(c.kv_rank % 8 == 0 and c.kv_rank >= 8 for c in choices)
        assert full / total >= ratio
    with pytest.raises(ConversionError, match="ask for less compression"):
        allocate.allocate_budget(curves, 7 * 7)


@pytest.mark.parametrize("ratio", [1.7, 2.0, 3.0])
def test_convert_meets_bytes_target(ratio):
    model = tiny_hf.build("llama", 6, 2, 16)
    batches = [torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = m2la.convert(model, compression=ratio, calibration=batches, pair_grid_points=4)
    budget_values = math.floor(report.bytes_per_token_before / 4 / ratio)
    after_values = report.bytes_per_token_after // 4
    assert after_values <= budget_values and budget_values - after_values < 2
    assert report.compression_ratio >= ratio and not report.lossless and report.method == "m2la"
    assert all(layer.kv_rank % 8 == 0 for layer in report.layers)
    ids = batches[0][:1]
    assert cache_bytes_per_token(model, ids) == report.bytes_per_token_after


# --- every family -------------------------------------------------------------------------------------


def _family_inputs(model, family, seed):
    if family.endswith("_vl"):
        return tiny_hf.image_inputs(model, batch=2)
    return dict(input_ids=torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_error_falls_with_rank(family):
    base = tiny_hf.build(family, 6, 2, 16)
    batches = [_family_inputs(base, family, seed) for seed in range(3)]
    test_inputs = _family_inputs(base, family, 99)
    with torch.no_grad():
        expected = base(**test_inputs).logits
    errors = []
    for rank, rope_dim in ((8, 16), (24, 16), (32, 32)):  # all 16 pairs kept, latent = the 32 values: exact
        model = copy.deepcopy(base)
        report = m2la.convert(model, kv_rank=rank, rope_dim=rope_dim, calibration=batches)
        assert [layer.kv_rank for layer in report.layers] == [rank] * 2
        with torch.no_grad():
            got = model(**test_inputs).logits
        errors.append(float((got - expected).norm() / expected.norm()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-4


def test_qwen3_qk_norm_compression_does_not_collapse():
    base = tiny_hf.build("qwen3", 6, 2, 16)
    batches = [_family_inputs(base, "qwen3", seed) for seed in range(4)]
    test_inputs = _family_inputs(base, "qwen3", 99)
    with torch.no_grad():
        expected = base(**test_inputs).logits
    errors = {}
    for method in ("m2la", "transmla"):
        model = copy.deepcopy(base)
        report = m2la.convert(model, compression=2.0, calibration=batches, method=method, pair_grid_points=4)
        assert all(layer.output_error is not None and layer.output_error < 1.0 for layer in report.layers)
        with torch.no_grad():
            got = model(**test_inputs).logits
        assert torch.isfinite(got).all()
        errors[method] = float((got - expected).norm() / expected.norm())
    assert errors["m2la"] < 0.6 and errors["m2la"] < errors["transmla"], errors


def test_compressed_generate_uses_latent_cache():
    model = tiny_hf.build("qwen2_vl", 6, 2, 16)
    batches = [_family_inputs(model, "qwen2_vl", seed) for seed in range(2)]
    report = m2la.convert(model, compression=2.0, calibration=batches, method="care")
    inputs = tiny_hf.image_inputs(model, batch=1)
    cache = m2la.M2LACache(2)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache=cache)
    assert cache.nbytes == (out.shape[1] - 1) * report.bytes_per_token_after


def test_compressed_decode_matches_prefill():
    model = tiny_hf.build("llama", 6, 2, 16)
    batches = [_family_inputs(model, "llama", seed) for seed in range(2)]
    m2la.convert(model, compression=2.5, calibration=batches)
    ids = _family_inputs(model, "llama", 7)["input_ids"]
    with torch.no_grad():  # absorbed decode over the latent cache == expanded prefill
        full = model(ids).logits[:, -1]
        step = model(ids[:, :-1], use_cache=True)
        last = model(ids[:, -1:], cache=step.cache).logits[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-4)


def _fitted_layer(length: int, kv_rank: int, num_pairs: int):
    """A random fp32 source layer fitted on one sequence -> (src, module, hidden, cos, sin)."""
    src = random_source(dtype=torch.float32)
    positions = _positions(1, length, False)
    hidden = _hidden(src, 1, length)
    config, state = fit.fit_layer(src, _stats(src, hidden, positions), kv_rank=kv_rank, num_pairs=num_pairs)
    module = m2la.M2LAttention(config)
    module.load_state_dict(state)
    cos, sin = angles_cos_sin(positions, src)
    return src, module, hidden, cos, sin


def test_layer_errors_zero_for_exact_layer():
    src, module, hidden, cos, sin = _fitted_layer(10, kv_rank=24, num_pairs=12)
    errors = layer_errors(src, module, AttentionCall(hidden, cos, sin))
    assert max(errors) < 1e-5


# --- errors -------------------------------------------------------------------------------------------


def test_clear_errors():
    model = tiny_hf.build("llama", 6, 2, 16)
    batches = [torch.randint(10, tiny_hf.VOCAB, (1, 8)) for _ in range(2)]
    with pytest.raises(ConversionError, match="unknown compression method"):
        m2la.convert(model, compression=2.0, calibration=batches, method="svd")
    with pytest.raises(ConversionError, match="ask for less compression"):
        m2la.convert(model, compression=50.0, calibration=batches)
    with pytest.raises(ConversionError, match="compression must be"):
        m2la.convert(model, compression=0.5, calibration=batches)
    with pytest.raises(ConversionError, match="kv_rank 500 out of range"):
        m2la.convert(model, kv_rank=500, calibration=batches)
    with pytest.raises(ConversionError, match="rope_dim alone"):
        m2la.convert(model, rope_dim=8, calibration=batches)
    with pytest.raises(ConversionError, match="needs calibration data"):
        m2la.convert(model, compression=2.0)
    with pytest.raises(ConversionError, match="only apply to a compressed conversion"):
        m2la.convert(model, calibration=batches)
    with pytest.raises(ConversionError, match="unknown compression option"):
        m2la.convert(model, compression=2.0, calibration=batches, colour="red")
    assert not any(isinstance(m, m2la.M2LAttention) for m in model.modules())  # failures leave it untouched


# --- real model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_2x_perplexity_bound(smollm2, wiki_heldout_windows):
    """Real SmolLM2-135M at 2x (120 latent + 72 RoPE dims per layer vs 384): perplexity stays bounded.

    The benchmark (benchmarks/quality_smollm2.py, 16 x 512 calibration tokens, budget allocation) measures
    1.21x the original perplexity at 2x; this quick check uses 5 x 128 tokens and a fixed split.
    """
    from m2la.assets import wiki_split
    from m2la.evaluation import perplexity, token_windows

    original, tokenizer = smollm2
    model = copy.deepcopy(original)
    calibration = token_windows(tokenizer, wiki_split("calibration"), 128, 5)
    batches = [calibration[:4], calibration[4:]]
    windows = wiki_heldout_windows[:1, :256]
    base = perplexity(original, windows)
    report = m2la.convert(model, kv_rank=120, rope_dim=72, calibration=batches)
    assert report.bytes_per_token_after * 2 == report.bytes_per_token_before
    assert all(layer.output_error < 0.6 for layer in report.layers)
    assert perplexity(model, windows) < 1.8 * base


def test_compressed_save_load_round_trip(tmp_path):
    model = tiny_hf.build("qwen3", 6, 2, 16)
    batches = [_family_inputs(model, "qwen3", seed) for seed in range(2)]
    report = m2la.convert(model, compression=2.0, calibration=batches, pair_grid_points=4)
    m2la.save_pretrained(model, tmp_path / "tiny", report=report)
    loaded = m2la.from_pretrained(tmp_path / "tiny")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert [m.config.cache_width for m in loaded.modules() if isinstance(m, m2la.M2LAttention)] == [
        layer.kv_rank + layer.rope_dim for layer in report.layers
    ]


# --- errors split into text and vision tokens (VLMs) -----------------------------------------------------

SPLIT = (
    "key_error_text",
    "key_error_vision",
    "value_error_text",
    "value_error_vision",
    "output_error_text",
    "output_error_vision",
)


def _vl_batches(model):
    """Three image batches of different layouts; the last one is held out for the error report."""
    return [
        tiny_hf.image_inputs(model, batch=2),
        tiny_hf.image_inputs(model, batch=2, text_before=5),
        tiny_hf.image_inputs(model, batch=2, grid_h=4, grid_w=4, text_before=2, text_after=6),
    ]


@pytest.mark.parametrize("family,sequential", [("qwen2_vl", False), ("qwen3_vl", False), ("qwen3_vl", True)])
def test_vlm_report_splits_errors_into_text_and_vision_tokens(family, sequential, tmp_path):
    import json

    model = tiny_hf.build(family, 6, 2, 16)
    report = m2la.convert(
        model, compression=2.0, calibration=_vl_batches(model), pair_grid_points=4, sequential=sequential
    )
    assert report.has_token_split
    for layer in report.layers:
        for kind in ("key", "value", "output"):
            overall, text, vision = (getattr(layer, f"{kind}_error{suffix}") for suffix in ("", "_text", "_vision"))
            assert all(x is not None and math.isfinite(x) and x > 0 for x in (overall, text, vision)), (kind, layer)
            # the overall error is an energy-weighted mean of the two (squared): it lies between them
            assert min(text, vision) * (1 - 1e-6) <= overall <= max(text, vision) * (1 + 1e-6), (kind, layer)
    table = report.to_table()
    assert "key vis" in table and "out txt" in table
    report.save_json(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())["layers"]
    for layer, data in zip(report.layers, saved, strict=True):
        assert {name: data[name] for name in SPLIT} == {name: getattr(layer, name) for name in SPLIT}


def test_text_only_report_has_no_token_split():
    model = tiny_hf.build("qwen3", 6, 2, 16)
    batches = [_family_inputs(model, "qwen3", seed) for seed in range(2)]
    report = m2la.convert(model, compression=2.0, calibration=batches, pair_grid_points=4)
    assert not report.has_token_split
    assert all(getattr(layer, name) is None for layer in report.layers for name in SPLIT)
    assert all(layer.output_error is not None for layer in report.layers)
    assert "vis" not in report.to_table()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_vlm_split_errors_match_an_independent_computation(family):
    """Recompute the held-out errors from the transformers attention modules themselves.

    The held-out call is captured on an unconverted copy (first sequence of the last batch, as the
    report uses); vision tokens are the fixture's image placeholder ids. Output errors are compared
    directly (original HF attention vs the converted layer on the same inputs). For keys and values the
    reference energies of text and vision tokens, computed here from q/k/v projections, RoPE and QK-norm,
    must combine the reported split errors into the reported overall error.
    """
    base = tiny_hf.build(family, 6, 2, 16)
    model = copy.deepcopy(base)
    batches = _vl_batches(base)
    report = m2la.convert(model, kv_rank=8, rope_dim=8, calibration=batches)

    captured = {}
    decoder = hf._decoder(base)

    def capture(idx):
        def hook(module, args, kwargs):
            captured[idx] = kwargs

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(capture(i), with_kwargs=True)
        for i, layer in enumerate(decoder.layers)
    ]
    with torch.no_grad():
        base(**batches[-1], use_cache=False)
    for handle in handles:
        handle.remove()
    ids = batches[-1]["input_ids"][0]
    vision = ids == tiny_hf.IMAGE_TOKEN
    assert 0 < int(vision.sum()) < ids.numel()
    converted = hf._decoder(model).layers

    def relative(error, reference, select):
        return float(error[select].norm() / reference[select].norm())

    for i, layer in enumerate(decoder.layers):
        kwargs = captured[i]
        hidden = kwargs["hidden_states"][:1]
        cos, sin = (x[:1] for x in kwargs["position_embeddings"])
        mask = kwargs.get("attention_mask")
        mask = mask[:1] if isinstance(mask, torch.Tensor) else mask
        call = dict(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=mask)
        attn = layer.self_attn
        with torch.no_grad():
            reference = attn(**call)[0][0]  # [t, d]
            got = converted[i].self_attn(**call)[0][0]
        r = report.layers[i]
        error = got - reference
        assert r.output_error_vision == pytest.approx(relative(error, reference, vision), rel=1e-3)
        assert r.output_error_text == pytest.approx(relative(error, reference, ~vision), rel=1e-3)
        assert r.output_error == pytest.approx(float(error.norm() / reference.norm()), rel=1e-3)

        # reference energies of values and of causal attention logits, by token type (of the key)
        with torch.no_grad():
            t, D = hidden.shape[1], attn.head_dim
            q = attn.q_proj(hidden[0]).unflatten(-1, (-1, D))  # [t, H, D]
            k = attn.k_proj(hidden[0]).unflatten(-1, (-1, D))  # [t, G, D]
            v = attn.v_proj(hidden[0]).unflatten(-1, (-1, D))
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            c, s = cos[0][:, None], sin[0][:, None]
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = torch.einsum("thd,shd->hts", q, k)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
        score_energy = [float(scores[:, causal & keys[None, :]].pow(2).sum()) for keys in (~vision, vision)]
        value_energy = [float(v[keys].pow(2).sum()) for keys in (~vision, vision)]
        for kind, energy in (("key", score_energy), ("value", value_energy)):
            text, vis, overall = (getattr(r, f"{kind}_error{suffix}") for suffix in ("_text", "_vision", ""))
            combined = math.sqrt((text**2 * energy[0] + vis**2 * energy[1]) / sum(energy))
            assert overall == pytest.approx(combined, rel=1e-3), (kind, i)
            assert abs(text - vis) > 1e-3 * overall  # the identity would hold trivially for equal splits


def test_layer_error_split_by_token_selection():
    """Per-token value errors: the vision split equals the overall error on a call of only vision tokens."""
    src, module, hidden, cos, sin = _fitted_layer(12, kv_rank=8, num_pairs=4)
    vision = torch.zeros(1, 12, dtype=torch.bool)
    vision[0, 3:8] = True
    from m2la.compression import measure_layer_errors

    split = measure_layer_errors(src, module, AttentionCall(hidden, cos, sin, vision=vision))
    plain = measure_layer_errors(src, module, AttentionCall(hidden, cos, sin))
    assert (split.key, split.value, split.output) == (plain.key, plain.value, plain.output)
    assert plain.key_text is plain.value_vision is plain.output_text is None
    for select, got in ((vision[0], split.value_vision), (~vision[0], split.value_text)):
        sub = measure_layer_errors(src, module, AttentionCall(hidden[:, select], cos[:, select], sin[:, select]))
        assert got == pytest.approx(sub.value, rel=1e-5)
    # causal: the output of the first text tokens (before any vision token) depends only on them
    prefix = measure_layer_errors(src, module, AttentionCall(hidden[:, :3], cos[:, :3], sin[:, :3]))
    head = measure_layer_errors(src, module, AttentionCall(hidden, cos, sin, vision=~torch.arange(12).lt(3)[None]))
    assert head.output_text == pytest.approx(prefix.output, rel=1e-5)
    assert head.key_text != pytest.approx(prefix.key, rel=1e-3)  # keys of text tokens are also scored by later queries
    everything = measure_layer_errors(
        src, module, AttentionCall(hidden, cos, sin, vision=torch.ones(1, 12, dtype=torch.bool))
    )
    assert everything.output_vision == everything.output and everything.output_text is None


def test_default_key_weight_schedule():
    from m2la.compression import default_key_weight

    assert default_key_weight(2.0) == default_key_weight(4.0) == 5.0
    assert default_key_weight(8.0) == default_key_weight(16.0) == 3.0
    assert default_key_weight(4.0) > default_key_weight(5.6) > default_key_weight(8.0)


@pytest.mark.parametrize("ratio,expected", [(2.0, 5.0), (8.0, 3.0)])
def test_convert_resolves_key_weight_from_the_ratio(ratio, expected):
    """key_weight=None converts exactly like the scheduled value, and differently from another one."""
    batches = [torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def weights(**options):
        torch.manual_seed(0)
        model = tiny_hf.build("llama", 6, 2, 16)
        m2la.convert(model, compression=ratio, calibration=batches, pair_grid_points=4, **options)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    scheduled = weights()
    assert torch.equal(scheduled, weights(key_weight=expected))
    assert not torch.equal(scheduled, weights(key_weight=expected + 4.0))


def test_explicit_ranks_schedule_key_weight_from_the_ratio_they_give():
    batches = [torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def weights(**options):
        torch.manual_seed(0)
        model = tiny_hf.build("llama", 6, 2, 16)  # 2 x 2 KV heads x 16 = 64 values per token
        m2la.convert(model, kv_rank=8, rope_dim=0, calibration=batches, **options)  # 8x
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(), weights(key_weight=3.0))
    assert not torch.equal(weights(), weights(key_weight=5.0))
