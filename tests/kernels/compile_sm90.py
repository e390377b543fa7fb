"""Compile the decode/prefill kernels for sm_90 without a GPU; print JSON facts about the result.

Run in a process WITHOUT TRITON_INTERPRET (the interpreter replaces the compiler).
Usage: python compile_sm90.py  -> {"<case>": {"shared": bytes, "wgmma": count, "registers": per thread,
"spill_stores": bytes (ptxas -v), ...}, ...}
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from m2la.kernels.cache_write import triton as cache_write
from m2la.kernels.latent_decode import triton as decode
from m2la.kernels.latent_prefill import triton as prefill


def signature(kernel, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp16")
        elif name.startswith("scale") or name == "fp8_max":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


H100_MAX_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90
SM89_MAX_SHARED_BYTES = 99 * 1024  # the same on sm_86 / sm_89 (RTX 30xx / 40xx, L4, L40S)


# Integer arguments whose runtime values are not multiples of 16 for the cases below (a split count,
# a count of value tiles, query length sums); every other pointer and integer argument is, and the
# launcher's JIT specialises those as 16-divisible, which is what lets loads vectorise.
NOT_DIVISIBLE = {
    "num_value_tiles",
    "stride_pl_h",
    "num_splits",
    "max_seqlen_q",
    "num_head_tiles",
    "num_query_tiles",
    "head_group",
    "kv_group_size",
    "tokens_per_block",
    "blocks_per_seq",
}


def divisibility_attrs(kernel, sig: dict[str, str]) -> dict:
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if sig[name] != "constexpr" and sig[name] != "fp32" and name not in NOT_DIVISIBLE
    }


def ptxas_compile(src, num_warps, num_stages, arch=90, **options):
    """triton.compile for sm_90 (or `arch`), always running ptxas (no cache hit), with ptxas's `-v`
    log captured; `options`: launch options the launcher passes (`enable_fp_fusion`, ...)."""
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        with contextlib.redirect_stdout(log):  # triton prints the log it asked ptxas for
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=num_warps, num_stages=num_stages, **options),
            )
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return compiled, log.getvalue()


def register_facts(ptxas_log: str) -> dict:
    """Registers per thread and bytes spilled to local memory, from ptxas's -v log (last function)."""
    registers = re.findall(r"Used (\d+) registers", ptxas_log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return {
        "registers": int(registers[-1]) if registers else None,
        "spill_stores": int(spills[-1][0]) if spills else None,
        "spill_loads": int(spills[-1][1]) if spills else None,
    }


def pipelined_buffers(ttgir: str) -> int:
    """How many copies of the loop's loaded tiles the software pipeliner keeps in shared memory: the
    leading dim of its multi-buffered allocations (`memdesc<2x64x512xbf16>` -> 2); 1 when the tiles
    are staged once per iteration (no prefetch of the next tile), 0 when nothing is staged."""
    staged = re.findall(r"ttg\.local_alloc[^\n]*?!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)
    return max((int(n) for n in staged), default=0)


def float_negations(ttgir: str) -> int:
    """Float negations in the TTGIR: `arith.negf`, or `0.0 - x`, which is what triton 3.6 makes of a
    float `-x` (and which turns -0 into +0)."""
    zeros = set(re.findall(r"(%cst\w*) = arith\.constant dense<0\.000000e\+00> : tensor<[^>]*xf32", ttgir))
    from_zero = sum(1 for name in re.findall(r"arith\.subf (%cst\w*),", ttgir) if name in zeros)
    return from_zero + len(re.findall(r"arith\.negf", ttgir))


def compile_sm90(kernel, pointer_types, constexprs, num_warps, num_stages, arch=90, **options):
    sig = signature(kernel, pointer_types, constexprs)
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=divisibility_attrs(kernel, sig))
    return compile_facts(*ptxas_compile(src, num_warps, num_stages, arch, **options))


def compile_facts(compiled, ptxas_log: str) -> dict:
    """Registers, spills, buffers, shared memory and instruction counts of one sm_90 compile."""
    ptx = compiled.asm["ptx"]
    return {
        **register_facts(ptxas_log),
        "buffers": pipelined_buffers(compiled.asm["ttgir"]),
        "shared": compiled.metadata.shared,
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),  # pipelined global -> shared copies
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),  # TMA copies (tensor descriptors)
        "ld_global": len(re.findall(r"\bld\.global", ptx)),
        "cvt_bf16_f16": len(re.findall(r"\bcvt\.bf16\.f16", ptx)),  # the 2nd step of fp8 -> bf16 widening
        "float_negations": float_negations(compiled.asm["ttgir"]),
        "fma_f32": len(re.findall(r"\bfma\.rn\.f32", ptx)),  # fused multiply-adds (one rounding)
        "div_approx_f32": len(re.findall(r"\bdiv\.(?:full|approx)\.f32", ptx)),  # non-IEEE divisions
        "local_bytes": sum(int(n) for n in re.findall(r"\.local \.align \d+ \.b8 \w+\[(\d+)\]", ptx)),
    }


