"""Compile-only checks for sm_90 on CPU: every default decode/prefill config fits shared memory and
streams the cache through cp.async; the 64-head-tile decode (h > 32), the heads-on-N decode tile
(the default for h <= 32, r <= 512) and the prefill kernel use wgmma. At r = 896 and for fp8 caches
the h <= 32 defaults keep heads on M (mma.sync), which won the H100 sweeps (benchmarks/RESULTS.md).
Exact latent pieces cut MMA work and shared memory. ptxas's register log (`-v`) gives spills; the
PTX gives the fp8 options' effects (pipelined copies, one-step widening) and the cache write's
IEEE rounding.

The compile passes the 16-divisibility hints the launcher's JIT gives (strides, pointers): without
them triton emits scalar 2-byte loads and no cp.async, which is not what runs on the GPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

H100_MAX_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        if any(word in proc.stderr for word in ("ptxas", "No such file", "backend", "ModuleNotFoundError")):
            pytest.skip(f"triton's sm_90 compile path is unavailable here: {' | '.join(tail)}")
        pytest.fail(f"compile_sm90.py failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


WGMMA_CASES = [
    "decode_h64_r512_rope64_bf16",
    "decode_h32_r448_rope64_bf16_pieces",
    "decode_h32_r896_rope128_bf16_pieces_w8",  # wgmma for out^T = K^T p^T (32-token tiles: scores on mma.sync)
    "decode_h128_r896_rope128",
    "decode_h32_r448_rope64_bf16_heads_on_n",  # heads on the MMA N dimension: 64-token M tiles
    "prefill_v128_rope128",
    "decode_h32_r896_rope128_fp8_heads_on_n",
    "prefill_absorbed_r512_rope64_fp8",
    "prefill_v128_rope512_lossless",
    "prefill_v128_rope1024_lossless",
    "decode_h32_r896_rope128_bf16_tma",
    "decode_h32_r448_rope64_bf16_tma",
    "prefill_v128_rope128_tma",
    "grouped_prefill_d128",
    "grouped_prefill_d64",
    "grouped_prefill_d128_fp8",
]
# Lossless conversions of real GQA models (every key dim carries RoPE: 2p = r): the launcher halves
# BLOCK_N until the tile fits (64 -> 16 at 1024 + 1024), which compile_sm90.decode_case mimics.
LOSSLESS_DECODE_CASES = [
    "decode_h32_r1024_rope1024_lossless",
    "decode_h28_r512_rope512_lossless",
    "decode_h9_r192_rope192_lossless",
]
# ... fine-tuned out of their grouped form: n = 0 layers through the plain decode, RoPE-only queries.
ROPE_ONLY_DECODE_CASES = [case.replace("lossless", "rope_only") for case in LOSSLESS_DECODE_CASES]
# The grouped decode of the same lossless conversions (`grouped_decode_attention`): one KV group's
# heads over its 2 x 128 (SmolLM2: 2 x 64) columns, fp8 cache too.
GROUPED_DECODE_CASES = [
    "grouped_decode_h32_g8_d128",
    "grouped_decode_h28_g4_d128",
    "grouped_decode_h9_g3_d64",
    "grouped_decode_h32_g8_d128_fp8",
]
# Their chunked prefill's decode route: 16 query tokens x a group's heads packed on the MMA rows.
PACKED_DECODE_CASES = [
    "grouped_decode_packed_h32_g8_d128",
    "grouped_decode_packed_h9_g3_d64_contiguous",
    "grouped_decode_packed_h32_g8_d128_fp8",
]
ALL_CASES = [
    *GROUPED_DECODE_CASES,
    *PACKED_DECODE_CASES,
    "decode_packed_h16_r896_rope128_bf16",
    "decode_packed_h16_r448_rope64_bf16",
    "decode_h32_r896_rope128",
    "decode_h32_r448_rope64_fp8",
    "decode_h32_r448_rope64_bf16",
    "decode_h32_r896_rope128_fp8",
    "decode_h32_r896_rope128_bf16_heads_on_n_w8",
    "decode_h32_r896_rope128_bf16_pieces_heads_on_m",
    "decode_h32_r448_rope64_fp8_bf16_tile",
    "decode_h32_r896_rope128_fp8_bf16_tile",
    "decode_h32_r448_rope64_fp8_transposed_keys",
    "decode_h32_r448_rope64_fp8_transposed_keys_fp16",
    "decode_h32_r448_rope64_fp8_pieces",
    *LOSSLESS_DECODE_CASES,
    *ROPE_ONLY_DECODE_CASES,
    *WGMMA_CASES,
]


@pytest.mark.parametrize("case", ALL_CASES)
def test_sm90_fits_shared_memory(compiled, case):
    facts = compiled[case]
    assert facts["wgmma"] + facts["mma_sync"] > 0, f"{case}: no tensor-core MMA in PTX ({facts})"
    assert facts["shared"] <= H100_MAX_SHARED_BYTES, f"{case}: {facts['shared']} B shared memory"


@pytest.mark.parametrize("case", WGMMA_CASES)
def test_sm90_uses_wgmma(compiled, case):
    assert compiled[case]["wgmma"] > 0, f"{case}: no wgmma in PTX ({compiled[case]})"


# 2p = 1024 fits sm_90's shared memory only with one stage at 64-query tiles (`fit_prefill_tiles`
# keeps wgmma over a second stage); chunking the RoPE dims in the kernel would pipeline it.
UNPIPELINED_CASES = ["prefill_v128_rope1024_lossless"]


# copies by TMA instead
TMA_CASES = ["decode_h32_r896_rope128_bf16_tma", "decode_h32_r448_rope64_bf16_tma", "prefill_v128_rope128_tma"]


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c not in UNPIPELINED_CASES + TMA_CASES])
def test_sm90_cache_loads_are_pipelined(compiled, case):
    """Cache tiles stream through cp.async into shared memory (software pipelining), not through
    scalar or register loads; with 16-divisible strides, as the launcher's JIT specialises them."""
    assert compiled[case]["cp_async"] > 0, f"{case}: no cp.async in PTX ({compiled[case]})"


