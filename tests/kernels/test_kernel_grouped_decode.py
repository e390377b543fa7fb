"""grouped_decode_attention: a grouped layer's decode (lossless GQA conversions), reference and Triton
(interpreter) against a per-group fp64 GQA oracle, and the layers that take it."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    assert_close_with_lse,
    dense_attention_fp64,
    quantize_cache,
    random_contiguous_cache,
    random_paged_cache,
    rows_of,
)

import m2la
from m2la.conversion import grouped_head_count, lossless_config, lossless_state_dict
from m2la.kernels import decode_attention, grouped_decode_attention
from m2la.kernels.latent_decode.reference import grouped_query
from reference_gqa import random_source

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def grouped_fp64(q_rope, cache, table, seqlens, scale, kv_rank, groups, kv_start=None, kv_scale=None):
    """Per sequence and KV group, fp64 GQA: keys = the group's x | y RoPE halves, values = its latent slice."""
    batch, heads, width = q_rope.shape
    pairs, group_rank, rope_pairs = width // 2, kv_rank // groups, groups * width // 2
    outs, lses = [], []
    for seq, length in enumerate(seqlens):
        first = 0 if kv_start is None else int(kv_start[seq])
        rows = rows_of(cache, table, seq, length)  # [s, r + 2p]
        if kv_scale is not None:
            rows = rows * rows_of(kv_scale[..., None], table, seq, length)
        rows = rows[first:]
        visible = torch.ones(1, rows.shape[0], dtype=torch.bool)
        out, lse = [], []
        for head in range(heads):
            g = head // (heads // groups)
            x = rows[:, kv_rank + g * pairs : kv_rank + (g + 1) * pairs]
            y = rows[:, kv_rank + rope_pairs + g * pairs : kv_rank + rope_pairs + (g + 1) * pairs]
            keys, values = torch.cat((x, y), dim=-1), rows[:, g * group_rank : (g + 1) * group_rank]
            o, s = dense_attention_fp64(q_rope[seq, head][None, None], keys[None], values[None], scale, visible)
            out.append(o[0, 0])
            lse.append(s[0, 0])
        outs.append(torch.stack(out))
        lses.append(torch.stack(lse))
    return torch.stack(outs), torch.stack(lses)


def grouped_case(heads, groups, head_dim, seqlens, dtype, block_size=16, paged=True, seed=0):
    kv_rank = groups * head_dim
    width = kv_rank + groups * head_dim
    if paged:
        cache, table = random_paged_cache(seqlens, width, block_size, dtype, seed=seed)
    else:
        cache, table = random_contiguous_cache(seqlens, width, max(seqlens) + 5, dtype, seed=seed), None
    q = torch.randn(len(seqlens), heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return q, cache, table, torch.tensor(seqlens, dtype=torch.int32), kv_rank


# (query heads, KV groups, head dim): MHA, GQA, one group (MQA), widths no power of two (48, 60, 12)
SHAPES = [(1, 1, 16), (3, 3, 16), (7, 7, 8), (8, 2, 12), (9, 3, 48), (6, 2, 60), (16, 1, 32), (63, 7, 16)]


@pytest.mark.parametrize("heads,groups,head_dim", SHAPES)
def test_reference_matches_fp64_gqa(heads, groups, head_dim):
    seqlens = [0, 1, 63, 37]
    q, cache, table, lens, kv_rank = grouped_case(heads, groups, head_dim, seqlens, torch.float32)
    out, lse = grouped_decode_attention(q, cache, lens, 0.2, kv_rank, groups, table, backend="reference")
    ref_out, ref_lse = grouped_fp64(q, cache, table, seqlens, 0.2, kv_rank, groups)
    assert out.shape == (4, heads, head_dim)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-5)