# The TMA tile configs the GPU probe times (`benchmarks/tma_decode_probe.py`): heads on N, latent
# pieces, one stage (two copies of a 64-token 896 + 128 tile do not fit), 8 and 4 warps.
TMA_896 = dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True, BLOCK_N=64, num_warps=8, num_stages=1)
TMA_448 = dict(HEADS_ON_N=True, LATENT_PIECES=True, TMA=True, BLOCK_N=64, num_warps=4, num_stages=2)


def decode_case(
    heads, kv_rank, rope_dim, dtype="fp16", cache_dtype=None, paged=True, packed=False, rope_only=False, arch=90,
    shared_limit=H100_MAX_SHARED_BYTES, **overrides,
):  # fmt: skip
    """`cache_dtype` "fp8e4nv": an fp8 cache with per-token scales, q in `dtype`; `paged=False`: a
    contiguous `[b, s, r + 2p]` cache (what TMA tiles read); `packed`: query blocks of a chunk's
    tokens x the heads on the rows (a chunked prefill's decode route); `rope_only`: an n = 0
    layer's RoPE-only queries; `arch`: another target, whose shared memory `shared_limit` is where
    the launcher's BLOCK_N halving stops."""
    fp8 = cache_dtype is not None and cache_dtype.startswith("fp8")
    cfg = {**decode.decode_config(heads, kv_rank, rope_dim, interpret=False, fp8=fp8), **overrides}
    cfg = decode.resolve_latent_pieces(cfg, kv_rank)
    kernel, tiles = decode.split_kernel_for(cfg, kv_rank)
    consts = dict(PAGED=paged, PAGE_TILE=cfg["PAGE_TILE"], HAS_KV_START=False, DOT_PRECISION="tf32",
                  HAS_SCALE=cache_dtype is not None, SPLIT_BY_LENGTH=cfg.get("SPLIT_BY_LENGTH", True),
                  PACKED=packed, ROPE_ONLY=rope_only, BLOCK_N=cfg["BLOCK_N"], **tiles)  # fmt: skip
    ptrs = {"q_ptr": f"*{dtype}", "kv_ptr": f"*{cache_dtype or dtype}", "block_table_ptr": "*i32",
            "seqlens_ptr": "*i32", "kv_start_ptr": "*i32", "kv_scale_ptr": "*fp32", "cu_seqlens_q_ptr": "*i32",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}  # fmt: skip
    while True:  # like the launcher: halve BLOCK_N until the tile fits the shared memory
        facts = compile_sm90(kernel, ptrs, consts, cfg["num_warps"], cfg["num_stages"], arch)
        if facts["shared"] <= shared_limit or consts["BLOCK_N"] <= 16:
            return {**facts, "BLOCK_N": consts["BLOCK_N"]}
        consts["BLOCK_N"] //= 2


def grouped_decode_case(heads, groups, head_dim, dtype="bf16", cache_dtype=None, tokens_per_seq=1, paged=True):
    """`_decode_split_kernel_grouped` at its default tiles (`grouped_decode_config`), paged (or a
    contiguous cache with left padding); `tokens_per_seq` > 1: packed query blocks (a chunked
    prefill's decode route)."""
    cfg = decode.grouped_decode_config(heads // groups, head_dim, head_dim // 2, False, tokens_per_seq)
    consts = dict(PAGED=paged, PAGE_TILE=paged and cfg["PAGE_TILE"], HAS_KV_START=not paged,
                  HAS_SCALE=cache_dtype is not None,
                  SPLIT_BY_LENGTH=True, DOT_PRECISION="tf32", PACKED=tokens_per_seq > 1,
                  **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})  # fmt: skip
    ptrs = {"q_ptr": f"*{dtype}", "kv_ptr": f"*{cache_dtype or dtype}", "block_table_ptr": "*i32",
            "seqlens_ptr": "*i32", "kv_start_ptr": "*i32", "kv_scale_ptr": "*fp32", "cu_seqlens_q_ptr": "*i32",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}  # fmt: skip
    return compile_sm90(decode._decode_split_kernel_grouped, ptrs, consts, cfg["num_warps"], cfg["num_stages"])


