"""GPU-only checks (bf16/fp16 on CUDA, native compiler). Run: benchmarks/gpu_check.sh.

Error budget: the kernel's max error against the fp32 reference must stay within 2x the error of
the same computation done by torch in the same low precision (plus a hair for ties at zero).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import random_contiguous_cache, random_paged_cache, random_quantized_paged_cache

from m2la.backends import triton_interpreter_enabled
from m2la.kernels import decode_attention, prefill_attention, write_latent_cache
from m2la.kernels._paging import gather_cache_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(triton_interpreter_enabled(), reason="needs the native compiler (M2LA_TRITON_NATIVE=1)"),
]
LOWP = [torch.bfloat16, torch.float16]


def decode_lowp_torch(q, cache, table, lens, scale, kv_rank, kv_start=None):
    """The decode math in q's dtype with plain torch ops (the precision yardstick); `table` None: a
    contiguous cache `[b, s, d]`."""
    rows = cache if table is None else gather_cache_rows(cache, table, table.shape[1] * cache.shape[1])  # [b, s, d]
    positions = torch.arange(rows.shape[1], device=q.device)[None, :]
    visible = positions < lens[:, None]
    if kv_start is not None:
        visible &= positions >= kv_start[:, None]
    rows = torch.where(visible[..., None], rows, 0)
    scores = torch.einsum("bhd,bsd->bhs", q, rows) * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    probs = probs.nan_to_num(0.0)  # empty sequences: softmax of all -inf; the contract says output 0
    return torch.einsum("bhs,bsr->bhr", probs, rows[..., :kv_rank])


def within_budget(kernel_out, lowp_out, ref_out, name):
    kernel_err = (kernel_out.float() - ref_out.float()).abs().max().item()
    torch_err = (lowp_out.float() - ref_out.float()).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-4, f"{name}: kernel err {kernel_err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,kv_rank,rope_dim", [(32, 448, 64), (16, 512, 64), (3, 96, 32), (63, 48, 16)])
def test_decode_gpu(heads, kv_rank, rope_dim, dtype):
    seqlens = [0, 1, 63, 1000, 4097]
    cache, table = random_paged_cache(seqlens, kv_rank + rope_dim, 64, dtype, seed=heads)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(len(seqlens), heads, kv_rank + rope_dim, device="cuda").to(dtype)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    scale = (128 + rope_dim) ** -0.5
    out, lse = decode_attention(q, cache, lens, scale, kv_rank, table, backend="triton")
    ref_out, ref_lse = decode_attention(q.float(), cache.float(), lens, scale, kv_rank, table, backend="reference")
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    within_budget(out, decode_lowp_torch(q, cache, table, lens, scale, kv_rank), ref_out, "decode")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-cache", "fp8-cache"])
@pytest.mark.parametrize("heads,kv_rank,rope_dim", [(32, 1024, 1024), (28, 512, 512), (9, 192, 192)])
def test_rope_only_decode_gpu(heads, kv_rank, rope_dim, fp8):
    """n = 0 layers (lossless conversions of Llama-3-8B, Qwen2.5-7B and SmolLM2 fine-tuned out of
    their grouped form) decode RoPE-only queries at their default tiles: within 2x torch bf16's
    error of the zero-padded full query's fp32 result."""
    seqlens = [0, 1, 63, 1000, 4097]
    if fp8:
        cache, kv_scale, table = fp8_paged_case(seqlens, kv_rank + rope_dim, torch.float8_e4m3fn, seed=heads)
        rows = cache.float() * kv_scale[..., None]
    else:
        cache, table = random_paged_cache(seqlens, kv_rank + rope_dim, 64, torch.bfloat16, seed=heads)
        cache, table, kv_scale = cache.cuda(), table.cuda(), None
        rows = cache.float()
    q_rope = torch.randn(len(seqlens), heads, rope_dim, device="cuda").to(torch.bfloat16)
    q_full = torch.cat((q_rope.new_zeros(len(seqlens), heads, kv_rank), q_rope), dim=-1)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    scale = rope_dim**-0.5
    out, lse = decode_attention(q_rope, cache, lens, scale, kv_rank, table, kv_scale=kv_scale, backend="triton")
    ref_out, ref_lse = decode_attention(q_full.float(), rows, lens, scale, kv_rank, table, backend="reference")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    lowp = decode_lowp_torch(q_full, rows.to(torch.bfloat16), table, lens, scale, kv_rank)
    within_budget(out, lowp, ref_out, "rope-only decode")


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,groups,head_dim", [(32, 8, 128), (28, 4, 128), (9, 3, 64), (7, 7, 48)])
def test_grouped_decode_gpu(heads, groups, head_dim, dtype):
    """`grouped_decode_attention` (lossless conversions of GQA layers) within 2x the same-dtype torch
    error of the plain decode with the scattered query, against the fp32 reference."""
    from m2la.kernels import grouped_decode_attention
    from m2la.kernels.latent_decode.reference import grouped_query

    seqlens = [0, 1, 63, 1000, 4097]
    kv_rank = groups * head_dim
    cache, table = random_paged_cache(seqlens, 2 * kv_rank, 64, dtype, seed=heads)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(len(seqlens), heads, head_dim, device="cuda").to(dtype)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out, lse = grouped_decode_attention(q, cache, lens, scale, kv_rank, groups, table, backend="triton")
    ref_out, ref_lse = grouped_decode_attention(
        q.float(), cache.float(), lens, scale, kv_rank, groups, table, backend="reference"
    )
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    group = torch.arange(heads, device="cuda") // (heads // groups)
    lowp = decode_lowp_torch(grouped_query(q, kv_rank, groups), cache, table, lens, scale, kv_rank)
    lowp = lowp.view(len(seqlens), heads, groups, head_dim)[:, torch.arange(heads, device="cuda"), group]
    within_budget(out, lowp, ref_out, "grouped decode")


