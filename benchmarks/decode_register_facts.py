"""Compile every tile of the GPU sweeps for sm_90 (no GPU needed) and tabulate what ptxas reports.

For each layout of `gpu_kernels.LAYOUTS`: each entry of `gpu_kernels.SWEEP_SETS` that changes the decode
tile (bf16 and fp8 caches), and each expanded-prefill tile of `gpu_kernels.PREFILL_SWEEP`. Columns:
BLOCK_N after the shared-memory fit, shared memory, wgmma / mma.sync instructions, pipelined copies
of the loaded tiles (2 = the next tile streams in while this one is used; 1 = no prefetch), registers
per thread and bytes spilled to local memory. Spills predicted the H100
sweep's losers (benchmarks/RESULTS.md), so this table says which tiles deserve device time.

    python benchmarks/decode_register_facts.py > register_facts.md     # no TRITON_INTERPRET
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "kernels"), str(ROOT / "benchmarks")]

import triton  # noqa: E402
from compile_sm90 import decode_case, prefill_case  # noqa: E402

from gpu_kernels import HEADS, LAYOUTS, NOPE_DIM, PREFILL_SWEEP, SWEEP_SETS, VALUE_DIM  # noqa: E402

NOT_TILE_KEYS = {"pages", "page_size", "contiguous", "splits"}  # sweep keys that leave the kernel as is


def tile_configs() -> list[dict]:
    seen, configs = set(), []
    for config in ({}, *(config for sweep in SWEEP_SETS.values() for config in sweep)):
        if NOT_TILE_KEYS & config.keys():
            continue
        key = tuple(sorted(config.items()))
        if key not in seen:
            seen.add(key)
            configs.append(config)
    return configs


def row(kernel: str, name: str, label, compile_case) -> str:
    try:
        facts = compile_case()
    except Exception as error:  # a tile that does not compile is a row too
        return f"| {kernel} | {name} | {label} | {type(error).__name__}: {str(error).splitlines()[0][:80]} |"
    return (
        f"| {kernel} | {name} | {label} | {facts.get('BLOCK_N', '')} | {facts['shared'] // 1024} | {facts['wgmma']} | "
        f"{facts['mma_sync']} | {facts['buffers']} | {facts['registers']} | {facts['spill_stores']} |"
    )


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")
    print(f"# Decode tiles compiled for sm_90 (triton {triton.__version__}, {HEADS} query heads)\n")
    print(
        "| kernel | layout | config | BLOCK_N | shared KiB | wgmma | mma.sync | buffers | registers | spill stores (B) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        for config in tile_configs():
            overrides = {k: v for k, v in config.items() if k != "fp8"}
            cache_dtype = "fp8e4nv" if config.get("fp8") else None
            case = functools.partial(decode_case, HEADS, kv_rank, rope_dim, "bf16", cache_dtype, **overrides)
            print(row("decode", name, config or "default", case), flush=True)
    for name, (_, rope_dim) in LAYOUTS.items():
        for config in PREFILL_SWEEP:  # expanded mode: per-head keys of n + rope, contiguous
            case = functools.partial(prefill_case, VALUE_DIM, rope_dim, NOPE_DIM, "bf16", paged=False, **config)
            print(row("prefill (expanded)", name, config or "default", case), flush=True)


if __name__ == "__main__":
    main()