def prefill_case(value_dim, rope_dim, nope_dim, dtype="fp16", cache_dtype=None, paged=True, arch=90, **overrides):
    """Expanded mode: `nope_dim` 128 (per-head keys, resident queries); absorbed: `nope_dim` = r.
    `cache_dtype` "fp8e4nv": absorbed mode over an fp8 cache (keys and values), queries in `dtype`.
    `overrides`: entries of `prefill_config`, as `config=` gives them."""
    split = overrides.pop("ROPE_SPLIT", False)
    cfg = {**prefill.prefill_config(value_dim, interpret=False, nope_dim=nope_dim, rope_dim=rope_dim), **overrides}
    consts = dict(PAGED=paged, ROPE_SPLIT=split, HAS_NOPE=nope_dim > 0, HAS_KV_START=True, DOT_PRECISION="tf32",
                  BLOCK_ROPE=max(16, triton.next_power_of_2(rope_dim)), HAS_SCALE=cache_dtype is not None,
                  SINGLE_D=nope_dim > 0 and cfg["BLOCK_D"] >= nope_dim)  # fmt: skip
    consts.update({k: v for k, v in cfg.items() if k.startswith("BLOCK")})
    consts["TMA"] = bool(cfg.get("TMA"))
    consts.setdefault("ROPE_SPLIT", False)
    if not consts["ROPE_SPLIT"]:
        consts["kv_group_size"] = 1  # the launcher's JIT specialises a 1 into a constant
    ptrs = {"block_table_ptr": "*i32", "cu_seqlens_q_ptr": "*i32", "seqlens_ptr": "*i32", "kv_start_ptr": "*i32",
            "kv_scale_ptr": "*fp32", "out_ptr": "*fp32", "lse_ptr": "*fp32"}  # fmt: skip
    ptrs.update({n: f"*{dtype}" for n in ("q_nope_ptr", "q_rope_ptr")})
    ptrs.update({n: f"*{cache_dtype or dtype}" for n in ("k_nope_ptr", "k_rope_ptr", "v_ptr")})
    return compile_sm90(prefill._prefill_kernel, ptrs, consts, cfg["num_warps"], cfg["num_stages"], arch)


def grouped_prefill_case(head_dim, dtype="bf16", cache_dtype=None):
    """`grouped_prefill_attention`'s flash tiles at their defaults: one KV group's keys (its 2 x P
    RoPE columns, `ROPE_SPLIT`) and values read from the paged cache, shared by the group's heads
    (how many is a runtime argument, so one compile serves every head count)."""
    return prefill_case(head_dim, head_dim, 0, dtype, cache_dtype, paged=True, ROPE_SPLIT=True)


