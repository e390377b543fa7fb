"""Probe: could a TMA + wgmma decode tile serve 896 + 128? Compile facts on CPU; on a GPU, a timing.

The probe is not a library kernel (the library's tile is `config=dict(TMA=True, ...)`, timed beside
it with `--run`). A stripped heads-on-N decode loop for InternVideo3's layout (32 heads, r = 896
as 256 + 256 + 256 + 128, 2p = 128; no masks, no paging) that loads each cache tile with tensor
descriptors (TMA) straight into shared memory, so both MMAs read it there as wgmma operands. The
library's default 896 tile instead runs mma.sync over pointer loads (benchmarks/RESULTS.md). Prints
registers, spills, shared memory, wgmma and TMA counts per (BLOCK_N, warps, stages) for sm_90.

`--run` (CUDA, or the interpreter with TRITON_INTERPRET=1 and tiny shapes via `--smoke`): checks the
probe against the library's reference decode, then times it beside `latent_decode_triton` (the
library default, and the library's own TMA tile, `config=TMA=True`, which handles masks, kv_start
and both split placements; same contiguous cache, same split count; graph replay) and reports all
against the copy bandwidth. The probe's time leaves out the combine of its partials (a torch op here), so
it is an upper bound on what a full TMA tile would gain, not a library result.

Usage: python benchmarks/tma_decode_probe.py [--run [--smoke]]
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys

import torch
import triton
import triton.language as tl
from triton.compiler import ASTSource

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests" / "kernels"))
import compile_sm90  # noqa: E402  (the test helpers: ptxas log, buffer count)


@triton.jit
def _tma_decode_probe(desc_wide, desc_narrow, q_ptr, part_out_ptr, part_lse_ptr, rows_per_seq, split_len, scale_log2,
                      stride_q_b, stride_q_h, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    # grid (b, splits): split s of sequence b reads rows [s * split_len, (s + 1) * split_len), all visible
    seq = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * split_len
    hi = lo + split_len
    offs_h = tl.arange(0, BLOCK_H)
    wide, narrow = tl.arange(0, 256), tl.arange(0, 128)
    q_cols = q_ptr + seq * stride_q_b + offs_h[None, :] * stride_q_h  # [1, BLOCK_H]
    q0 = tl.load(q_cols + wide[:, None])  # [256, BLOCK_H] latent query pieces, transposed
    q1 = tl.load(q_cols + 256 + wide[:, None])
    q2 = tl.load(q_cols + 512 + wide[:, None])
    q3 = tl.load(q_cols + 768 + narrow[:, None])
    q_rope = tl.load(q_cols + 896 + narrow[:, None])
    acc0 = tl.zeros([256, BLOCK_H], tl.float32)
    acc1 = tl.zeros([256, BLOCK_H], tl.float32)
    acc2 = tl.zeros([256, BLOCK_H], tl.float32)
    acc3 = tl.zeros([128, BLOCK_H], tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        row = seq * rows_per_seq + start
        k0 = desc_wide.load([row, 0])  # [BLOCK_N, 256], TMA into shared memory
        k1 = desc_wide.load([row, 256])
        k2 = desc_wide.load([row, 512])
        k3 = desc_narrow.load([row, 768])
        k_rope = desc_narrow.load([row, 896])
        scores_t = tl.dot(k0, q0)  # [BLOCK_N, BLOCK_H]
        scores_t = tl.dot(k1, q1, scores_t)
        scores_t = tl.dot(k2, q2, scores_t)
        scores_t = tl.dot(k3, q3, scores_t)
        scores_t = tl.dot(k_rope, q_rope, scores_t) * scale_log2
        m_new = tl.maximum(m_i, tl.max(scores_t, axis=0))
        probs_t = tl.exp2(scores_t - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(probs_t, axis=0)
        probs_t = probs_t.to(k0.dtype)
        acc0 = tl.dot(tl.trans(k0), probs_t, acc0 * alpha[None, :])  # [256, BLOCK_H] += K^T P^T
        acc1 = tl.dot(tl.trans(k1), probs_t, acc1 * alpha[None, :])
        acc2 = tl.dot(tl.trans(k2), probs_t, acc2 * alpha[None, :])
        acc3 = tl.dot(tl.trans(k3), probs_t, acc3 * alpha[None, :])
        m_i = m_new
    program = seq * tl.num_programs(1) + split
    po = part_out_ptr + program * BLOCK_H * 896 + offs_h[None, :] * 896  # partials [b, splits, h, 896]
    tl.store(po + wide[:, None], acc0 / l_i[None, :])
    tl.store(po + 256 + wide[:, None], acc1 / l_i[None, :])
    tl.store(po + 512 + wide[:, None], acc2 / l_i[None, :])
    tl.store(po + 768 + narrow[:, None], acc3 / l_i[None, :])
    tl.store(part_lse_ptr + program * BLOCK_H + offs_h, m_i + tl.log2(l_i))  # base 2


def probe(block_n: int, num_warps: int, num_stages: int) -> dict:
    signature = {
        "desc_wide": f"tensordesc<bf16[{block_n},256]>", "desc_narrow": f"tensordesc<bf16[{block_n},128]>",
        "q_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "rows_per_seq": "i32",
        "split_len": "i32", "scale_log2": "fp32", "stride_q_b": "i32", "stride_q_h": "i32",
        "BLOCK_N": "constexpr", "BLOCK_H": "constexpr",
    }  # fmt: skip
    divisible = {(i,): [["tt.divisibility", 16]] for i in (2, 3, 4, 5, 6, 8, 9)}
    src = ASTSource(fn=_tma_decode_probe, signature=signature, constexprs={"BLOCK_N": block_n, "BLOCK_H": 32},
                    attrs=divisible)  # fmt: skip
    return compile_sm90.compile_facts(*compile_sm90.ptxas_compile(src, num_warps, num_stages))


def run_probe(q, cache, split_len, softmax_scale, block_n, num_warps, num_stages):
    """The probe over a contiguous cache `[b, s, 1024]` (s a multiple of split_len, every row
    visible) -> partial outputs `[b, splits, h, 896]` fp32 and base-2 LSEs `[b, splits, h]`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, rows, width = cache.shape
    splits = rows // split_len
    flat = cache.view(batch * rows, width)
    wide = TensorDescriptor.from_tensor(flat, [block_n, 256])
    narrow = TensorDescriptor.from_tensor(flat, [block_n, 128])
    part_out = torch.empty(batch, splits, q.shape[1], 896, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, splits, q.shape[1], device=q.device, dtype=torch.float32)
    _tma_decode_probe[(batch, splits)](
        wide, narrow, q, part_out, part_lse, rows, split_len, softmax_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), BLOCK_N=block_n, BLOCK_H=q.shape[1],
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return part_out, part_lse


