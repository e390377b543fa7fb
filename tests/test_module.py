"""The M²LA module and its lossless conversion from a from-scratch GQA reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2la import rope
from m2la.cache import LatentCache
from m2la.config import M2LAConfig, M2LAConfigError
from m2la.conversion import ConversionError, lossless_config, lossless_state_dict, source_cache_width
from m2la.module import M2LAttention
from reference_gqa import gqa_attention, random_source


def build(src):
    config = lossless_config(src)
    module = M2LAttention(config).to(src.q_weight.dtype)
    module.load_state_dict(lossless_state_dict(src, config), strict=True)
    return module


CASES = {
    "mha": dict(num_heads=3, num_kv_heads=3, head_dim=16),
    "gqa3": dict(num_heads=9, num_kv_heads=3, head_dim=12),
    "gqa7-d48": dict(num_heads=7, num_kv_heads=1, head_dim=48, hidden_size=56),
    "bias": dict(num_heads=6, num_kv_heads=2, head_dim=10, bias=True),
    "qk-norm": dict(num_heads=6, num_kv_heads=2, head_dim=12, qk_norm=True, bias=True),
    "partial-rotary": dict(num_heads=4, num_kv_heads=2, head_dim=12, rotary_dim=8),
    "interleaved": dict(num_heads=4, num_kv_heads=4, head_dim=8, interleaved=True),
    "mrope": dict(num_heads=4, num_kv_heads=2, head_dim=12, mrope_axis=rope.mrope_axes_interleaved([2, 2, 2])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq_len", [1, 13])
def test_lossless_matches_gqa(case, seq_len):
    src = random_source(**CASES[case], seed=seq_len)
    module = build(src)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, seq_len, src.hidden_size, generator=g, dtype=torch.float64)
    if src.rope_axis.max() > 0:
        positions = torch.randint(0, 50, (3, 2, seq_len), generator=g)
    else:
        positions = torch.arange(seq_len).expand(2, seq_len) + 5
    expected = gqa_attention(src, hidden, positions)
    cos, sin = module.rope_cos_sin(positions)
    for absorbed in (False, True):
        got = module.attend(hidden, cos, sin, absorbed=absorbed)  # records grad: never the grouped path
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # Without autograd, layers that kept the source's groups attend through them (GQA's work)
    grouped = CASES[case].get("rotary_dim") is None  # partial rotary keeps no-RoPE key dims (n > 0)
    assert module.head_groups() == (src.num_kv_heads if grouped else 0)
    with torch.no_grad():
        for absorbed in (False, True, None):
            got = module.attend(hidden, cos, sin, absorbed=absorbed)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_lossless_fp32_within_rounding():
    src = random_source(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=96, bias=True, dtype=torch.float32)
    module = build(src)
    hidden = torch.randn(2, 33, 96)
    positions = torch.arange(33).expand(2, 33)
    expected = gqa_attention(src, hidden, positions)
    torch.testing.assert_close(module(hidden, positions), expected, rtol=2e-5, atol=2e-5)


def test_padding_mask_matches_reference():
    src = random_source(num_heads=6, num_kv_heads=3, head_dim=8)
    module = build(src)
    hidden = torch.randn(2, 7, src.hidden_size, dtype=torch.float64)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = (pad.cumsum(-1) - 1).clamp(min=0)
    expected = gqa_attention(src, hidden, positions, pad)
    got = module(hidden, positions, attention_mask=pad)
    # rows of padded queries attend to nothing in the reference; compare the real tokens only
    torch.testing.assert_close(got[pad.bool()], expected[pad.bool()], rtol=1e-10, atol=1e-10)


def test_incremental_decode_with_cache_matches_full_forward():
    src = random_source(num_heads=6, num_kv_heads=2, head_dim=12, qk_norm=True)
    module = build(src)
    hidden = torch.randn(3, 10, src.hidden_size, dtype=torch.float64)
    positions = torch.arange(10).expand(3, 10)
    full = module(hidden, positions)
    cache = LatentCache(num_layers=1)
    steps = [module(hidden[:, :6], positions[:, :6], cache=cache)]
    for i in range(6, 10):
        steps.append(module(hidden[:, i : i + 1], positions[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    config = module.config
    assert cache.nbytes == 3 * 10 * config.cache_width * 8
    assert config.cache_width == source_cache_width(src)


def test_cache_holds_only_latent_rows():
    src = random_source(num_heads=4, num_kv_heads=2, head_dim=8)
    module = build(src)
    cache = LatentCache(num_layers=1)
    module(torch.randn(1, 5, src.hidden_size, dtype=torch.float64), torch.arange(5)[None], cache=cache)
    assert cache.rows[0].shape == (1, 5, module.config.kv_rank + module.config.rope_dim)


def _random_config(draw_heads, rank, nope, rope_pairs, v_dim, q_rank, kv_b_bias):
    return M2LAConfig(
        hidden_size=24,
        num_heads=draw_heads,
        kv_rank=rank,
        rope_dim=2 * rope_pairs,
        qk_nope_dim=nope,
        v_head_dim=v_dim,
        softmax_scale=0.3,
        q_rank=q_rank,
        kv_b_bias=kv_b_bias,
        q_bias=True,
        kv_a_bias=True,
        rope_inv_freq=[1.0 / (i + 1) for i in range(rope_pairs)],
        rope_axis=[0] * rope_pairs,
        rope_source_column=list(range(rope_pairs)),
    )


@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(1, 7),
    rank=st.integers(1, 20),
    nope=st.integers(0, 9),
    rope_pairs=st.integers(0, 5),
    v_dim=st.integers(1, 9),
    q_rank=st.one_of(st.none(), st.integers(1, 8)),
    kv_b_bias=st.booleans(),
    t=st.integers(1, 9),
    past=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_expanded_and_absorbed_paths_agree(heads, rank, nope, rope_pairs, v_dim, q_rank, kv_b_bias, t, past, seed):
    if nope + 2 * rope_pairs == 0:
        nope = 1
    torch.manual_seed(seed)
    module = M2LAttention(_random_config(heads, rank, nope, rope_pairs, v_dim, q_rank, kv_b_bias)).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.4)
    hidden = torch.randn(2, past + t, 24, dtype=torch.float64)
    positions = torch.arange(past + t).expand(2, -1)
    cache_a, cache_b = LatentCache(1), LatentCache(1)
    cos, sin = module.rope_cos_sin(positions)
    if past:
        module.attend(hidden[:, :past], cos[:, :past], sin[:, :past], cache=cache_a)
        module.attend(hidden[:, :past], cos[:, :past], sin[:, :past], cache=cache_b)
    args = (hidden[:, past:], cos[:, past:], sin[:, past:])
    expanded = module.attend(*args, cache=cache_a, absorbed=False)
    absorbed = module.attend(*args, cache=cache_b, absorbed=True)
    torch.testing.assert_close(expanded, absorbed, rtol=1e-10, atol=1e-10)


def test_fp32_paths_agree_to_rounding():
    torch.manual_seed(0)
    module = M2LAttention(_random_config(7, 48, 16, 8, 12, None, True))
    hidden = torch.randn(2, 63, 24)
    cos, sin = module.rope_cos_sin(torch.arange(63).expand(2, -1))
    torch.testing.assert_close(
        module.attend(hidden, cos, sin, absorbed=False),
        module.attend(hidden, cos, sin, absorbed=True),
        rtol=1e-5,
        atol=1e-5,
    )


def test_config_errors_name_the_problem():
    good = dict(
        hidden_size=8,
        num_heads=2,
        kv_rank=4,
        rope_dim=4,
        qk_nope_dim=2,
        v_head_dim=3,
        softmax_scale=0.5,
        rope_inv_freq=[1.0, 0.5],
        rope_axis=[0, 0],
        rope_source_column=[0, 1],
    )
    M2LAConfig(**good)
    with pytest.raises(M2LAConfigError, match="rope_dim must be even"):
        M2LAConfig(**{**good, "rope_dim": 3})
    with pytest.raises(M2LAConfigError, match="rope_inv_freq needs 2 entries"):
        M2LAConfig(**{**good, "rope_inv_freq": [1.0]})
    with pytest.raises(M2LAConfigError, match="kv_rank must be positive"):
        M2LAConfig(**{**good, "kv_rank": 0})
    with pytest.raises(M2LAConfigError, match="unknown M2LAConfig fields"):
        M2LAConfig.from_dict({**good, "bogus": 1})
    assert M2LAConfig.from_dict(M2LAConfig(**good).to_dict()) == M2LAConfig(**good)


def test_source_errors():
    src = random_source(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConversionError, match="cannot share"):
        lossless_config(src)
    src = random_source()
    src.k_weight = src.k_weight[:-1]
    with pytest.raises(ConversionError, match="k_weight has shape"):
        lossless_config(src)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool4d", "float4d", "inf4d", "prefix"])
def test_sdpa_expanded_matches_reference(mask_kind):
    """Every row, including left-padding queries that see no key (0 + bias, never NaN: CUDA's fused
    SDPA kernels give NaN there unless such rows are handled)."""
    from m2la import attention_math as am

    torch.manual_seed(3)
    b, t, h, n, p2, r, v = 2, 7, 3, 5, 6, 11, 4
    past = 4 if mask_kind == "prefix" else 0
    s = t + past
    q_nope, q_rope = torch.randn(b, t, h, n), torch.randn(b, t, h, p2)
    latent, k_rope = torch.randn(b, s, r), torch.randn(b, s, p2)
    w_uk, w_uv, v_bias = torch.randn(h, n, r), torch.randn(h, v, r), torch.randn(h, v)
    pad = torch.ones(b, s, dtype=torch.long)
    pad[0, :3] = 0
    causal = torch.ones(t, s, dtype=torch.bool).tril(past)
    mask = {
        "none": None,
        "prefix": None,
        "padding": pad,
        "bool4d": causal[None, None] & pad.bool()[:, None, None],
        "float4d": torch.zeros(b, 1, t, s).masked_fill(~(causal[None, None] & pad.bool()[:, None, None]), -1e30),
        "inf4d": torch.zeros(b, 1, t, s).masked_fill(~(causal[None, None] & pad.bool()[:, None, None]), -torch.inf),
    }[mask_kind]
    args = (q_nope, q_rope, latent, k_rope, w_uk, w_uv, 0.3, mask, v_bias)
    expected = am.latent_attention_expanded(*args)
    got = am.latent_attention_expanded_sdpa(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool4d", "float4d", "window", "per_head"])
@pytest.mark.parametrize("t,past", [(1, 0), (1, 9), (6, 0), (5, 7), (23, 4)])
@pytest.mark.parametrize("heads,groups,pairs,value_dim", [(9, 3, 5, 7), (7, 1, 24, 48), (4, 4, 1, 3), (6, 2, 30, 60)])
def test_grouped_attention_matches_latent_mqa(heads, groups, pairs, value_dim, t, past, mask_kind):
    """`grouped_attention_from_rows` (both its SDPA and its per-group GEMM paths) against the fp64
    explicit-softmax MQA oracle with the zero-padded query: every query row, padding rows included."""
    from m2la import attention_math as am
    from m2la.kernels.latent_decode.reference import grouped_query

    torch.manual_seed(heads * 100 + t + past)
    b, s = 2, t + past
    kv_rank = groups * value_dim
    q = torch.randn(b, t, heads, 2 * pairs, dtype=torch.float64)
    rows = torch.randn(b, s, kv_rank + 2 * groups * pairs, dtype=torch.float64)
    pad = torch.ones(b, s, dtype=torch.long)
    pad[1, : min(3, s - 1)] = 0
    causal = torch.ones(t, s, dtype=torch.bool).tril(past)
    window = causal & ~torch.ones(t, s, dtype=torch.bool).tril(past - 3)  # 3 keys each (sliding window)
    mask = {
        "none": None,
        "padding": pad,
        "bool4d": causal[None, None] & pad.bool()[:, None, None],
        "float4d": torch.zeros(b, 1, t, s, dtype=torch.float64).masked_fill(~causal, -torch.inf),
        "window": window[None, None],
        "per_head": causal & (torch.rand(b, heads, t, s, generator=torch.Generator().manual_seed(s)) < 0.6),
    }[mask_kind]
    plain_query = grouped_query(q.flatten(0, 1), kv_rank, groups).unflatten(0, (b, t))  # [b, t, h, r + 2p]
    expected, _ = am.latent_mqa(plain_query, rows, kv_rank, 0.3, mask)  # [b, t, h, r]
    group = torch.arange(heads) // (heads // groups)
    expected = expected.unflatten(-1, (groups, value_dim))[:, :, torch.arange(heads), group]  # [b, t, h, r/G]
    for fused_softmax in (False, True):
        got = am.grouped_attention_from_rows(q, rows, kv_rank, groups, 0.3, mask, fused_softmax)
        assert got.shape == (b, t, heads, value_dim) and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t,past", [(1, 0), (1, 9), (5, 0), (4, 6)])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_mqa_matches_explicit(t, past, padded):
    from m2la import attention_math as am

    torch.manual_seed(t + past)
    b, h, r, c = 2, 3, 10, 16
    s = t + past
    query, rows = torch.randn(b, t, h, c), torch.randn(b, s, c)
    mask = None
    if padded:
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, :2] = 0
    expected, lse = am.latent_mqa(query, rows, r, 0.25, mask)
    got, none = am.latent_mqa(query, rows, r, 0.25, mask, return_lse=False)
    assert none is None and lse.shape == (b, h, t)
    real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask[:, past:].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_grouped_reference_benchmark_agrees_with_the_plain_paths():
    """`benchmarks/grouped_reference_cpu.py` (tiny shapes): the plain and grouped decode and prefill
    agree on every row it reports."""
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "grouped_reference_cpu.py"
    argv = [sys.executable, str(script), "--heads", "6", "--kv-heads", "2", "--head-dim", "12"]
    argv += ["--contexts", "1", "37", "--prefill", "19", "--repeats", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = re.findall(r"^\| (decode|prefill \(causal\)) \| \d+ \|.* \| (\S+) \|$", proc.stdout, re.M)
    assert [step for step, _ in diffs] == ["decode", "decode", "prefill (causal)"], proc.stdout
    assert all(float(d) < 1e-5 for _, d in diffs), diffs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t,past", [(1, 0), (1, 62), (3, 5)])
def test_rope_only_query_skips_the_zero_latent_columns(dtype, t, past):
    """`latent_mqa` with `q_rope` alone (a layer with n = 0) equals the full query with its zero
    latent part, on both the GEMM and the oracle path; any other width is refused by name."""
    from m2la import attention_math as am

    torch.manual_seed(t + past)
    b, h, r, rope = 2, 7, 13, 6
    q_rope, rows = torch.randn(b, t, h, rope, dtype=dtype), torch.randn(b, t + past, r + rope, dtype=dtype)
    mask = torch.ones(b, t + past, dtype=torch.long)
    mask[0, :1] = 0
    full = torch.cat((q_rope.new_zeros(b, t, h, r), q_rope), dim=-1)
    for return_lse in (True, False):
        want, _ = am.latent_mqa(full, rows, r, 0.4, mask, return_lse)
        got, _ = am.latent_mqa(q_rope, rows, r, 0.4, mask, return_lse)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="query width 5 matches neither the rows"):
        am.latent_mqa(q_rope[..., :5], rows, r, 0.4)