def test_sm90_fp8_heads_on_n_at_r896_keeps_64_token_tiles(compiled):
    assert compiled["decode_h32_r896_rope128_fp8_heads_on_n"]["BLOCK_N"] == 64


def test_sm90_fp8_cache_write_compiles_without_spills(compiled):
    facts = compiled["cache_write_r448_rope64_fp8"]
    assert facts["local_bytes"] == 0 and facts["shared"] <= H100_MAX_SHARED_BYTES, facts
    assert facts["spill_stores"] in (0, None), facts


def test_sm90_cache_write_rounds_like_torch(compiled):
    """The fused write stores the reference's bits only with IEEE divisions, no fused multiply-add
    and no float negation (`-x` becomes `0.0 - x`, which stores +0 where torch stores -0; an H100
    run found 2,103 such codes): no `div.full`/`div.approx` and no `fma.rn.f32` in its PTX, and no
    float negation (`negf`, or a subtraction from a zero constant) in its TTGIR."""
    facts = compiled["cache_write_r448_rope64_fp8"]
    assert facts["div_approx_f32"] == 0 and facts["fma_f32"] == 0 and facts["float_negations"] == 0, facts


def spills(compiled, case) -> int:
    facts = compiled[case]
    if facts["spill_stores"] is None:
        pytest.skip("this triton does not print ptxas's register log")
    return facts["spill_stores"]