@pytest.mark.parametrize(
    "config",
    [
        dict(HEADS_ON_N=True),
        dict(HEADS_ON_N=True, num_warps=4),
        dict(HEADS_ON_N=True, LATENT_PIECES=True, num_warps=8),
        dict(HEADS_ON_N=False, LATENT_PIECES=True, num_warps=8),
        dict(PAGE_TILE=False),
        dict(HEADS_ON_N=False, LATENT_PIECES=True, BLOCK_H=16, num_warps=4, BLOCK_N=32),
        dict(SPLIT_BY_LENGTH=False),  # the split placement the benchmark compares against
    ],
    ids=[
        "heads-on-n",
        "heads-on-n-4warps",
        "latent-pieces",
        "latent-pieces-heads-on-m",
        "row-gather",
        "16-head-tiles-4warps",
        "splits-by-capacity",
    ],  # fmt: skip
)
@pytest.mark.parametrize("kv_rank,rope_dim", [(448, 64), (896, 128)])
def test_decode_variants_gpu(kv_rank, rope_dim, config):
    """The tile variants the benchmark sweeps (and may make default), bf16, within the same budget."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens = [0, 1, 63, 1000, 4097]
    cache, table = random_paged_cache(seqlens, kv_rank + rope_dim, 64, torch.bfloat16, seed=kv_rank)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(len(seqlens), 32, kv_rank + rope_dim, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    scale = (128 + rope_dim) ** -0.5
    out, lse = latent_decode_triton(q, cache, lens, scale, kv_rank, table, config=config)
    ref_out, ref_lse = decode_attention(q.float(), cache.float(), lens, scale, kv_rank, table, backend="reference")
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    within_budget(out, decode_lowp_torch(q, cache, table, lens, scale, kv_rank), ref_out, f"decode {config}")


@pytest.mark.parametrize("kv_rank,rope_dim,num_warps,num_stages", [(896, 128, 8, 1), (448, 64, 4, 2)])
def test_decode_tma_tiles_gpu(kv_rank, rope_dim, num_warps, num_stages):
    """TMA tiles (device-side tensor descriptors, contiguous cache) in bf16 within the error budget,
    with NaN in the hidden rows (left padding and past each length) and an empty sequence."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens, kv_start = [0, 1, 63, 1000, 4097], [0, 0, 5, 300, 0]
    width = kv_rank + rope_dim
    cache = random_contiguous_cache(seqlens, width, 4160, torch.bfloat16, kv_start, seed=kv_rank).cuda()
    q = torch.randn(len(seqlens), 32, width, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    start = torch.tensor(kv_start, dtype=torch.int32, device="cuda")
    scale = (128 + rope_dim) ** -0.5
    config = dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True, BLOCK_N=64, num_warps=num_warps, num_stages=num_stages)
    out, lse = latent_decode_triton(q, cache, lens, scale, kv_rank, None, start, config=config)
    ref_out, ref_lse = decode_attention(
        q.float(), cache.float(), lens, scale, kv_rank, None, start, backend="reference"
    )
    assert torch.isfinite(out).all() and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    lowp = decode_lowp_torch(q, cache, None, lens, scale, kv_rank, start)
    within_budget(out, lowp, ref_out, f"TMA decode {kv_rank}")


