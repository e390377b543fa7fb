"""Probe (compile-only, sm_90 on CPU): can plain Triton overlap a flash-attention tile's softmax with
the tensor cores, as FA3 and cuDNN do on an H100?

Prefill from an empty cache is the one GPU target still missed: the expanded attention kernel runs
1.13-1.18x slower than SDPA (benchmarks/RESULTS.md). Hopper hides the softmax behind wgmma either
with warp specialisation or by keeping the next key tile's QK^T in flight while the current tile's
softmax runs. This compiles a stripped forward loop at the expanded 896 + 128 tile (128 queries x
64 keys, qk width 256, value width 128, 8 warps, 3 stages, bf16) three ways:

- `plain`: the loop as `_prefill_kernel` writes it;
- `warp_specialized`: the same loop under `tl.range(..., warp_specialize=True)`;
- `scores_ahead`: the next tile's QK^T issued before the current tile's softmax, in the source.

and prints registers, spills, shared memory, wgmma count, `setmaxnreg` count (warp specialisation's
register split) and the pending-group counts of every `wgmma.wait_group` (0 everywhere: each MMA is
waited for before the next instruction that could overlap it).

Usage: python benchmarks/softmax_overlap_probe.py   (without TRITON_INTERPRET)
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests" / "kernels"))
import compile_sm90  # noqa: E402  (the test helpers: signature, ptxas log, facts)


@triton.jit
def _tile_start(q_ptr, stride_t, BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """A query tile's rows and columns, its queries `[M, D]` and the empty online-softmax state."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_v = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(q_ptr + offs_m[:, None] * stride_t + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    return offs_m, offs_d, offs_v, q, m_i, l_i, acc


@triton.jit
def _softmax_step(s, m_i, l_i, acc, v, scale_log2):
    """One key tile's online softmax and value product: s `[M, N]` fp32 scores -> (m, l, acc)."""
    s = s * scale_log2
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_new = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_new, acc


@triton.jit
def plain(q_ptr, k_ptr, v_ptr, o_ptr, n_keys, scale_log2, stride_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          D: tl.constexpr, DV: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):  # fmt: skip
    offs_m, offs_d, offs_v, q, m_i, l_i, acc = _tile_start(q_ptr, stride_t, BLOCK_M, D, DV)
    for start in tl.range(0, n_keys, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + offs_n[:, None] * stride_t + offs_d[None, :])  # [N, D]
        v = tl.load(v_ptr + offs_n[:, None] * stride_t + offs_v[None, :])  # [N, DV]
        m_i, l_i, acc = _softmax_step(tl.dot(q, tl.trans(k)), m_i, l_i, acc, v, scale_log2)
    tl.store(o_ptr + offs_m[:, None] * stride_t + offs_v[None, :], acc / l_i[:, None])


@triton.jit
def scores_ahead(q_ptr, k_ptr, v_ptr, o_ptr, n_keys, scale_log2, stride_t, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):  # fmt: skip
    offs_m, offs_d, offs_v, q, m_i, l_i, acc = _tile_start(q_ptr, stride_t, BLOCK_M, D, DV)
    offs_n = tl.arange(0, BLOCK_N)
    s = tl.dot(q, tl.trans(tl.load(k_ptr + offs_n[:, None] * stride_t + offs_d[None, :])))  # tile 0's scores
    for start in range(BLOCK_N, n_keys, BLOCK_N):
        offs_next = start + tl.arange(0, BLOCK_N)
        s_next = tl.dot(q, tl.trans(tl.load(k_ptr + offs_next[:, None] * stride_t + offs_d[None, :])))
        v = tl.load(v_ptr + (offs_next - BLOCK_N)[:, None] * stride_t + offs_v[None, :])
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v, scale_log2)  # the previous tile, after s_next issued
        s = s_next
    v = tl.load(v_ptr + (n_keys - BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * stride_t + offs_v[None, :])
    m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v, scale_log2)
    tl.store(o_ptr + offs_m[:, None] * stride_t + offs_v[None, :], acc / l_i[:, None])


def facts(kernel, warp_specialize: bool) -> dict:
    consts = dict(BLOCK_M=128, BLOCK_N=64, D=256, DV=128, WARP_SPECIALIZE=warp_specialize)
    sig = compile_sm90.signature(kernel, {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}, consts)
    sig["scale_log2"] = "fp32"
    attrs = compile_sm90.divisibility_attrs(kernel, sig)
    compiled, log = compile_sm90.ptxas_compile(compile_sm90.ASTSource(kernel, sig, consts, attrs), 8, 3)
    ptx = compiled.asm["ptx"]
    found = compile_sm90.compile_facts(compiled, log)
    return {
        **{key: found[key] for key in ("registers", "spill_stores", "shared", "wgmma", "buffers")},
        "fits_sm90": found["shared"] <= compile_sm90.H100_MAX_SHARED_BYTES,
        "setmaxnreg": len(re.findall(r"\bsetmaxnreg", ptx)),
        "wait_group_pending": [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)],
    }


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, bf16, 128 x 64 tile, qk 256, v 128, 8 warps, 3 stages")
    results = {
        "plain": facts(plain, False),
        "warp_specialized": facts(plain, True),
        "scores_ahead": facts(scores_ahead, False),
    }
    for name, found in results.items():
        print(name, json.dumps(found))


if __name__ == "__main__":
    main()