@pytest.mark.parametrize(
    "pieces,padded",
    [
        ("decode_h32_r448_rope64_bf16_pieces", "decode_h32_r448_rope64_bf16"),
        ("decode_h32_r896_rope128_bf16_pieces_w8", "decode_h32_r896_rope128_bf16_heads_on_n_w8"),
    ],
)
def test_sm90_latent_pieces_cut_mma_work_and_shared_memory(compiled, pieces, padded):
    """Exact power-of-two pieces of r issue fewer MMA instructions and stage less shared memory than
    one next_pow2(r) tile whose last 1/8 of columns are zero."""
    exact, pad = compiled[pieces], compiled[padded]
    assert exact["wgmma"] + exact["mma_sync"] < pad["wgmma"] + pad["mma_sync"], (exact, pad)
    assert exact["shared"] < pad["shared"], (exact, pad)


@pytest.mark.parametrize(
    "case", ["decode_h32_r896_rope128_bf16_pieces_w8", "decode_h32_r896_rope128_bf16_pieces_heads_on_m"]
)
def test_sm90_r896_pieces_with_8_warps_do_not_spill(compiled, case):
    assert spills(compiled, case) == 0, compiled[case]


def test_sm90_transposed_keys_pipeline_the_fp8_latent_tile(compiled):
    """Widened and then transposed in registers, the fp8 latent tile is loaded into registers
    (triton 3.6 and 3.9): only the RoPE tile and the scales take cp.async. With TRANSPOSED_KEYS both
    loads of the latent tile are pipelined copies into shared memory."""
    plain = compiled["decode_h32_r448_rope64_fp8_pieces"]["cp_async"]
    transposed = compiled["decode_h32_r448_rope64_fp8_transposed_keys"]["cp_async"]
    assert transposed >= 4 * plain, (transposed, plain)


def test_sm90_fp8_as_fp16_widens_in_one_instruction(compiled):
    """fp8 -> bf16 is `cvt.rn.f16x2.e4m3x2` then two `cvt.bf16.f16`; fp8 -> fp16 is the first alone."""
    assert compiled["decode_h32_r448_rope64_fp8_transposed_keys"]["cvt_bf16_f16"] > 0
    assert compiled["decode_h32_r448_rope64_fp8_transposed_keys_fp16"]["cvt_bf16_f16"] == 0


@pytest.mark.parametrize(
    "case",
    [
        "decode_h32_r448_rope64_bf16",
        "decode_h32_r448_rope64_bf16_pieces",
        "prefill_v128_rope128",
        "prefill_v128_rope128_tma",
        "grouped_prefill_d128",
        "grouped_prefill_d64",
    ],
)
def test_sm90_cache_tiles_are_double_buffered(compiled, case):
    """The next cache tile streams into shared memory while the current one feeds the MMAs (the
    software pipeliner keeps 2 copies). Every 896 + 128 tile stages its cache tile once per
    iteration instead (benchmarks/RESULTS.md), which this test leaves out until one does not."""
    assert compiled[case]["buffers"] >= 2, compiled[case]


def test_length_dependent_arguments_are_not_value_specialised(compiled):
    """Triton compiles a new variant for an int argument that becomes 1 or a multiple of 16. The
    decode split count follows the cache's tile count (1, 2, ... 128 as a growing cache fills) and
    the prefill grid arguments follow the chunk and context lengths, so none may be specialised;
    nor may the packed decodes' query-block sizes, which follow the chunk lengths."""
    packed_block_args = ["num_splits", "tokens_per_block", "blocks_per_seq"]
    assert compiled["not_specialised"] == {
        "decode": packed_block_args, "decode_heads_on_n": packed_block_args, "decode_grouped": packed_block_args,
        "prefill": ["num_query_tiles", "head_group"],
    }  # fmt: skip


@pytest.mark.parametrize("case", GROUPED_DECODE_CASES)
def test_sm90_grouped_decode_tiles_are_light(compiled, case):
    """A grouped program holds one KV group's tile (64 tokens x (128 + 2 x 64) columns at 8 x 128): no
    spills, at most 128 registers a thread and under 64 KiB of shared memory, so several programs
    share an SM. The plain decode of the same layer (`decode_h32_r1024_rope1024_lossless`) needs
    16-token tiles to fit and ~230-250 registers."""
    facts = compiled[case]
    assert facts["spill_stores"] == 0 and facts["registers"] <= 128, facts
    assert facts["shared"] <= 64 * 1024, facts