def prefill_lowp_torch(q_nope, q_rope, cache, w_uk, w_uv, cu, lens, scale, table):
    """Expanded prefill in the inputs' dtype through torch SDPA, one sequence at a time."""
    kv_rank, outs = w_uk.shape[1], []
    for seq in range(len(lens)):
        lo, hi, length = int(cu[seq]), int(cu[seq + 1]), int(lens[seq])
        rows = gather_cache_rows(cache, table[seq : seq + 1], length)[0]  # [s, r+2p]
        latent, k_rope = rows[:, :kv_rank], rows[:, kv_rank:]
        heads = w_uk.shape[0]
        keys = torch.cat([torch.einsum("sr,hrn->hsn", latent, w_uk), k_rope.expand(heads, -1, -1)], dim=-1)
        values = torch.einsum("sr,hrv->hsv", latent, w_uv)
        queries = torch.cat([q_nope[lo:hi], q_rope[lo:hi]], dim=-1).transpose(0, 1)  # [h, t, n+2p]
        pos = length - (hi - lo) + torch.arange(hi - lo, device=rows.device)
        mask = torch.arange(length, device=rows.device)[None, :] <= pos[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=mask, scale=scale
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


# Prefill checks at 448+64: a fresh 300-token prompt, 1 token over 500 cached, 77 over 1000 cached.
PREFILL_HEADS, PREFILL_RANK, PREFILL_ROPE, PREFILL_NOPE, PREFILL_VALUE = 8, 448, 64, 128, 128
PREFILL_NEW, PREFILL_CACHED = [300, 1, 77], [0, 500, 1000]
PREFILL_SEQLENS = [n + c for n, c in zip(PREFILL_NEW, PREFILL_CACHED, strict=True)]


def prefill_gpu_inputs(dtype, table):
    """Queries and up-projections in `dtype` on CUDA for the prefill checks -> (q_nope, q_rope, w_uk,
    w_uv, (cu_seqlens, seqlens, softmax scale, block table))."""
    heads, kv_rank, tokens = PREFILL_HEADS, PREFILL_RANK, sum(PREFILL_NEW)
    q_nope = torch.randn(tokens, heads, PREFILL_NOPE, device="cuda").to(dtype)
    q_rope = torch.randn(tokens, heads, PREFILL_ROPE, device="cuda").to(dtype)
    w_uk = (torch.randn(heads, kv_rank, PREFILL_NOPE, device="cuda") / kv_rank**0.5).to(dtype)
    w_uv = (torch.randn(heads, kv_rank, PREFILL_VALUE, device="cuda") / kv_rank**0.5).to(dtype)
    cu = torch.tensor([0, 300, 301, 378], dtype=torch.int32, device="cuda")
    lens = torch.tensor(PREFILL_SEQLENS, dtype=torch.int32, device="cuda")
    return q_nope, q_rope, w_uk, w_uv, (cu, lens, (PREFILL_NOPE + PREFILL_ROPE) ** -0.5, table)


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["decode", "decode-packed", "absorbed", "expanded"])
def test_prefill_gpu(mode, dtype):
    """Every prefill mode in bf16 / fp16 within 2x the same-dtype torch error; "decode-packed" is the
    decode route given `max_seqlen_q`, so its 8 heads run 4 tokens a program (packed blocks)."""
    cache, table = random_paged_cache(PREFILL_SEQLENS, PREFILL_RANK + PREFILL_ROPE, 64, dtype)
    cache, table = cache.cuda(), table.cuda()
    q_nope, q_rope, w_uk, w_uv, args = prefill_gpu_inputs(dtype, table)
    cu, lens = args[:2]
    packed = dict(max_seqlen_q=max(PREFILL_NEW)) if mode == "decode-packed" else {}
    mode = mode.split("-")[0]
    out, lse = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, *args, mode=mode, backend="triton", **packed)
    f32 = [t.float() for t in (q_nope, q_rope, cache, w_uk, w_uv)]
    ref_out, ref_lse = prefill_attention(*f32, *args, backend="reference")
    lowp_out = prefill_lowp_torch(q_nope, q_rope, cache, w_uk, w_uv, cu, lens, args[2], table)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, ref_lse, atol=5e-2, rtol=1e-3)
    within_budget(out, lowp_out, ref_out, f"prefill {mode}")