def cache_write_case(kv_rank, rope_dim, cache_dtype="fp8e4nv"):
    consts = dict(BLOCK_T=16, BLOCK_R=triton.next_power_of_2(kv_rank), BLOCK_P=triton.next_power_of_2(rope_dim // 2),
                  HAS_SCALE=cache_dtype.startswith("fp8"), FP8_MANTISSA=3, FP8_MIN_NORMAL_EXP=-6)  # fmt: skip
    ptrs = {"latent_ptr": "*bf16", "k_rope_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
            "cache_ptr": f"*{cache_dtype}", "kv_scale_ptr": "*fp32"}  # fmt: skip
    return compile_sm90(cache_write._cache_write_kernel, ptrs, consts, 4, 1, **cache_write.COMPILE_OPTIONS)


def _compiles(make) -> bool:
    """Whether `make()` compiles; False on triton's "type not supported in this architecture"."""
    try:
        make()
    except Exception as error:  # noqa: BLE001  (triton's CompilationError wraps the ValueError)
        if "not supported in this architecture" in str(error):
            return False
        raise
    return True


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    # an fp8 cache with the bf16 cache's tile (no fp8 options)
    bf16_tile = dict(LATENT_PIECES=False, BLOCK_N=64, FP8_AS_FP16=False, TRANSPOSED_KEYS=False)
    results = {
        "decode_h32_r896_rope128": decode_case(32, 896, 128),
        "decode_h32_r448_rope64_bf16": decode_case(32, 448, 64, "bf16"),
        "decode_h32_r896_rope128_bf16": decode_case(32, 896, 128, "bf16"),
        "decode_h64_r512_rope64_bf16": decode_case(64, 512, 64, "bf16"),
        "decode_h32_r448_rope64_bf16_heads_on_n": decode_case(32, 448, 64, "bf16", HEADS_ON_N=True),
        "decode_h128_r896_rope128": decode_case(128, 896, 128),
        "prefill_v128_rope128": prefill_case(128, 128, 128, paged=False),  # expanded (the host expands contiguous)
        # exact latent pieces (256 + 128 + 64, 512 + 256 + 128) against the padded next_pow2(r) tile
        "decode_h32_r448_rope64_bf16_pieces": decode_case(32, 448, 64, "bf16", HEADS_ON_N=True, LATENT_PIECES=True),
        "decode_h32_r896_rope128_bf16_heads_on_n_w8": decode_case(
            32, 896, 128, "bf16", HEADS_ON_N=True, LATENT_PIECES=False, num_warps=8
        ),
        "decode_h32_r896_rope128_bf16_pieces_w8": decode_case(
            32, 896, 128, "bf16", HEADS_ON_N=True, LATENT_PIECES=True, num_warps=8
        ),
        "decode_h32_r896_rope128_bf16_pieces_heads_on_m": decode_case(
            32, 896, 128, "bf16", LATENT_PIECES=True, BLOCK_N=32
        ),
        "decode_h32_r448_rope64_fp8": decode_case(32, 448, 64, "bf16", "fp8e4nv"),
        "decode_h32_r896_rope128_fp8": decode_case(32, 896, 128, "bf16", "fp8e4nv"),
        "decode_h32_r448_rope64_fp8_bf16_tile": decode_case(
            32, 448, 64, "bf16", "fp8e4nv", **bf16_tile, HEADS_ON_N=True, num_warps=4
        ),
        "decode_h32_r896_rope128_fp8_bf16_tile": decode_case(
            32, 896, 128, "bf16", "fp8e4nv", **bf16_tile, HEADS_ON_N=False, num_warps=8
        ),
        # fp8 halves the tile: heads on N fits at BLOCK_N 64 (bf16 needs 32) and runs on wgmma alone
        "decode_h32_r896_rope128_fp8_heads_on_n": decode_case(
            32, 896, 128, "bf16", "fp8e4nv", **bf16_tile, HEADS_ON_N=True, num_warps=4
        ),
        # fp8 options of the heads-on-M tile: a second, [D, N] load of the keys; MMAs in fp16
        "decode_h32_r448_rope64_fp8_transposed_keys": decode_case(
            32, 448, 64, "bf16", "fp8e4nv", LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=False
        ),
        "decode_h32_r448_rope64_fp8_transposed_keys_fp16": decode_case(
            32, 448, 64, "bf16", "fp8e4nv", LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True
        ),
        "decode_h32_r448_rope64_fp8_pieces": decode_case(
            32, 448, 64, "bf16", "fp8e4nv", LATENT_PIECES=True, FP8_AS_FP16=False
        ),
        "prefill_absorbed_r512_rope64_fp8": prefill_case(512, 64, 512, "bf16", "fp8e4nv"),
        # lossless conversions of GQA models: every key dim carries RoPE (n = 0, 2p = kv heads x 128)
        "prefill_v128_rope512_lossless": prefill_case(128, 512, 0, "bf16", paged=False),
        "prefill_v128_rope1024_lossless": prefill_case(128, 1024, 0, "bf16", paged=False),
        # ... and their decode: r = kv heads x 128 (keys' pass-through dims + values), 2p = kv heads x
        # 128 (Llama-3-8B: 8 kv heads; Qwen2.5-7B: 28 query heads over 4), and SmolLM2-135M's 3 x 64
        "decode_h32_r1024_rope1024_lossless": decode_case(32, 1024, 1024, "bf16"),
        "decode_h28_r512_rope512_lossless": decode_case(28, 512, 512, "bf16"),
        "decode_h9_r192_rope192_lossless": decode_case(9, 192, 192, "bf16"),
        # ... fine-tuned out of their grouped form (n = 0, plain decode): RoPE-only queries
        "decode_h32_r1024_rope1024_rope_only": decode_case(32, 1024, 1024, "bf16", rope_only=True),
        "decode_h28_r512_rope512_rope_only": decode_case(28, 512, 512, "bf16", rope_only=True),
        "decode_h9_r192_rope192_rope_only": decode_case(9, 192, 192, "bf16", rope_only=True),
        # the same three through the grouped decode (each KV group's heads read only its 2 x 128 columns)
        "grouped_decode_h32_g8_d128": grouped_decode_case(32, 8, 128),
        "grouped_decode_h28_g4_d128": grouped_decode_case(28, 4, 128),
        "grouped_decode_h9_g3_d64": grouped_decode_case(9, 3, 64),
        "grouped_decode_h32_g8_d128_fp8": grouped_decode_case(32, 8, 128, cache_dtype="fp8e4nv"),
        # packed query blocks of the plain decode: 2 tokens x 16 heads on the 32-head tiles' rows
        "decode_packed_h16_r896_rope128_bf16": decode_case(16, 896, 128, "bf16", packed=True, BLOCK_H=32),
        "decode_packed_h16_r448_rope64_bf16": decode_case(16, 448, 64, "bf16", packed=True, BLOCK_H=32),
        # ... and their short chunks: 16 tokens x 4 heads a group on 64 MMA rows
        "grouped_decode_packed_h32_g8_d128": grouped_decode_case(32, 8, 128, tokens_per_seq=16),
        "grouped_decode_packed_h9_g3_d64_contiguous": grouped_decode_case(9, 3, 64, tokens_per_seq=16, paged=False),
        "grouped_decode_packed_h32_g8_d128_fp8": grouped_decode_case(32, 8, 128, "bf16", "fp8e4nv", 16),
        # ... and their prefill through the grouped flash tiles (GQA's keys and values, no expansion)
        "grouped_prefill_d128": grouped_prefill_case(128),
        "grouped_prefill_d64": grouped_prefill_case(64),
        "grouped_prefill_d128_fp8": grouped_prefill_case(128, cache_dtype="fp8e4nv"),
        "cache_write_r448_rope64_fp8": cache_write_case(448, 64),
        # TMA tiles (contiguous caches): the cache tile goes global -> shared by TMA, both MMAs wgmma
        "decode_h32_r896_rope128_bf16_tma": decode_case(32, 896, 128, "bf16", paged=False, **TMA_896),
        "decode_h32_r448_rope64_bf16_tma": decode_case(32, 448, 64, "bf16", paged=False, **TMA_448),
        # expanded prefill with its keys and values by TMA (`config=dict(TMA=True)`)
        "prefill_v128_rope128_tma": prefill_case(128, 128, 128, "bf16", paged=False, TMA=True),
    }
    # the fp8 types by target, which `m2la.kernels._launch.E4M3_MIN_CAPABILITY` states: e5m2 compiles
    # for sm_80 (A100), e4m3 from sm_89 (Ada) only
    results["fp8_by_arch"] = {
        f"sm{arch}_{name}": _compiles(lambda arch=arch, dtype=dtype: decode_case(32, 448, 64, "bf16", dtype, arch=arch))
        for arch in (80, 89)
        for name, dtype in (("e4m3", "fp8e4nv"), ("e5m2", "fp8e5"))
    }
    # wide plain decodes on sm_89 (99 KiB): the default tiles do not fit even at 16 tokens, so the
    # launcher falls back to `NARROW_DECODE_TILES`
    sm89 = dict(arch=89, shared_limit=SM89_MAX_SHARED_BYTES)
    for name, (heads, width, rope_only) in {
        "h32_r1024_rope1024": (32, 1024, False),
        "h32_r1024_rope1024_rope_only": (32, 1024, True),
        "h28_r512_rope512": (28, 512, False),
    }.items():
        results[f"sm89_decode_{name}_default"] = decode_case(heads, width, width, "bf16", rope_only=rope_only, **sm89)
        narrow = decode.narrow_decode_tiles(width, packed=False)
        results[f"sm89_decode_{name}_narrow"] = decode_case(
            heads, width, width, "bf16", rope_only=rope_only, **sm89, **narrow
        )
    # Blackwell: the defaults compile for sm_100 (B200, sm_90's shared memory) and, after BLOCK_N
    # halving, for sm_120 (RTX 50xx, 99 KiB)
    results["blackwell"] = {
        "sm100_decode_h32_r896_rope128_bf16": decode_case(32, 896, 128, "bf16", arch=100),
        "sm100_decode_h32_r448_rope64_bf16": decode_case(32, 448, 64, "bf16", arch=100),
        "sm100_prefill_v128_rope128": prefill_case(128, 128, 128, "bf16", paged=False, arch=100),
        "sm120_decode_h32_r896_rope128_bf16": decode_case(32, 896, 128, "bf16", **{**sm89, "arch": 120}),
    }
    # arguments that change with lengths, which the launcher must not value-specialise (new variants)
    kernels = {"decode": decode._decode_split_kernel, "decode_heads_on_n": decode._decode_split_kernel_heads_on_n,
               "decode_grouped": decode._decode_split_kernel_grouped, "prefill": prefill._prefill_kernel}  # fmt: skip
    results["not_specialised"] = {
        name: [p.name for p in k.params if p.do_not_specialize] for name, k in kernels.items()
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