@pytest.mark.parametrize("case", LOSSLESS_DECODE_CASES)
def test_sm90_rope_only_queries_issue_fewer_mmas_a_cache_token(compiled, case):
    """An n = 0 layer's RoPE-only query skips the zero latent query's MMAs: fewer MMA instructions a
    cache token than the same layer's full query, and a tile of at least as many tokens (at 32 heads
    over 1024 + 1024 the shared memory freed by the latent query lets 32-token tiles fit, not 16)."""
    full, rope_only = compiled[case], compiled[case.replace("lossless", "rope_only")]
    per_token = {k: (f["wgmma"] + f["mma_sync"]) / f["BLOCK_N"] for k, f in (("full", full), ("rope", rope_only))}
    assert per_token["rope"] < per_token["full"], (per_token, full, rope_only)
    assert rope_only["BLOCK_N"] >= full["BLOCK_N"], (full, rope_only)


@pytest.mark.parametrize("layout", ["r896_rope128", "r448_rope64"])
def test_sm90_packed_plain_decode_tiles_are_the_measured_32_head_tiles(compiled, layout):
    """Packed blocks of a 16-head layer (2 tokens x 16 heads) run on the rows of the 32-head defaults
    the H100 sweeps chose: the same shared memory and MMA instructions (spills move by a few dozen
    bytes either way with the row mapping)."""
    packed, default = compiled[f"decode_packed_h16_{layout}_bf16"], compiled[f"decode_h32_{layout}_bf16"]
    for fact in ("shared", "wgmma", "mma_sync", "buffers"):
        assert packed[fact] == default[fact], (fact, packed, default)


@pytest.mark.parametrize("case", PACKED_DECODE_CASES)
def test_sm90_packed_grouped_decode_tiles_run_on_wgmma(compiled, case):
    """A packed query block fills wgmma's 64 rows (16 tokens x 4 heads at 8 x 128) where a one-token
    grouped decode multiplies 4 real rows of 16 on mma.sync; the accumulator is 64 x 128 fp32 (64
    registers a thread), so the tile stays free of spills and two programs share an SM (triton 3.9:
    168 registers, 80 KiB of shared memory for two pipelined buffers at 8 x 128 bf16)."""
    facts = compiled[case]
    assert facts["wgmma"] > 0 and facts["spill_stores"] == 0, facts
    assert facts["shared"] <= H100_MAX_SHARED_BYTES // 2, facts


@pytest.mark.parametrize("case", ["grouped_prefill_d128", "grouped_prefill_d128_fp8"])
def test_sm90_grouped_prefill_tiles_are_gqa_sized(compiled, case):
    """The grouped prefill of a lossless 8 x 128 GQA conversion reads one KV group's 2 x 64 RoPE
    columns and 128 latent columns straight from the paged cache: no spills, and less shared memory
    and fewer wgmma instructions than the plain prefill's tiles over the 1024-wide RoPE key of the
    same layer (`prefill_v128_rope1024_lossless`: 192 KiB for one unpipelined stage of 64-query
    tiles, 1.7 KB of spills with triton 3.9; grouped bf16: 96 KiB for two stages of 128-query tiles)."""
    grouped, plain = compiled[case], compiled["prefill_v128_rope1024_lossless"]
    assert grouped["spill_stores"] == 0 and grouped["wgmma"] > 0, grouped
    assert grouped["shared"] < plain["shared"] and grouped["wgmma"] < plain["wgmma"], (grouped, plain)