def test_grouped_is_the_plain_decode_on_the_groups_columns():
    """The plain decode with each head's query scattered into its group's RoPE columns (zero latent
    query) gives the same LSE, and its output on the head's group slice is the grouped output; the
    other columns are what the grouped op saves computing."""
    heads, groups, head_dim = 8, 2, 12
    q, cache, table, lens, kv_rank = grouped_case(heads, groups, head_dim, [5, 40], torch.float32)
    out, lse = grouped_decode_attention(q, cache, lens, 0.3, kv_rank, groups, table, backend="reference")
    plain, plain_lse = decode_attention(
        grouped_query(q, kv_rank, groups), cache, lens, 0.3, kv_rank, table, backend="reference"
    )
    group = torch.arange(heads) // (heads // groups)
    torch.testing.assert_close(plain.view(2, heads, groups, head_dim)[:, torch.arange(heads), group], out)
    torch.testing.assert_close(plain_lse, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads,groups,head_dim", SHAPES)
def test_triton_matches_fp64(heads, groups, head_dim, dtype):
    seqlens = [0, 1, 63, 37, 16]  # empty, one token, not a page multiple, a whole page
    q, cache, table, lens, kv_rank = grouped_case(heads, groups, head_dim, seqlens, dtype)
    out, lse = grouped_decode_attention(q, cache, lens, 0.2, kv_rank, groups, table, backend="triton")
    ref_out, ref_lse = grouped_fp64(q, cache, table, seqlens, 0.2, kv_rank, groups)
    assert out.dtype == dtype
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=TOL[dtype])


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
@pytest.mark.parametrize("num_splits", [0, 1, 9])
def test_triton_kv_start_splits_and_layouts(paged, num_splits):
    """Left padding (kv_start), more splits than tiles (9 for 16-token tiles of <= 70 rows), and a
    contiguous cache, against the oracle; unused cache slots hold NaN."""
    seqlens, starts = [70, 3, 33], [5, 3, 0]  # the second sequence sees nothing
    q, cache, table, lens, kv_rank = grouped_case(6, 3, 16, seqlens, torch.float32, paged=paged, seed=3)
    kv_start = torch.tensor(starts, dtype=torch.int32)
    out, lse = grouped_decode_attention(
        q, cache, lens, 0.2, kv_rank, 3, table, kv_start, num_splits=num_splits, backend="triton"
    )
    ref_out, ref_lse = grouped_fp64(q, cache, table, seqlens, 0.2, kv_rank, 3, kv_start)
    assert_close_with_lse(out, lse, ref_out, ref_lse, atol=2e-5)


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_triton_fp8_cache(fp8_dtype):
    """An fp8 cache with one scale per token slot: both backends match the oracle on the dequantized rows."""
    seqlens = [40, 1, 17]
    q, cache, table, lens, kv_rank = grouped_case(8, 2, 16, seqlens, torch.float32, seed=5)
    codes, scales = quantize_cache(cache, fp8_dtype)
    ref_out, ref_lse = grouped_fp64(q, codes.float(), table, seqlens, 0.2, kv_rank, 2, kv_scale=scales)
    for backend in ("reference", "triton"):
        out, lse = grouped_decode_attention(q, codes, lens, 0.2, kv_rank, 2, table, kv_scale=scales, backend=backend)
        assert_close_with_lse(out, lse, ref_out, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_arguments_name_the_problem(backend):
    q, cache, table, lens, kv_rank = grouped_case(6, 3, 16, [5, 9], torch.float32)
    call = dict(q_rope=q, kv_cache=cache, cache_seqlens=lens, softmax_scale=0.2, kv_rank=kv_rank, head_groups=3,
                block_table=table, backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match="head_groups=4 must divide the 6 query heads"):
        grouped_decode_attention(**{**call, "head_groups": 4})
    with pytest.raises(ValueError, match="kv_cache must be 3-d with rows of r"):
        grouped_decode_attention(**{**call, "head_groups": 2})  # rows are r + 3 * 16, not r + 2 * 16
    with pytest.raises(ValueError, match="expected q_rope"):
        grouped_decode_attention(**{**call, "q_rope": q[..., :15]})
    with pytest.raises(ValueError, match="cache_seqlens"):
        grouped_decode_attention(**{**call, "cache_seqlens": lens.long()})


def test_lossless_conversions_are_grouped_until_trained_off_the_blocks():
    """`grouped_head_count` finds G on lossless conversions of GQA, MHA and QK-norm sources, and 0 on a
    compressed one, a partial-rotary source (a no-RoPE key part) and a layer whose query map left
    the group blocks; the module's memo follows the weights' version counters."""
    import tiny_hf

    grouped = {}
    for family, heads, kv_heads in (("qwen2", 6, 1), ("qwen3", 4, 4), ("llama", 6, 2)):
        model = tiny_hf.build(family, heads, kv_heads, 12)
        m2la.convert(model)
        layers = [m for m in model.modules() if isinstance(m, m2la.M2LAttention)]
        grouped[family] = [layer.head_groups() for layer in layers]
    assert grouped == {"qwen2": [1, 1], "qwen3": [4, 4], "llama": [2, 2]}
    layer = layers[0]  # llama: 2 groups of 3 heads
    with torch.no_grad():
        layer.q_up[0, -1, 0] += 1.0  # head 0 (group 0) now reads group 1's last pair
    assert layer.head_groups() == 0
    with torch.no_grad():
        layer.q_up[0, -1, 0] = 0.0
    assert layer.head_groups() == 2
    with torch.no_grad():
        layer.kv_b_proj.weight[0, -1] += 1.0  # head 0's first value dim now reads group 1's latent
    assert grouped_head_count(layer.config, layer.q_up, layer.up_projections()[1]) == layer.head_groups() == 0
    for rotary_dim, expected in ((None, 2), (8, 0)):  # partial rotary: a no-RoPE key part, n = 4
        source = random_source(num_heads=4, num_kv_heads=2, head_dim=12, rotary_dim=rotary_dim)
        module = m2la.M2LAttention(lossless_config(source))
        module.load_state_dict(lossless_state_dict(source, module.config))
        assert module.head_groups() == expected
    model = tiny_hf.build("llama", 6, 2, 16)
    batches = [torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    m2la.convert(model, compression=2.0, calibration=batches, pair_grid_points=4)
    assert all(m.head_groups() == 0 for m in model.modules() if isinstance(m, m2la.M2LAttention))