@pytest.mark.parametrize("mode", ["flash", "decode"])
@pytest.mark.parametrize("heads,groups,head_dim", [(32, 8, 128), (9, 3, 64), (7, 7, 48)])
def test_grouped_prefill_gpu(heads, groups, head_dim, mode):
    """`grouped_prefill_attention` in bf16 (a fresh 300-token prompt, 1 token over 500 cached, 77 over
    1000 cached) within 2x the bf16 torch SDPA error of the plain prefill with the scattered query
    and the identity value map, against the fp32 reference."""
    from m2la.kernels import grouped_prefill_attention
    from m2la.kernels.latent_decode.reference import grouped_query

    dtype, kv_rank = torch.bfloat16, groups * head_dim
    cache, table = random_paged_cache(PREFILL_SEQLENS, 2 * kv_rank, 64, dtype, seed=heads)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(sum(PREFILL_NEW), heads, head_dim, device="cuda").to(dtype)
    cu = torch.tensor([0, 300, 301, 378], dtype=torch.int32, device="cuda")
    lens = torch.tensor(PREFILL_SEQLENS, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out, lse = grouped_prefill_attention(q, cache, cu, lens, scale, kv_rank, groups, table, mode=mode, backend="triton")
    ref_out, ref_lse = grouped_prefill_attention(
        q.float(), cache.float(), cu, lens, scale, kv_rank, groups, table, backend="reference"
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, ref_lse, atol=5e-2, rtol=1e-3)
    placed = grouped_query(q, kv_rank, groups)[..., kv_rank:]
    identity = torch.eye(kv_rank, device="cuda", dtype=dtype).expand(heads, kv_rank, kv_rank)
    no_nope = torch.zeros(heads, kv_rank, 0, device="cuda", dtype=dtype)
    lowp = prefill_lowp_torch(q[..., :0], placed, cache, no_nope, identity, cu, lens, scale, table)
    group = torch.arange(heads, device="cuda") // (heads // groups)
    lowp = lowp.view(-1, heads, groups, head_dim)[:, torch.arange(heads, device="cuda"), group]
    within_budget(out, lowp, ref_out, f"grouped prefill {mode}")


def test_prefill_tma_tile_gpu():
    """The expanded prefill with keys and values by TMA (`config=dict(TMA=True)`), bf16, within the
    error budget, over a paged cache (expanded mode gathers it, so TMA reads contiguous rows)."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    cache, table = random_paged_cache(PREFILL_SEQLENS, PREFILL_RANK + PREFILL_ROPE, 64, torch.bfloat16)
    cache, table = cache.cuda(), table.cuda()
    q_nope, q_rope, w_uk, w_uv, args = prefill_gpu_inputs(torch.bfloat16, table)
    cu, lens = args[:2]
    out, lse = latent_prefill_triton(q_nope, q_rope, cache, w_uk, w_uv, *args, mode="expanded", config=dict(TMA=True))
    f32 = [t.float() for t in (q_nope, q_rope, cache, w_uk, w_uv)]
    ref_out, ref_lse = prefill_attention(*f32, *args, backend="reference")
    lowp_out = prefill_lowp_torch(q_nope, q_rope, cache, w_uk, w_uv, cu, lens, args[2], table)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, ref_lse, atol=5e-2, rtol=1e-3)
    within_budget(out, lowp_out, ref_out, "prefill expanded, TMA tile")


@pytest.mark.parametrize("head_group", [1, 3])
def test_prefill_launch_order_changes_no_bit_gpu(head_group):
    """The launch order (head groups of 3 over 8 heads: a short last group; 1: the earlier order)
    moves programs, never their arithmetic: the output equals the default order's bit for bit."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    cache, table = random_paged_cache(PREFILL_SEQLENS, PREFILL_RANK + PREFILL_ROPE, 64, torch.bfloat16)
    q_nope, q_rope, w_uk, w_uv, args = prefill_gpu_inputs(torch.bfloat16, table.cuda())
    inputs = (q_nope, q_rope, cache.cuda(), w_uk, w_uv, args[0], args[1], args[2], args[3])
    out, lse = latent_prefill_triton(*inputs, mode="expanded")
    grouped_out, grouped_lse = latent_prefill_triton(*inputs, mode="expanded", config=dict(HEAD_GROUP=head_group))
    assert torch.equal(out, grouped_out) and torch.equal(lse, grouped_lse)


@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
def test_prefill_and_decode_capture_in_a_cuda_graph_gpu(mode):
    """With max_seqlen_q and max_seqlen_k given, prefill never syncs with the host, so it (and decode)
    can be captured in a CUDA graph; replaying after new inputs are copied in gives the eager result."""
    dtype = torch.bfloat16
    cache, table = random_paged_cache(PREFILL_SEQLENS, PREFILL_RANK + PREFILL_ROPE, 64, dtype)
    cache, table = cache.cuda(), table.cuda()
    q_nope, q_rope, w_uk, w_uv, (cu, lens, scale, _) = prefill_gpu_inputs(dtype, table)
    q_decode = torch.randn(len(PREFILL_SEQLENS), PREFILL_HEADS, PREFILL_RANK + PREFILL_ROPE, device="cuda").to(dtype)

    def step():
        out, lse = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, cu, lens, scale, table, mode=mode,
                                     max_seqlen_q=300, max_seqlen_k=max(PREFILL_SEQLENS), backend="triton")  # fmt: skip
        dec, dec_lse = decode_attention(q_decode, cache, lens, scale, PREFILL_RANK, table, backend="triton")
        return out, lse, dec, dec_lse

    side = torch.cuda.Stream()  # warm up (compile, autotune caches) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for tensor in (q_nope, q_rope, q_decode):
        tensor.copy_(torch.randn_like(tensor))
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, step(), strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_cache_write_gpu(dtype):
    tokens, kv_rank, pairs = 1000, 448, 32
    latent = torch.randn(tokens, kv_rank, device="cuda").to(dtype)
    k_rope = torch.randn(tokens, 2 * pairs, device="cuda").to(dtype)
    angles = torch.rand(tokens, pairs, device="cuda") * 6.28
    slots = torch.randperm(64 * 32, device="cuda")[:tokens]
    slots[::7] = -1
    cache = torch.full((32, 64, kv_rank + 2 * pairs), float("nan"), device="cuda", dtype=dtype)
    expected = cache.clone()
    write_latent_cache(expected, latent, k_rope, angles.cos(), angles.sin(), slots, backend="reference")
    write_latent_cache(cache, latent, k_rope, angles.cos(), angles.sin(), slots, backend="triton")
    torch.testing.assert_close(cache, expected, atol=torch.finfo(dtype).eps * 4, rtol=torch.finfo(dtype).eps * 2,
                               equal_nan=True)  # fmt: skip