@pytest.mark.parametrize("case", TMA_CASES)
def test_sm90_tma_tiles_copy_the_cache_by_tma_and_multiply_on_wgmma_alone(compiled, case):
    """TMA tiles: every cache tile goes global -> shared through tensor-descriptor copies (no
    cp.async, no register staging) and both MMAs are wgmma. Spills depend on the triton version
    (896 + 128: 8 B with 3.6, 880 B with 3.9; benchmarks/RESULTS.md), so they are not asserted."""
    facts = compiled[case]
    assert facts["tma"] > 0 and facts["cp_async"] == 0, facts
    assert facts["wgmma"] > 0 and facts["mma_sync"] == 0, facts


def test_sm90_tma_prefill_tile_drops_the_address_registers(compiled):
    """The expanded prefill tile with keys and values by TMA: no spills, and fewer registers than the
    cp.async default (176 against 227 with triton 3.6, 175 against 242 with 3.9): the per-row
    address and mask arithmetic of the pointer loads is gone."""
    tma, default = compiled["prefill_v128_rope128_tma"], compiled["prefill_v128_rope128"]
    assert tma["spill_stores"] == 0 and tma["registers"] < default["registers"], (tma, default)


@pytest.mark.parametrize("case", LOSSLESS_DECODE_CASES)
def test_sm90_lossless_decode_tiles_fit_without_spills(compiled, case):
    """The decode tiles a lossless Llama-3-8B, Qwen2.5-7B or SmolLM2-135M conversion gets fit once
    shrunk, without spilling (triton 3.6, 2026-11-28: BLOCK_N 16 / 32 / 64, 0 B)."""
    facts = compiled[case]
    assert facts["spill_stores"] == 0, f"{case}: {facts['spill_stores']} B of spills ({facts})"


def test_fp8_types_compile_where_the_launchers_allow_them(compiled):
    """`E4M3_MIN_CAPABILITY`, which the launchers check before an fp8 launch, is where triton's
    compiler puts it: e4m3 from sm_89, e5m2 from sm_80."""
    import torch

    from m2la.kernels._launch import E4M3_MIN_CAPABILITY, fp8_cache_problem

    assert E4M3_MIN_CAPABILITY == (8, 9)
    for arch in (80, 89):
        capability = divmod(arch, 10)
        for name, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
            allowed = fp8_cache_problem(dtype, capability) is None
            assert compiled["fp8_by_arch"][f"sm{arch}_{name}"] == allowed, (arch, name)


@pytest.mark.parametrize("layer", ["h32_r1024_rope1024", "h32_r1024_rope1024_rope_only", "h28_r512_rope512"])
def test_narrow_decode_tiles_fit_where_the_defaults_do_not(compiled, layer):
    """On sm_89's 99 KiB a plain decode of wide rows needs more shared memory than there is at the
    default tiles even at 16 tokens, which is when the launcher falls back to `NARROW_DECODE_TILES`;
    those fit, without spills."""
    from compile_sm90 import SM89_MAX_SHARED_BYTES

    default, narrow = compiled[f"sm89_decode_{layer}_default"], compiled[f"sm89_decode_{layer}_narrow"]
    assert default["BLOCK_N"] == 16 and default["shared"] > SM89_MAX_SHARED_BYTES, default
    assert narrow["shared"] <= SM89_MAX_SHARED_BYTES and narrow["spill_stores"] == 0, narrow
    assert narrow["mma_sync"] > 0, narrow


@pytest.mark.parametrize(
    "case",
    ["sm100_decode_h32_r896_rope128_bf16", "sm100_decode_h32_r448_rope64_bf16", "sm100_prefill_v128_rope128",
     "sm120_decode_h32_r896_rope128_bf16"],
)  # fmt: skip
def test_blackwell_defaults_compile_and_fit(compiled, case):
    """The default tiles compile for Blackwell too: sm_100 (B200) within sm_90's shared memory,
    sm_120 (RTX 50xx) within 99 KiB once the launcher has halved BLOCK_N."""
    from compile_sm90 import SM89_MAX_SHARED_BYTES

    facts = compiled["blackwell"][case]
    limit = H100_MAX_SHARED_BYTES if case.startswith("sm100") else SM89_MAX_SHARED_BYTES
    assert facts["shared"] <= limit, facts