def combine(part_out, part_lse):
    """Merge the probe's splits in torch -> `[b, h, 896]`."""
    weights = torch.softmax(part_lse * math.log(2), dim=1)  # [b, splits, h]
    return (part_out * weights[..., None]).sum(1)


# (BLOCK_N, warps, stages): the probe variants compiled, and those timed (they fit sm_90's shared memory)
VARIANTS = [(64, 8, 1), (64, 8, 2), (64, 4, 1), (64, 16, 1), (32, 4, 2)]
TIMED = [(64, 8, 1), (64, 4, 1), (64, 16, 1)]


def case_rows(batch: int, context: int, variants: list, device, dtype, bandwidth: float | None) -> list[str]:
    """One decode shape: the library default and each probe variant, checked against the fp32
    reference and (with `bandwidth`, on CUDA) timed from CUDA graphs. Table rows."""
    from m2la.kernels import decode_attention
    from m2la.kernels.latent_decode.triton import decode_plan, latent_decode_triton

    scale = 192**-0.5
    cache = torch.randn(batch, context, 1024, device=device).to(dtype)
    q = torch.randn(batch, 32, 1024, device=device).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    ref, _ = decode_attention(q.float(), cache.float(), lens, scale, 896, None, backend="reference")
    nbytes = batch * context * 1024 * dtype.itemsize
    rows, library_ms, sdpa_ms = [], None, None
    if bandwidth:  # the baseline: SDPA over Qwen3-VL-8B's uncompressed GQA cache (8 x 128)
        import gpu_kernels  # noqa: PLC0415  (timing helpers; same folder)

        keys, values = (torch.randn(batch, context, 8, 128, device=device).to(dtype) for _ in range(2))
        q_gqa = torch.randn(batch, 1, 32, 128, device=device).to(dtype)
        sdpa_ms = gpu_kernels.graph_ms(lambda: gpu_kernels._sdpa_gqa(q_gqa, keys, values), device, 20)
        del keys, values

    def report(name, timed_fn, output_fn) -> float | None:
        diff = (output_fn().float() - ref).abs().max().item()
        assert diff < (3e-2 if bandwidth else 1e-3), (name, diff)
        if not bandwidth:
            rows.append(f"| {batch} | {context} | {name} | {diff:.1e} | n/a | n/a | n/a | n/a |")
            return None
        import gpu_kernels  # noqa: PLC0415  (timing helpers; same folder)

        ms = gpu_kernels.graph_ms(timed_fn, device, 20)
        ratio = f"{library_ms / ms:.2f}" if library_ms else "1.00"
        rows.append(f"| {batch} | {context} | {name} | {diff:.1e} | {ms:.3f} | {100 * nbytes / ms / 1e6 / bandwidth:.0f} "
                    f"| {ratio} | {sdpa_ms / ms:.2f} |")  # fmt: skip
        return ms

    def library():
        return latent_decode_triton(q, cache, lens, scale, 896)[0]

    def library_tma():  # the library's TMA tile (config TMA=True), same cache
        return latent_decode_triton(q, cache, lens, scale, 896, config=compile_sm90.TMA_896)[0]

    library_ms = report("library default (split + combine kernels)", library, library)
    tile = compile_sm90.TMA_896
    name = f"library TMA tile: {tile['BLOCK_N']} tokens, {tile['num_warps']} warps, {tile['num_stages']} stage"
    report(name + " (split + combine kernels)", library_tma, library_tma)
    splits = decode_plan(q, cache, 896, None)[1]
    for block_n, num_warps, num_stages in variants:
        split_len = max(block_n, context // splits // block_n * block_n)
        while context % split_len:  # the probe has no masks: whole splits of whole tiles only
            split_len -= block_n
        probe_call = functools.partial(run_probe, q, cache, split_len, scale, block_n, num_warps, num_stages)
        name = f"TMA probe: {block_n} tokens, {num_warps} warps, {num_stages} stage{'s' if num_stages > 1 else ''}"
        report(name + " (split kernel only)", probe_call, lambda call=probe_call: combine(*call()))
    return rows


def run(smoke: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = [(16, 4, 1), (16, 8, 1)] if smoke else TIMED
    cases = [(1, 64)] if smoke else [(1, 32768), (8, 32768), (32, 32768), (8, 131072)]
    bandwidth = None
    if device.type == "cuda":
        import gpu_kernels  # noqa: PLC0415  (timing helpers; same folder)

        bandwidth = gpu_kernels.copy_bandwidth_gbs(device, 2**30)
        print(
            f"{torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth:.0f} GB/s, triton {triton.__version__}\n"
        )
    print("x SDPA: SDPA's graph ms over Qwen3-VL-8B's uncompressed GQA cache (8 x 128, same batch and context)"
          " / this row's (the issue's target: 2 at 32K).\n")  # fmt: skip
    print(
        "| batch | context | kernel | max diff vs fp32 reference | graph ms | % of copy BW | library / this | x SDPA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch, context in cases:
        print("\n".join(case_rows(batch, context, variants, device, dtype, bandwidth)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="store_true", help="check and time the probe (CUDA, or the interpreter)")
    parser.add_argument("--smoke", action="store_true", help="with --run: tiny shapes (CPU interpreter)")
    args = parser.parse_args()
    if args.run:
        run(args.smoke)
        return
    print(f"triton {triton.__version__}, sm_90, bf16, 32 heads, 896 + 128\n")
    print(
        "| BLOCK_N | warps | stages | registers | spill stores B | shared KiB | wgmma | mma.sync | TMA copies | buffers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for block_n, num_warps, num_stages in VARIANTS:
        f = probe(block_n, num_warps, num_stages)
        print(f"| {block_n} | {num_warps} | {num_stages} | {f['registers']} "
              f"| {f['spill_stores']} | {f['shared'] / 1024:.0f} | {f['wgmma']} | {f['mma_sync']} | {f['tma']} "
              f"| {f['buffers']} |")  # fmt: skip


if __name__ == "__main__":
    main()