def test_strided_inputs_and_mixed_devices_gpu():
    """On CUDA: strided index tensors and a last-dim-strided q give the contiguous call's bits (the
    launchers take row strides only), and a CPU length tensor beside CUDA q is refused by name."""
    cache, table = random_paged_cache([300, 0, 77], 96 + 32, 16, torch.bfloat16)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(3, 7, 128, device="cuda").to(torch.bfloat16)
    lens = torch.tensor([300, 0, 77], dtype=torch.int32, device="cuda")
    want = decode_attention(q, cache, lens, 0.1, 96, table, backend="triton")
    wide_lens = torch.stack((lens, lens * 0 - 9), dim=1)[:, 0]  # stride 2
    wide_table = torch.cat((table, table * 0 - 1), dim=1)[:, : table.shape[1]]  # row stride 2x
    wide_q = torch.stack((q, q * 0), dim=-1).flatten(-2)[..., ::2]  # last-dim stride 2
    assert not (wide_lens.is_contiguous() or wide_q.is_contiguous())
    got = decode_attention(wide_q, cache, wide_lens, 0.1, 96, wide_table, backend="triton")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cache_seqlens on cpu"):
        decode_attention(q, cache, lens.cpu(), 0.1, 96, table, backend="triton")


def test_decode_compiles_with_inductor_gpu():
    """torch.compile (inductor, fullgraph) around the custom op gives the eager result on CUDA."""
    seqlens = [5, 300, 64]
    cache, table = random_paged_cache(seqlens, 448 + 64, 64, torch.bfloat16, seed=3)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(3, 32, 512, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")

    def step(q, cache, lens, table):
        out, lse = decode_attention(q, cache, lens, 0.08, 448, table, backend="triton")
        return out.float().sum(-1) + lse

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, cache, lens, table), step(q, cache, lens, table), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float8_e4m3fn)],
    ids=["fp32", "bf16", "bf16-fp8-cache"],
)
def test_converted_model_triton_matches_reference_gpu(dtype, cache_dtype):
    """A converted tiny Qwen3 on CUDA: prefill + decode logits through the kernels (fused cache write
    included) vs the reference backend."""
    pytest.importorskip("transformers")
    import m2la
    import tiny_hf
    from m2la.backends import use_backend
    from m2la.evaluation import _cache_keyword

    model = tiny_hf.build("qwen3", 6, 2, 16)
    m2la.convert(model)
    model = model.to("cuda", dtype)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: kv_start in decode, per-sequence prefill
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    keyword = _cache_keyword(model)  # `cache` in transformers 5, `past_key_values` before
    with use_backend("reference"):
        expected = model.generate(**kwargs, **{keyword: m2la.M2LACache.for_model(model, cache_dtype)})
    with use_backend("triton"):
        got = model.generate(**kwargs, **{keyword: m2la.M2LACache.for_model(model, cache_dtype)})
    assert all(torch.isfinite(step).all() for step in expected.logits), "reference backend produced NaN/inf"
    assert all(torch.isfinite(step).all() for step in got.logits), "triton backend produced NaN/inf"
    if dtype == torch.float32:  # same tokens, so every step's logits are comparable
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-3, rtol=2e-3)
    else:  # bf16 rounding may flip a later argmax; the prefill step sees identical inputs
        torch.testing.assert_close(got.logits[0].float(), expected.logits[0].float(), atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize(
    "layout",
    [(7, 120, 24, 20, 40), (32, 1024, 0, 512, 128)],
    ids=["7-heads-120+40", "lossless-shape-1024+1024"],
)
def test_module_bf16_error_within_twice_torch_gpu(layout):
    """A bf16 `M2LAttention` (heads, rank, nope, RoPE pairs, value dims; biases on) over one cache:
    a 300-token prefill, two decode steps and a 77-token chunk, through the kernels and the fused cache
    write. Its error against the fp32 module stays within 2x the bf16 torch run's. The second layout
    has a lossless conversion's widths (every key dim RoPE), whose decode and prefill tiles shrink to
    fit shared memory."""
    from kernel_cases import module_errors_vs_fp32

    torch_error, triton_error = module_errors_vs_fp32(layout, [300, 1, 1, 77], torch.bfloat16, device="cuda")
    assert torch_error > 0 and triton_error <= 2 * torch_error + 1e-4, (triton_error, torch_error)


@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
def test_prefill_without_nope_dims_gpu(mode):
    """n = 0 (a lossless conversion whose key dims all carry RoPE): the nope loop must compile out.
    On sm_90 the zero-trip pipelined loop once gave wrong results and illegal memory accesses."""
    heads, kv_rank, rope_dim, t = 6, 32, 32, 40
    cache = torch.randn(2, t, kv_rank + rope_dim, device="cuda").half()
    q_nope = torch.randn(2 * t, heads, 0, device="cuda").half()
    q_rope = torch.randn(2 * t, heads, rope_dim, device="cuda").half()
    w_uk = torch.randn(heads, kv_rank, 0, device="cuda").half()
    w_uv = (torch.randn(heads, kv_rank, 16, device="cuda") / kv_rank**0.5).half()
    cu = torch.tensor([0, t, 2 * t], dtype=torch.int32, device="cuda")
    lens = torch.tensor([t, t], dtype=torch.int32, device="cuda")
    args = (cu, lens, 0.25)
    out, _ = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, *args, max_seqlen_q=t, mode=mode, backend="triton")
    f32 = [x.float() for x in (q_nope, q_rope, cache, w_uk, w_uv)]
    ref, _ = prefill_attention(*f32, *args, backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def fp8_paged_case(seqlens, width, fp8_dtype, seed):
    """fp8 cache + per-token scales on the GPU (NaN in unused slots), 64-token pages."""
    cache, scale, table, _ = random_quantized_paged_cache(seqlens, width, 64, fp8_dtype, seed=seed)
    return cache.cuda(), scale.cuda(), table.cuda()


@pytest.mark.parametrize(
    "fp8_dtype,config",
    [
        (torch.float8_e4m3fn, None),
        (torch.float8_e4m3fn, dict(HEADS_ON_N=True, LATENT_PIECES=False, num_warps=4, BLOCK_N=64)),
        (torch.float8_e4m3fn, dict(LATENT_PIECES=True, TRANSPOSED_KEYS=True)),
        (torch.float8_e4m3fn, dict(LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True)),
        (torch.float8_e4m3fn, dict(FP8_AS_FP16=True, BLOCK_N=32)),
        (torch.float8_e4m3fn, dict(PAGE_TILE=False)),
        (torch.float8_e5m2, None),
        (torch.float8_e5m2, dict(LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True)),
    ],
    ids=[
        "e4m3-default",
        "e4m3-heads-on-n",
        "e4m3-transposed-keys",
        "e4m3-transposed-keys-fp16",
        "e4m3-fp16-bn32",
        "e4m3-row-gather",
        "e5m2-default",
        "e5m2-transposed-keys-fp16",
    ],  # fmt: skip
)
@pytest.mark.parametrize("kv_rank,rope_dim", [(448, 64), (896, 128)])
def test_decode_fp8_cache_gpu(kv_rank, rope_dim, config, fp8_dtype):
    """bf16 queries over an fp8 cache: against the fp32 reference over the same dequantized rows,
    within 2x the error of torch doing the same math in bf16."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    seqlens = [0, 1, 63, 1000, 4097]
    cache, scale, table = fp8_paged_case(seqlens, kv_rank + rope_dim, fp8_dtype, seed=kv_rank)
    q = torch.randn(len(seqlens), 32, kv_rank + rope_dim, device="cuda").to(torch.bfloat16)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    sm_scale = (128 + rope_dim) ** -0.5
    out, lse = latent_decode_triton(q, cache, lens, sm_scale, kv_rank, table, config=config, kv_scale=scale)
    ref_out, ref_lse = decode_attention(q.float(), cache, lens, sm_scale, kv_rank, table, kv_scale=scale,
                                        backend="reference")  # fmt: skip
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    rows = (cache.float() * scale[..., None]).nan_to_num(0.0).to(torch.bfloat16)
    within_budget(out, decode_lowp_torch(q, rows, table, lens, sm_scale, kv_rank), ref_out, f"fp8 decode {config}")


def test_cache_write_fp8_gpu():
    """The fused fp8 write gives the reference's bits (one round-to-nearest-even) and scales."""
    tokens, kv_rank, pairs = 1000, 448, 32
    latent = torch.randn(tokens, kv_rank, device="cuda").to(torch.bfloat16)
    latent[:, ::5] *= 1e-4  # subnormal range after scaling
    k_rope = torch.randn(tokens, 2 * pairs, device="cuda").to(torch.bfloat16)
    angles = torch.rand(tokens, pairs, device="cuda") * 6.28
    slots = torch.randperm(64 * 32, device="cuda")[:tokens]
    slots[::7] = -1
    results = []
    for backend in ("reference", "triton"):
        cache = torch.zeros(32, 64, kv_rank + 2 * pairs, device="cuda", dtype=torch.float8_e4m3fn)
        scale = torch.full((32, 64), float("nan"), device="cuda")
        write_latent_cache(cache, latent, k_rope, angles.cos(), angles.sin(), slots, kv_scale=scale, backend=backend)
        results.append((cache.view(torch.uint8), scale))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
def test_prefill_fp8_cache_gpu(mode):
    cache, scale, table = fp8_paged_case(PREFILL_SEQLENS, PREFILL_RANK + PREFILL_ROPE, torch.float8_e4m3fn, seed=3)
    dtype = torch.bfloat16
    q_nope, q_rope, w_uk, w_uv, args = prefill_gpu_inputs(dtype, table)
    cu, lens = args[:2]
    out, lse = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, *args, kv_scale=scale, mode=mode, backend="triton")
    f32 = [t.float() for t in (q_nope, q_rope)]
    ref_out, ref_lse = prefill_attention(*f32, cache, w_uk.float(), w_uv.float(), *args, kv_scale=scale,
                                         backend="reference")  # fmt: skip
    rows = (cache.float() * scale[..., None]).nan_to_num(0.0).to(dtype)
    lowp_out = prefill_lowp_torch(q_nope, q_rope, rows, w_uk, w_uv, cu, lens, args[2], table)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(lse, ref_lse, atol=5e-2, rtol=1e-3)
    within_budget(out, lowp_out, ref_out, f"fp8 prefill {mode}")


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["fp32-cache", "fp8-cache"])
def test_static_cache_generate_replays_cuda_graphs_gpu(cache_dtype):
    """generate() over an M2LAStaticCache on CUDA: transformers auto-compiles the decode step
    (inductor, mode="reduce-overhead"), CUDA graphs replay it without a skip, and the tokens and
    logits match eager decoding through a growing M2LACache (fp32 model, Triton backend)."""
    pytest.importorskip("transformers")
    import m2la
    import tiny_hf
    from m2la.backends import use_backend

    model = tiny_hf.build("qwen3", 6, 2, 16)
    m2la.convert(model)
    model = model.to("cuda")
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 40), generator=torch.Generator().manual_seed(2)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with use_backend("triton"):
        expected = model.generate(**kwargs, cache=m2la.M2LACache.for_model(model, cache_dtype))
        cache = m2la.M2LAStaticCache.for_model(model, 64, batch_size=2, dtype=cache_dtype)
        got = model.generate(**kwargs, cache=cache)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "generate() did not compile the decode step"
    inductor = torch._dynamo.utils.counters["inductor"]
    assert not any(k.startswith("cudagraph_skips") and v for k, v in inductor.items()), dict(inductor)
    assert torch.equal(got.sequences, expected.sequences) and int(cache.get_seq_length()) == 49
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-3, rtol=2e-3)
    torch._dynamo.reset()


@pytest.mark.parametrize("fp8", [False, True])
def test_bench_times_cuda_graph_replays_gpu(fp8):
    """`m2la bench` on a GPU: the Triton kernels pass the error gate in bf16 and every row is timed
    from a CUDA graph (decode and prefill are sync-free), 7 heads over a 60-wide head dim."""
    from m2la.kernels import bench

    shape = bench.BenchShape(heads=7, kv_rank=120, rope_dim=40, nope_dim=60, value_dim=48, kv_heads=7, head_dim=60)
    decode = bench.decode_benchmark(shape, batches=(3,), contexts=(1000,), device="cuda", backend="triton", fp8=fp8,
                                    repeats=3)  # fmt: skip
    assert "m2la decode (triton)" in decode.checks[0]
    assert {row.timing for row in decode.rows} == {"cuda graph"} and all(row.ms > 0 for row in decode.rows)
    assert decode.gemm_tflops > 10 and all(decode.gemm_share(row) > 0 for row in decode.rows)  # the compute roof
    lossless = bench.decode_benchmark(shape, batches=(3,), contexts=(1000,), device="cuda", backend="triton",
                                      lossless=True, repeats=3)  # fmt: skip
    assert {row.timing for row in lossless.rows} == {"cuda graph"} and lossless.speedup(lossless.rows[0]) is not None
    write = bench.write_benchmark(shape, tokens=(5, 3000), device="cuda", backend="triton", fp8=fp8, repeats=3)
    assert {row.timing for row in write.rows} == {"cuda graph"} and write.speedup(write.rows[0]) is not None
    for lossless in (False, True):
        prefill = bench.prefill_benchmark(shape, chunk=113, prefixes=(0, 300), batches=(1, 3), device="cuda",
                                          backend="triton", repeats=3, lossless=lossless, fp8=fp8)  # fmt: skip
        assert {row.timing for row in prefill.rows} == {"cuda graph"} and prefill.speedup(prefill.rows[0]) is not None
