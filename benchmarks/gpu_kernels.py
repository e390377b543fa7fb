"""GPU kernel benchmark: correctness first, then copy bandwidth, decode GB/s, prefill TFLOPS, vs SDPA.

Shapes: Qwen3-VL-8B attention (32 query heads, GQA 8 KV heads x 128) against its M²LA conversions,
InternVideo3's latent 896 + rope 128 and a 4x-compressed 448 + 64. Writes a markdown report to
`${OUT:-/tmp/m2la-out}/kernels.md`.

    python benchmarks/gpu_kernels.py            # on a CUDA machine (see gpu_check.sh)
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke   # CPU dry run of the script's logic
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import statistics
import time
import traceback

import torch

from m2la.attention_math import expand_latent_kv
from m2la.kernels import bench, decode_attention, grouped_decode_attention, grouped_prefill_attention, prefill_attention
from m2la.kernels._paging import gather_cache_rows
from m2la.kernels.bench import capture_graph, copy_bandwidth_gbs, graph_ms  # noqa: F401  (capture_graph: other scripts)
from m2la.kernels.bench import time_ms as timed_ms

HEADS, GQA_KV_HEADS, HEAD_DIM = 32, 8, 128
NOPE_DIM = VALUE_DIM = 128
LAYOUTS = {"latent 896+128 (InternVideo3)": (896, 128), "latent 448+64 (4x)": (448, 64)}
BLOCK_SIZE = 64


NOT_MEASURED = (None,) * 6  # a decode row's measured fields, for skipped cases


def latent_decode_flops(batch, context, kv_rank, rope_dim) -> int:
    """Absorbed decode FLOPs at 32 heads: 60 FLOP per bf16 cache byte (both latent layouts), about
    180 TFLOPS to read at 3 TB/s, so tensor-core throughput, not only bandwidth, bounds these kernels."""
    return bench.latent_decode_flops(batch, context, kv_rank, rope_dim, HEADS)


def _measure(fn, device, repeats, nbytes, bandwidth, flops) -> tuple:
    """(ms, GB/s, % of copy BW, graph ms, graph % of copy BW, TFLOPS) for one decode case; TFLOPS
    from the graph time where there is one."""
    ms = timed_ms(fn, device, repeats)
    try:
        gms = graph_ms(fn, device, repeats)
    except Exception:  # not capturable: report eager only
        gms = None
    gbs = nbytes / ms / 1e6
    gpct = None if gms is None else 100 * nbytes / gms / 1e6 / bandwidth
    return ms, gbs, 100 * gbs / bandwidth, gms, gpct, flops / (gms or ms) / 1e9


def paged_inputs(batch, context, kv_rank, rope_dim, dtype, device, cache):
    """Queries and a shuffled block table over a preallocated cache `[blocks, page size, r+2p]`."""
    blocks_per_seq = math.ceil(context / cache.shape[1])
    order = torch.randperm(cache.shape[0], device=device)[: batch * blocks_per_seq]
    table = order.view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, HEADS, kv_rank + rope_dim, device=device, dtype=dtype)
    return q, table, lens


def check_correctness(device, dtype) -> list[str]:
    """Every layout on a small case, Triton vs the fp32 reference; raises on mismatch."""
    lines = []
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        cache = torch.randn(64, BLOCK_SIZE, kv_rank + rope_dim, device=device, dtype=dtype)
        q, table, lens = paged_inputs(3, 1000, kv_rank, rope_dim, dtype, device, cache)
        lens[1] = 1
        scale = (NOPE_DIM + rope_dim) ** -0.5
        out, lse = decode_attention(q, cache, lens, scale, kv_rank, table, backend="triton")
        ref, ref_lse = decode_attention(q.float(), cache.float(), lens, scale, kv_rank, table, backend="reference")
        err, lse_err = (out.float() - ref).abs().max().item(), (lse - ref_lse).abs().max().item()
        if not (err < 3e-2 and lse_err < 3e-2):
            raise AssertionError(f"decode {name}: max err {err:.3g}, lse err {lse_err:.3g}")
        lines.append(f"| decode {name} | {err:.2e} | {lse_err:.2e} |")
    return lines


def decode_rows(device, dtype, batches, contexts, bandwidth, repeats, configs=None, fp8=False):
    """Decode through `decode_attention` (the library path), or through `latent_decode_triton` with
    a layout's tile override from `configs` (the sweep's winner), labelled with it. `fp8`: an e4m3
    cache with per-token scales (bytes = 1 per element + a 4-byte scale per token), queries in `dtype`."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    rows = []
    if not contexts:
        return rows
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        width = kv_rank + rope_dim
        row_bytes = width + 4 if fp8 else width * dtype.itemsize
        num_blocks = max(batches) * math.ceil(max(contexts) / BLOCK_SIZE)
        affordable = int(0.45 * _free_bytes(device) / (BLOCK_SIZE * row_bytes))
        num_blocks = min(num_blocks, affordable)  # combos needing more are reported as n/a
        cache = torch.empty(num_blocks, BLOCK_SIZE, width, device=device, dtype=dtype).uniform_(-1, 1)
        kv_scale = None
        if fp8:  # per-token scale of the uniform rows: amax 1 -> 1 / 448
            cache = cache.to(torch.float8_e4m3fn)
            kv_scale = torch.full((num_blocks, BLOCK_SIZE), 1 / 448, device=device)
        for context in contexts:
            for batch in batches:
                if batch * math.ceil(context / BLOCK_SIZE) > num_blocks or _out_of_time():
                    rows.append((name, batch, context, *NOT_MEASURED))
                    continue
                q, table, lens = paged_inputs(batch, context, kv_rank, rope_dim, dtype, device, cache)
                scale = (NOPE_DIM + rope_dim) ** -0.5

                override = (configs or {}).get(name)

                def run(q=q, table=table, lens=lens, scale=scale, kv_rank=kv_rank, cache=cache, override=override,
                        kv_scale=kv_scale):  # fmt: skip
                    if override:
                        return latent_decode_triton(
                            q, cache, lens, scale, kv_rank, table, config=override, kv_scale=kv_scale
                        )
                    return decode_attention(q, cache, lens, scale, kv_rank, table, kv_scale=kv_scale)

                nbytes = batch * context * row_bytes + 2 * q.numel() * dtype.itemsize
                label = f"{name}{' fp8 e4m3' if fp8 else ''}{f' {override}' if override else ''}"
                flops = latent_decode_flops(batch, context, kv_rank, rope_dim)
                rows.append((label, batch, context, *_measure(run, device, repeats, nbytes, bandwidth, flops)))
        del cache
    return rows


def split_rows(device, dtype, bandwidth, repeats, smoke: bool) -> list[tuple]:
    """Split placement side by side, same inputs: each sequence's own length cut into the splits
    (`SPLIT_BY_LENGTH`, the default) against the capacity cut into them (the earlier kernel). Cases
    where they differ: short sequences in a long static cache (`M2LAStaticCache`; a contiguous
    `[b, capacity, r+2p]` cache, graph-replayed as under `mode="reduce-overhead"`) and a ragged paged
    batch (lengths spread evenly up to the capacity). Bytes = cache rows read (visible tokens only).
    Rows: (case, batch, capacity, lengths, ms by length, ms by capacity, % of copy BW by length,
    speedup, max diff)."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    rows = []
    capacity = 256 if smoke else 32768
    static_lengths = [40, 100] if smoke else [1024, 4096, 16384]
    batches = [2] if smoke else [1, 8]
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        width = kv_rank + rope_dim
        scale = (NOPE_DIM + rope_dim) ** -0.5
        cases = []
        for batch in batches:
            cache = torch.empty(batch, capacity, width, device=device, dtype=dtype).uniform_(-1, 1)
            for length in static_lengths:
                lens = torch.full((batch,), length, dtype=torch.int32, device=device)
                cases.append(("static cache", batch, cache, None, lens))
        ragged_batch = 2 if smoke else 8
        pages = torch.empty(ragged_batch * math.ceil(capacity / BLOCK_SIZE), BLOCK_SIZE, width, device=device,
                            dtype=dtype).uniform_(-1, 1)  # fmt: skip
        _, table, _ = paged_inputs(ragged_batch, capacity, kv_rank, rope_dim, dtype, device, pages)
        ragged = [capacity * (i + 1) // ragged_batch for i in range(ragged_batch)]
        cases.append(("ragged paged batch", ragged_batch, pages, table, torch.tensor(ragged, dtype=torch.int32,
                                                                                     device=device)))  # fmt: skip
        for case, batch, cache, table, lens in cases:
            if _out_of_time():
                rows.append((f"{name}, {case}", batch, capacity, "n/a", *NOT_MEASURED[:5]))
                continue
            q = torch.randn(batch, HEADS, width, device=device, dtype=dtype)

            def run(by_length, q=q, cache=cache, table=table, lens=lens, kv_rank=kv_rank, scale=scale):
                config = dict(SPLIT_BY_LENGTH=by_length)
                return latent_decode_triton(q, cache, lens, scale, kv_rank, table, config=config)

            diff = (run(True)[0].float() - run(False)[0].float()).abs().max().item()
            times = {}
            for by_length in (True, False):
                fn = functools.partial(run, by_length)
                times[by_length] = graph_ms(fn, device, repeats) or timed_ms(fn, device, repeats, warmup=1)
            nbytes = int(lens.sum()) * width * dtype.itemsize
            shown = ",".join(str(n) for n in lens.tolist()) if case == "ragged paged batch" else str(int(lens[0]))
            rows.append((
                f"{name}, {case}", batch, capacity, shown, times[True], times[False],
                100 * nbytes / times[True] / 1e6 / bandwidth, times[False] / times[True], diff,
            ))  # fmt: skip
        del cases, pages
    return rows


def _decode_entry_points(q, cache, lens, table, scale, kv_rank, backend) -> dict:
    """The same decode call through each entry point a user may take."""
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    return {
        "decode_attention (eager calls skip the dispatcher)": lambda: decode_attention(
            q, cache, lens, scale, kv_rank, table
        ),
        "torch.ops.m2la.latent_decode (through the dispatcher)": lambda: torch.ops.m2la.latent_decode(
            q, cache, lens, table, None, None, scale, kv_rank, 0, backend
        ),
        "latent_decode_triton (the launcher alone)": lambda: latent_decode_triton(
            q, cache, lens, scale, kv_rank, table
        ),
    }


def host_rows(device, dtype, context, repeats) -> list[tuple]:
    """Eager decode at b=1 (kernels of tens of microseconds, so the host's share shows) through each
    entry point, against the same call replayed from a CUDA graph. `torch.ops.m2la.latent_decode`
    is the dispatcher route every eager call took before 2026-11-27 (eleventh session); eager calls
    of `decode_attention` now skip it."""
    from m2la.backends import resolve_backend

    rows = []
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        cache = torch.empty(math.ceil(context / BLOCK_SIZE), BLOCK_SIZE, kv_rank + rope_dim, device=device, dtype=dtype)
        cache.uniform_(-1, 1)
        q, table, lens = paged_inputs(1, context, kv_rank, rope_dim, dtype, device, cache)
        scale = (NOPE_DIM + rope_dim) ** -0.5
        entry_points = _decode_entry_points(q, cache, lens, table, scale, kv_rank, resolve_backend(None, q))
        reference = entry_points["decode_attention (eager calls skip the dispatcher)"]()[0].float()
        for label, fn in entry_points.items():
            diff = (fn()[0].float() - reference).abs().max().item()
            rows.append((name, label, back_to_back_ms(fn, device, 10 * repeats), graph_ms(fn, device, repeats), diff))
    return rows


def back_to_back_ms(fn, device: torch.device, calls: int) -> float:
    """Wall milliseconds per call over `calls` calls issued back to back, one sync at the end: the
    larger of the host's time per call and the device's (no cache flush, unlike `timed_ms`, whose
    flush kernel hides up to its own length of host time)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e3


def vllm_rows(device, dtype, batches, contexts, bandwidth, repeats):
    """vLLM's Triton MLA decode (benchmarks/vllm_triton_mla.py) on the same paged caches and queries
    as `decode_rows`, plus its max difference from ours; nothing when the kernel was not extracted."""
    import vllm_triton_mla

    module = vllm_triton_mla.load()
    if module is None or not contexts:
        return [], []
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    rows, checks = [], []
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        width = kv_rank + rope_dim
        num_blocks = max(batches) * math.ceil(max(contexts) / BLOCK_SIZE)
        num_blocks = min(num_blocks, int(0.45 * _free_bytes(device) / (BLOCK_SIZE * width * dtype.itemsize)))
        cache = torch.empty(num_blocks, BLOCK_SIZE, width, device=device, dtype=dtype).uniform_(-1, 1)
        scale = (NOPE_DIM + rope_dim) ** -0.5
        check_batch, check_context = min(3, max(batches)), min(1000, max(contexts))
        q, table, lens = paged_inputs(check_batch, check_context, kv_rank, rope_dim, dtype, device, cache)
        theirs, _ = vllm_triton_mla.decode(module, q, cache, table, lens, scale, kv_rank, check_context, sms)
        ours, _ = decode_attention(q, cache, lens, scale, kv_rank, table)
        checks.append(
            f"| vLLM Triton MLA vs m2la, {name} | {(theirs.float() - ours.float()).abs().max().item():.2e} | - |"
        )
        for context in contexts:
            for batch in batches:
                label = f"vLLM Triton MLA, {name}"
                if batch * math.ceil(context / BLOCK_SIZE) > num_blocks or _out_of_time():
                    rows.append((label, batch, context, *NOT_MEASURED))
                    continue
                q, table, lens = paged_inputs(batch, context, kv_rank, rope_dim, dtype, device, cache)

                def run(q=q, table=table, lens=lens, scale=scale, kv_rank=kv_rank, cache=cache, context=context):
                    return vllm_triton_mla.decode(module, q, cache, table, lens, scale, kv_rank, context, sms)

                nbytes = batch * context * width * dtype.itemsize + 2 * q.numel() * dtype.itemsize
                flops = latent_decode_flops(batch, context, kv_rank, rope_dim)
                rows.append((label, batch, context, *_measure(run, device, repeats, nbytes, bandwidth, flops)))
        del cache
    return rows, checks


def torch_absorbed_rows(device, dtype, batches, contexts, bandwidth, repeats):
    """Plain-torch absorbed decode over a contiguous latent cache `[b, s, r+2p]` (two batched GEMMs
    and a softmax, what a torch-only MLA decode does): the same bytes as our kernel, no paging."""
    rows = []
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        width = kv_rank + rope_dim
        for context in contexts:
            for batch in batches:
                nbytes = batch * context * width * dtype.itemsize
                if nbytes > 0.2 * _free_bytes(device) or _out_of_time():
                    rows.append((f"torch bmm {name}", batch, context, *NOT_MEASURED))
                    continue
                cache = torch.empty(batch, context, width, device=device, dtype=dtype).uniform_(-1, 1)
                q = torch.randn(batch, HEADS, width, device=device, dtype=dtype)
                scale = (NOPE_DIM + rope_dim) ** -0.5

                def run(q=q, cache=cache, scale=scale, kv_rank=kv_rank):
                    scores = torch.bmm(q, cache.transpose(1, 2)).float() * scale  # [b, h, s]
                    probs = torch.softmax(scores, dim=-1).to(q.dtype)
                    return torch.bmm(probs, cache[..., :kv_rank])  # [b, h, r]

                flops = latent_decode_flops(batch, context, kv_rank, rope_dim)
                measured = _measure(run, device, repeats, nbytes, bandwidth, flops)
                rows.append((f"torch bmm {name}", batch, context, *measured))
                del cache
    return rows


# Decode configs tried by the sweep (overrides of `decode_config`). Keys the kernel does not take:
# "splits": an explicit split count, "legacy" (the earlier rule: ~2 programs per SM, capped at 64
# and at capacity / (4 BLOCK_N)) or "x2" (twice the wave model's choice); "contiguous": the same
# rows in an unpaged `[b, s, r+d_r]` cache (the cost of paging); "pages": "sorted" (block table in
# allocation order instead of a random permutation); "page_size" (tokens per page, default 64);
# "fp8": an e4m3 cache with per-token scales (bytes: 1 per element + 4 per token).
# "R" = next_power_of_2(kv_rank).
SWEEP = [
    {},
    dict(pages="sorted"),
    dict(page_size=256),
    dict(contiguous=True),
    # exact latent pieces (1/8 less MMA work and shared memory than the padded tile; see RESULTS.md)
    dict(HEADS_ON_N=True, LATENT_PIECES=True, num_warps=8),
    dict(HEADS_ON_N=True, LATENT_PIECES=True, num_warps=4),
    dict(HEADS_ON_N=False, LATENT_PIECES=True, num_warps=8),
    dict(HEADS_ON_N=False, LATENT_PIECES=True, num_warps=8, BLOCK_N=32),
    dict(fp8=True),  # the fp8 default (heads on M, padded, 8 warps, BLOCK_N 64)
    dict(fp8=True, HEADS_ON_N=True, LATENT_PIECES=True, BLOCK_N=32),  # the seventh session's fp8 default
    dict(fp8=True, LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True),
    # chunked scores, value tiles of 256: the only double-buffered tile at 896+128 (recomputes scores)
    dict(HEADS_ON_N=False, BLOCK_D=128, BLOCK_V=256, num_warps=4, num_stages=3),
    dict(HEADS_ON_N=True, LATENT_PIECES=False, num_warps=8),  # padded baselines for the pieces rows
    dict(HEADS_ON_N=False, LATENT_PIECES=False, num_warps=8),
]
# fp8 tiles (`--sweep-set fp8`): the heads-on-M options for fp8 tiles against the fp8 default; the
# bf16 default beside them. fp8 rows are compared with the fp8 default's output.
SWEEP_FP8 = [
    {},
    dict(fp8=True),
    dict(fp8=True, HEADS_ON_N=True, LATENT_PIECES=True, BLOCK_N=32),  # the seventh session's fp8 default
    dict(fp8=True, FP8_AS_FP16=True),
    dict(fp8=True, LATENT_PIECES=True),
    dict(fp8=True, LATENT_PIECES=True, FP8_AS_FP16=True),
    dict(fp8=True, LATENT_PIECES=True, TRANSPOSED_KEYS=True),
    dict(fp8=True, LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True),
    dict(fp8=True, LATENT_PIECES=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True, BLOCK_N=32),
    dict(fp8=True, TRANSPOSED_KEYS=True, FP8_AS_FP16=True),
]
# Two programs per SM (`--sweep-set overlap`). No 896 + 128 tile double-buffers its cache tile, so
# within one program the next tile's load waits for this tile's MMAs. 16-head tiles of 4 warps
# (255 registers, 66-99 KiB of shared memory in the sm_90 compile, no spills) fit twice per SM, so
# one program's loads can overlap the other's MMAs, at the price of reading each cache tile once per
# head tile (the second read from L2).
SWEEP_OVERLAP = [
    {},
    dict(HEADS_ON_N=False, LATENT_PIECES=True, BLOCK_H=16, num_warps=4, BLOCK_N=32),
    dict(HEADS_ON_N=False, LATENT_PIECES=True, BLOCK_H=16, num_warps=4, BLOCK_N=16),
    dict(HEADS_ON_N=False, LATENT_PIECES=True, BLOCK_H=16, num_warps=4, BLOCK_N=64),  # fits twice at 448 only
    dict(HEADS_ON_N=False, LATENT_PIECES=True, num_warps=8),  # the 896 default, named (the 448 default differs)
]
SWEEP_SETS = {"all": list(SWEEP), "fp8": SWEEP_FP8, "overlap": SWEEP_OVERLAP}
SWEEP_SHAPES = [(32, 16384), (1, 131072), (8, 32768)]


def _resolve(config: dict, kv_rank: int) -> dict:
    import triton

    return {k: triton.next_power_of_2(kv_rank) if v == "R" else v for k, v in config.items()}


def _legacy_splits(batch, context, block_n, device) -> int:
    import triton

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, batch), 64, triton.cdiv(context, 4 * block_n)))


def sweep_case(device, dtype, batch, context, kv_rank, rope_dim, config):
    """(callable, bytes) for one sweep row: the split kernel + combine with `config`'s overrides."""
    from m2la.kernels.latent_decode.triton import decode_config, decode_plan, latent_decode_triton

    config = _resolve(config, kv_rank)
    splits = config.pop("splits", 0)
    contiguous = config.pop("contiguous", False)
    sorted_pages = config.pop("pages", "random") == "sorted"
    page_size = config.pop("page_size", BLOCK_SIZE)
    fp8 = config.pop("fp8", False)
    width = kv_rank + rope_dim
    torch.manual_seed(1234)  # the same cache, table and queries for every paged config
    if contiguous:
        cache = torch.empty(batch, context, width, device=device, dtype=dtype).uniform_(-1, 1)
        table = None
        q = torch.randn(batch, HEADS, width, device=device, dtype=dtype)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    else:
        cache = torch.empty(batch * math.ceil(context / page_size), page_size, width, device=device, dtype=dtype)
        cache.uniform_(-1, 1)
        q, table, lens = paged_inputs(batch, context, kv_rank, rope_dim, dtype, device, cache)
        if sorted_pages:
            table = torch.arange(table.numel(), device=device, dtype=torch.int32).view_as(table)
    block_n = {**decode_config(HEADS, kv_rank, rope_dim, False, fp8), **config}["BLOCK_N"]
    if splits == "legacy":
        splits = _legacy_splits(batch, context, block_n, device)
    elif splits == "x2":
        splits = 2 * decode_plan(q, cache, kv_rank, table, 0, config)[1]
    scale = (NOPE_DIM + rope_dim) ** -0.5
    kv_scale, row_bytes = None, width * dtype.itemsize
    if fp8:  # uniform(-1, 1) rows: amax ~1 -> scale 1 / 448
        cache = cache.to(torch.float8_e4m3fn)
        kv_scale, row_bytes = torch.full(cache.shape[:2], 1 / 448, device=device), width + 4
    args = (q, cache, lens, scale, kv_rank, table)

    def run():
        return latent_decode_triton(*args, num_splits=splits, config=config or None, kv_scale=kv_scale)

    return run, batch * context * row_bytes


def sweep_rows(device, dtype, shapes, bandwidth, repeats, seconds):
    """Time decode configs per layout and shape until `seconds` run out; failures are rows too.
    Each row's error is against the default config on the same shape."""
    rows = []
    stop_at = time.monotonic() + seconds
    for batch, context in shapes:
        for name, (kv_rank, rope_dim) in LAYOUTS.items():
            refs = {}  # per cache dtype: the first row's output (the default of that dtype)
            for config in SWEEP:
                label = f"b={batch}, {context}: {config or 'default'}"
                if time.monotonic() > stop_at or _out_of_time():
                    rows.append((name, label, "skipped (time)", None, None, None))
                    continue
                try:
                    run, nbytes = sweep_case(device, dtype, batch, context, kv_rank, rope_dim, dict(config))
                    out, _ = run()
                    ref = refs.setdefault(bool(config.get("fp8")), out.float())
                    # other cache layouts read other rows: no error to compare
                    other = any(k in config for k in ("contiguous", "pages", "page_size"))
                    err = "n/a (other data)" if other else f"{(out.float() - ref).abs().max().item():.1e}"
                    ms = timed_ms(run, device, repeats)
                    tflops = latent_decode_flops(batch, context, kv_rank, rope_dim) / ms / 1e9
                    rows.append((name, label, err, ms, 100 * nbytes / ms / 1e6 / bandwidth, tflops))
                    del run, out
                except Exception as exc:  # out of resources etc.: record and go on
                    rows.append((name, label, f"{type(exc).__name__}", None, None, None))
    return rows


def best_configs(rows, fp8: bool = False) -> dict[str, dict]:
    """Per layout, the tile config (a kernel override, not a split policy or the contiguous
    control) with the lowest geometric-mean time relative to the default over every sweep shape
    where both ran and agreed with the default within 5e-2; {} when the default is best.
    `fp8`: among the fp8-cache rows, against the fp8 default (`{'fp8': True}`); the choice is
    returned without its `fp8` key."""
    import ast

    baseline = str(dict(fp8=True)) if fp8 else "default"
    rows = [  # this cache dtype's rows, its baseline labelled "default"
        (name, label.replace(f": {baseline}", ": default"), *rest)
        for name, label, *rest in rows
        if ("'fp8': True" in label) == fp8
    ]

    timed: dict[str, dict[str, dict[str, float]]] = {}
    for name, label, err, ms, *_ in rows:
        shape, _, config = label.partition(": ")
        if ms is None or not err[:1].isdigit() or float(err) > 5e-2:
            continue
        timed.setdefault(name, {}).setdefault(config, {})[shape] = ms
    best = {}
    for name, by_config in timed.items():
        default = by_config.get("default", {})
        score, choice = 1.0, {}
        for config, by_shape in by_config.items():
            if config == "default" or set(by_shape) != set(default) or not default:
                continue
            overrides = ast.literal_eval(config)
            if "splits" in overrides or "contiguous" in overrides:
                continue
            ratio = math.exp(statistics.fmean(math.log(by_shape[s] / default[s]) for s in default))
            if ratio < score * 0.97:  # 3% better at least, so noise does not pick a config
                score, choice = ratio, {k: v for k, v in overrides.items() if k != "fp8"}
        best[name] = choice
    return best


def warm_compile(device_index, jobs) -> int:
    """Compile (and run once) every sweep case in `jobs` so that the timed pass hits triton's disk
    cache; runs in worker processes, so the compiles proceed in parallel on the host's cores."""
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    done = 0
    for batch, context, kv_rank, rope_dim, config in jobs:
        try:
            run, _ = sweep_case(device, torch.bfloat16, batch, context, kv_rank, rope_dim, dict(config))
            run()
            torch.cuda.synchronize()
            done += 1
        except Exception:  # the timed pass records the failure
            pass
        torch.cuda.empty_cache()
    return done


def warm_all(device, shapes, workers: int) -> str:
    import concurrent.futures
    import multiprocessing

    jobs = [(b, s, r, p, c) for b, s in shapes for r, p in LAYOUTS.values() for c in SWEEP]
    chunks = [jobs[i::workers] for i in range(workers)]
    start = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = sum(pool.map(warm_compile, [device.index or 0] * workers, chunks))
    return f"warm compile: {done}/{len(jobs)} sweep cases in {time.monotonic() - start:.0f} s on {workers} processes"


DEADLINE = [float("inf")]


def _out_of_time() -> bool:
    return time.monotonic() > DEADLINE[0]


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 2 * 2**30


def gqa_decode_rows(device, dtype, batches, contexts, bandwidth, repeats, use_flash):
    """Decode over the uncompressed GQA cache with SDPA (and flash_attn's kvcache kernel if present)."""
    rows = []
    if not contexts:
        return rows
    max_tokens = max(batches) * max(contexts)
    per_token = 2 * GQA_KV_HEADS * HEAD_DIM * dtype.itemsize
    budget_tokens = min(max_tokens, int(0.8 * _free_bytes(device) / per_token))
    k_all = torch.empty(budget_tokens, GQA_KV_HEADS, HEAD_DIM, device=device, dtype=dtype).uniform_(-1, 1)
    v_all = torch.empty_like(k_all).uniform_(-1, 1)
    for context in contexts:
        for batch in batches:
            if batch * context > budget_tokens or _out_of_time():
                rows.append(("GQA 8x128 SDPA", batch, context, *NOT_MEASURED))
                continue
            k = k_all[: batch * context].view(batch, context, GQA_KV_HEADS, HEAD_DIM)
            v = v_all[: batch * context].view(batch, context, GQA_KV_HEADS, HEAD_DIM)
            q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=device, dtype=dtype)
            nbytes = batch * context * per_token
            flops = 2 * HEADS * batch * context * 2 * HEAD_DIM  # 4 FLOP per bf16 cache byte
            candidates = {"GQA 8x128 SDPA": lambda q=q, k=k, v=v: _sdpa_gqa(q, k, v)}
            if use_flash:
                from flash_attn import flash_attn_with_kvcache

                candidates["GQA 8x128 flash_attn"] = lambda q=q, k=k, v=v: flash_attn_with_kvcache(q, k, v, causal=True)
            for name, fn in candidates.items():
                try:
                    rows.append((name, batch, context, *_measure(fn, device, repeats, nbytes, bandwidth, flops)))
                except Exception as exc:  # a backend refusing a shape should not sink the report
                    rows.append((f"{name} ({type(exc).__name__})", batch, context, *NOT_MEASURED))
    del k_all, v_all
    return rows


def lossless_query(batch, heads, kv_heads, head_dim, dtype, device) -> torch.Tensor:
    """Absorbed decode queries of the lossless conversion of a GQA attention (`heads` query heads,
    `kv_heads` x `head_dim`): `[b, heads, r + 2p]` with r = 2p = kv_heads * head_dim. n = 0, so the
    latent query is zero; each head's RoPE query fills its KV group's pairs (half layout: columns
    `r + g*P + j` and `r + kv_heads*P + g*P + j`, P = head_dim / 2) and is zero elsewhere."""
    kv_rank, pairs = kv_heads * head_dim, head_dim // 2
    q = torch.zeros(batch, heads, 2 * kv_rank, device=device, dtype=dtype)
    for head in range(heads):
        group = head // (heads // kv_heads)
        for half in range(2):
            start = kv_rank + half * kv_heads * pairs + group * pairs
            q[:, head, start : start + pairs] = torch.randn(batch, pairs, device=device, dtype=dtype)
    return q


def lossless_rows(device, dtype, batches, contexts, bandwidth, repeats, shape=None) -> list[tuple]:
    """Decode of the lossless conversion of the GQA attention `shape` = (query heads, KV heads, head
    dim), default 32, 8, 128 (same bytes a token as the GQA cache; 1024 + 1024 latent rows, every key
    dim RoPE) through `decode_attention`, beside SDPA over the GQA cache, same shapes:
    (batch, context, m2la ms, its % of copy BW, grouped ms, its % of copy BW, SDPA ms, m2la time / SDPA
    time, grouped time / SDPA time, max diff of the head outputs). "m2la" is the plain decode
    (`decode_attention`, what a lossless layer ran before the grouped decode); "grouped" is
    `grouped_decode_attention`, which converted models use for grouped layers. Times are graph replays on a GPU (eager elsewhere). SDPA reads the same keys and
    values copied into a GQA cache `[b, s, G, D]`, with the same queries. `convert(model)` with no
    compression gives this layout, and `auto` runs it through the Triton kernels on CUDA."""
    heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
    kv_rank = kv_heads * head_dim
    width = 2 * kv_rank
    row_bytes = width * dtype.itemsize
    num_blocks = max(batches) * math.ceil(max(contexts) / BLOCK_SIZE)
    num_blocks = min(num_blocks, int(0.3 * _free_bytes(device) / (BLOCK_SIZE * row_bytes)))
    cache = torch.empty(num_blocks, BLOCK_SIZE, width, device=device, dtype=dtype).uniform_(-1, 1)
    scale = head_dim**-0.5
    rows = []
    for context in contexts:
        for batch in batches:
            if batch * math.ceil(context / BLOCK_SIZE) > num_blocks or _out_of_time():
                rows.append((batch, context) + (None,) * 8)
                continue
            _, table, lens = paged_inputs(batch, context, kv_rank, kv_rank, dtype, device, cache)
            q = lossless_query(batch, heads, kv_heads, head_dim, dtype, device)
            nbytes = batch * context * row_bytes
            flops = 2 * heads * batch * context * (2 * kv_rank + kv_rank)  # zero latent query included

            def ours(q=q, table=table, lens=lens, cache=cache):
                return decode_attention(q, cache, lens, scale, kv_rank, table)

            ms, _, pct, gms, gpct, _ = _measure(ours, device, repeats, nbytes, bandwidth, flops)
            # the same keys and values as a GQA cache [b, s, G, D] (a copy): key of group g = its x | y halves
            rows_bs = gather_cache_rows(cache, table, context)  # [b, s, r + 2p]
            k = rows_bs[..., kv_rank:].unflatten(-1, (2, kv_heads, head_dim // 2)).transpose(-3, -2)
            k = k.reshape(batch, context, kv_heads, head_dim)
            v = rows_bs[..., :kv_rank].reshape(batch, context, kv_heads, head_dim)
            del rows_bs
            group = torch.arange(heads, device=device) // (heads // kv_heads)  # [h]
            q_pairs = q[..., kv_rank:].unflatten(-1, (2, kv_heads, head_dim // 2))  # [b, h, 2, G, P]
            pick = group.view(1, heads, 1, 1, 1).expand(batch, heads, 2, 1, head_dim // 2)
            q_gqa = q_pairs.gather(3, pick).flatten(-3)[:, None]  # [b, 1, h, D]: each head's own group
            sdpa = _measure(lambda q=q_gqa, k=k, v=v: _sdpa_gqa(q, k, v), device, repeats, nbytes, bandwidth, flops)
            q_group = q_gqa[:, 0].contiguous()  # [b, h, 2P]: each head's own group's pairs

            def grouped(q=q_group, table=table, lens=lens, cache=cache):
                return grouped_decode_attention(q, cache, lens, scale, kv_rank, kv_heads, table)

            g_ms, _, g_pct, g_gms, g_gpct, _ = _measure(grouped, device, repeats, nbytes, bandwidth, flops)
            out_latent, _ = ours()
            pick = group.view(1, heads, 1, 1).expand(batch, heads, 1, head_dim)
            ours_values = out_latent.unflatten(-1, (kv_heads, head_dim)).gather(2, pick)[:, :, 0]  # [b, h, D]
            expected = _sdpa_gqa(q_gqa, k, v)[:, :, 0].float()
            diff = max(
                (ours_values.float() - expected).abs().max().item(),
                (grouped()[0].float() - expected).abs().max().item(),
            )
            del k, v
            ours_ms, sdpa_ms, grouped_ms = gms or ms, sdpa[3] or sdpa[0], g_gms or g_ms
            rows.append((batch, context, ours_ms, gpct if gms else pct, grouped_ms, g_gpct if g_gms else g_pct, sdpa_ms,
                         ours_ms / sdpa_ms, grouped_ms / sdpa_ms, diff))  # fmt: skip
    del cache
    return rows


# Grouped decode tiles to time (overrides of `grouped_decode_config`). sm_90 compile facts at
# 8 x 128, bf16 (triton 3.9): the default (16 rows) runs mma.sync with one cache buffer, 100
# registers, 38 KiB; 64 rows (4 real) run wgmma with two pipelined buffers, 166 registers, 80 KiB.
GROUPED_DECODE_SWEEP = [{}, dict(BLOCK_H=64), dict(BLOCK_N=128), dict(BLOCK_N=32, num_stages=4), dict(num_stages=3)]


def grouped_decode_sweep_rows(device, dtype, batches, context, bandwidth, repeats, shape=None) -> list[tuple]:
    """`grouped_decode_attention` of a lossless layer (`shape` as in `lossless_rows`) per
    GROUPED_DECODE_SWEEP config, `context` tokens a sequence: (batch, config, ms, % of copy BW, max
    diff vs the default tiles). Graph replays on a GPU."""
    from m2la.kernels.latent_decode.triton import grouped_decode_triton

    heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
    kv_rank = kv_heads * head_dim
    row_bytes = 2 * kv_rank * dtype.itemsize
    num_blocks = max(batches) * math.ceil(context / BLOCK_SIZE)
    cache = torch.empty(num_blocks, BLOCK_SIZE, 2 * kv_rank, device=device, dtype=dtype).uniform_(-1, 1)
    rows = []
    for batch in batches:
        _, table, lens = paged_inputs(batch, context, kv_rank, kv_rank, dtype, device, cache)
        q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
        ref = None
        for config in GROUPED_DECODE_SWEEP:
            if _out_of_time():
                rows.append((batch, str(config or "default"), None, None, "skipped (time)"))
                continue

            def run(config=config, q=q, table=table, lens=lens, cache=cache):
                return grouped_decode_triton(q, cache, lens, head_dim**-0.5, kv_rank, kv_heads, table, config=config)

            try:
                out = run()[0].float()
                ref = out if ref is None else ref
                ms, _, pct, gms, gpct, _ = _measure(run, device, repeats, batch * context * row_bytes, bandwidth, 1)
                diff = f"{(out - ref).abs().max().item():.1e}"
                rows.append((batch, str(config or "default"), gms or ms, gpct if gms else pct, diff))
            except Exception as exc:  # a tile that does not fit is reported, not fatal
                rows.append((batch, str(config or "default"), None, None, type(exc).__name__))
    del cache
    return rows


def lossless_prefill_inputs(device, dtype, chunk, total, heads, kv_heads, head_dim, batch=1):
    """`batch` sequences of a lossless conversion of GQA attention (`kv_heads` x `head_dim`): `chunk`
    new tokens after `total - chunk` cached rows of `r + 2p` (r = 2p = kv_heads x head_dim) in a paged
    cache with shuffled pages -> (grouped queries `[b t, h, 2P]`, cache, cu_seqlens, seqlens, table)."""
    kv_rank = kv_heads * head_dim
    pages = math.ceil(total / BLOCK_SIZE)
    cache = torch.empty(batch * pages, BLOCK_SIZE, 2 * kv_rank, device=device, dtype=dtype).uniform_(-1, 1)
    table = torch.randperm(batch * pages, device=device).to(torch.int32).view(batch, pages)
    q = torch.randn(batch * chunk, heads, head_dim, device=device, dtype=dtype)
    cu = torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device=device)
    lens = torch.full((batch,), total, dtype=torch.int32, device=device)
    return q, cache, cu, lens, table


def gqa_copy(cache, table, total, kv_heads, head_dim):
    """A lossless layer's cache rows as the GQA keys and values they came from (a copy):
    `[b, G, s, D]` each; key of group g = its x | y RoPE halves, value = its latent slice."""
    kv_rank = kv_heads * head_dim
    rows = gather_cache_rows(cache, table, total)  # [b, s, r + 2p]
    b = rows.shape[0]
    k = rows[..., kv_rank:].unflatten(-1, (2, kv_heads, head_dim // 2)).permute(0, 3, 1, 2, 4)
    v = rows[..., :kv_rank].unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    return k.reshape(b, kv_heads, total, head_dim), v.contiguous()


def lossless_prefill_rows(device, dtype, chunk, prefixes, repeats, shape=None) -> list[tuple]:
    """Chunked prefill of a lossless conversion (default 32 heads over 8 x 128, batch 1, `chunk` new
    tokens after each prefix): the plain prefill (`prefill_attention`, auto mode, over the placed
    1024-wide RoPE queries and the grouped value map, what lossless layers ran before the grouped
    prefill), `grouped_prefill_attention` (flash tiles), and SDPA with GQA over the keys and values
    copied into `[1, G, s, D]` (the issue's baseline: the same attention on the source model's cache).
    TFLOPS count GQA's work (2P + v per head, query and visible key) for every row.
    Rows: (path, prefix, chunk, ms, TFLOPS, max diff vs SDPA)."""
    from m2la.kernels.latent_decode.reference import grouped_query

    heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
    kv_rank, scale = kv_heads * head_dim, head_dim**-0.5
    rows = []
    for prefix in prefixes:
        if _out_of_time():
            rows.append(("all", prefix, chunk, None, None, "skipped (time)"))
            continue
        total = prefix + chunk
        flops = 2 * heads * (chunk * prefix + chunk * (chunk + 1) / 2) * 2 * head_dim
        q, cache, cu, lens, table = lossless_prefill_inputs(device, dtype, chunk, total, heads, kv_heads, head_dim)
        k, v = gqa_copy(cache, table, total, kv_heads, head_dim)
        mask = None if prefix == 0 else _prefix_causal_mask(chunk, total, device)

        def sdpa(q=q, k=k, v=v, mask=mask):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )[0].transpose(0, 1)  # [t, h, D]

        expected = sdpa().float()
        placed = grouped_query(q, kv_rank, kv_heads)[..., kv_rank:]  # [t, h, 2p]: zero off each head's group
        group = torch.arange(heads, device=device) // (heads // kv_heads)
        select = torch.zeros(heads, kv_heads, head_dim, head_dim, device=device, dtype=dtype)
        select[torch.arange(heads, device=device), group] = torch.eye(head_dim, device=device, dtype=dtype)
        w_uv, w_uk = select.flatten(1, 2), torch.zeros(heads, kv_rank, 0, device=device, dtype=dtype)

        def plain(placed=placed, cache=cache, cu=cu, lens=lens, table=table, w_uv=w_uv, w_uk=w_uk, total=total):
            return prefill_attention(
                placed[..., :0], placed, cache, w_uk, w_uv, cu, lens, scale, table, max_seqlen_q=chunk,
                max_seqlen_k=total,
            )[0]  # fmt: skip

        def grouped(q=q, cache=cache, cu=cu, lens=lens, table=table):
            return grouped_prefill_attention(
                q, cache, cu, lens, scale, kv_rank, kv_heads, table, max_seqlen_q=chunk, mode="flash"
            )[0]

        for name, fn in (
            ("m2la plain prefill (before)", plain),
            ("m2la grouped prefill", grouped),
            ("SDPA, GQA", sdpa),
        ):
            try:
                diff = f"{(fn().float() - expected).abs().max().item():.1e}"
                ms = timed_ms(fn, device, repeats)
                rows.append((name, prefix, chunk, ms, flops / ms / 1e9, diff))
            except Exception as exc:  # e.g. out of memory: reported, not fatal
                rows.append((name, prefix, chunk, None, None, type(exc).__name__))
        del cache, k, v
    return rows


# Grouped prefill tiles (overrides of `prefill_config`) timed in the lossless_prefill section. sm_90
# compile on CPU (triton 3.9, bf16, paged, 8 x 128): every one wgmma without spills; the paged default
# keeps 2 buffers at 3 stages (96 KiB), a contiguous cache 3 (128 KiB, 255 registers); BLOCK_N 128
# spills 56 B, so it is left out.
GROUPED_PREFILL_SWEEP = [{}, dict(num_stages=2), dict(BLOCK_M=64, num_warps=4), dict(BLOCK_N=32, num_stages=4)]


def grouped_prefill_sweep_rows(device, dtype, chunk, prefix, repeats, shape=None) -> list[tuple]:
    """`grouped_prefill_attention`'s flash tiles per GROUPED_PREFILL_SWEEP config (one sequence,
    `chunk` new tokens after `prefix`): (config, ms, TFLOPS of GQA's work, max diff vs the default)."""
    from m2la.kernels.latent_prefill.triton import grouped_prefill_triton

    heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
    kv_rank, scale, total = kv_heads * head_dim, head_dim**-0.5, prefix + chunk
    flops = 2 * heads * (chunk * prefix + chunk * (chunk + 1) / 2) * 2 * head_dim
    q, cache, cu, lens, table = lossless_prefill_inputs(device, dtype, chunk, total, heads, kv_heads, head_dim)
    rows, ref = [], None
    for config in GROUPED_PREFILL_SWEEP:
        if _out_of_time():
            rows.append((str(config or "default"), None, None, "skipped (time)"))
            continue

        def run(config=config, cache=cache):
            return grouped_prefill_triton(
                q, cache, cu, lens, scale, kv_rank, kv_heads, table, chunk, "flash", config=config
            )[0]

        try:
            out = run().float()
            ref = out if ref is None else ref
            ms = timed_ms(run, device, repeats)
            rows.append((str(config or "default"), ms, flops / ms / 1e9, f"{(out - ref).abs().max().item():.1e}"))
        except Exception as exc:  # a tile that does not fit is reported, not fatal
            rows.append((str(config or "default"), None, None, type(exc).__name__))
    del cache
    return rows


def grouped_extend_rows(device, dtype, batch, prefix, new_tokens, repeats, shape=None) -> list[tuple]:
    """Short extends of a lossless conversion through `grouped_prefill_attention`'s two modes, `t` new
    tokens in each of `batch` sequences after `prefix` cached tokens, beside the decode route before
    query blocks were packed ("decode, per token": one grouped decode a query token, which reads the
    cache once a token); "auto" is `choose_grouped_prefill_mode` (an untimed estimate until this runs).
    Rows: (t, mode, ms, max diff vs the decode route, auto)."""
    from m2la.kernels.latent_decode.triton import grouped_decode_triton
    from m2la.kernels.latent_prefill.triton import choose_grouped_prefill_mode, per_token_decodes

    heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
    kv_rank, scale = kv_heads * head_dim, head_dim**-0.5
    rows = []
    for t in new_tokens:
        if _out_of_time():
            rows.append((t, "all", None, "skipped (time)", ""))
            continue
        q, cache, cu, lens, table = lossless_prefill_inputs(
            device, dtype, t, prefix + t, heads, kv_heads, head_dim, batch
        )
        auto = choose_grouped_prefill_mode(batch * t, batch, heads // kv_heads)
        token_lens, token_table, _ = per_token_decodes(batch * t, cu, lens, table, None)
        ref = None
        for mode in ("decode", "flash", "decode, per token"):

            def run(mode=mode, q=q, cache=cache, cu=cu, lens=lens, table=table, t=t, tl=token_lens, tt=token_table):
                if mode == "decode, per token":
                    return grouped_decode_triton(q, cache, tl, scale, kv_rank, kv_heads, tt)
                return grouped_prefill_attention(
                    q, cache, cu, lens, scale, kv_rank, kv_heads, table, max_seqlen_q=t, mode=mode
                )

            try:
                out = run()[0].float()
                ref = out if ref is None else ref
                ms = timed_ms(run, device, repeats)
                rows.append((t, mode, ms, f"{(out - ref).abs().max().item():.1e}", "auto" if mode == auto else ""))
            except Exception as exc:
                rows.append((t, mode, None, type(exc).__name__, ""))
        del cache
    return rows


def _sdpa_gqa(q, k, v):
    # [b, 1, h, d] -> [b, h, 1, d]; keys stay [b, 8, s, d] strided views, GQA handled by SDPA.
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    )


def prefill_inputs(device, dtype, chunk, total, kv_rank, rope_dim, batch=1, shuffled_pages=False, heads=HEADS):
    """`batch` sequences: `chunk` new queries each after `total - chunk` cached rows in a paged latent
    cache (pages in order, or shuffled), random up-projections
    -> (q_nope, q_rope, cache, w_uk, w_uv, cu_seqlens_q, seqlens, block_table)."""
    pages = math.ceil(total / BLOCK_SIZE)
    cache = torch.empty(batch * pages, BLOCK_SIZE, kv_rank + rope_dim, device=device, dtype=dtype)
    cache.uniform_(-1, 1)
    order = (
        torch.randperm(batch * pages, device=device) if shuffled_pages else torch.arange(batch * pages, device=device)
    )
    table = order.to(torch.int32).view(batch, pages)
    q_nope = torch.randn(batch * chunk, heads, NOPE_DIM, device=device, dtype=dtype)
    q_rope = torch.randn(batch * chunk, heads, rope_dim, device=device, dtype=dtype)
    w_uk = torch.randn(heads, kv_rank, NOPE_DIM, device=device, dtype=dtype) / kv_rank**0.5
    w_uv = torch.randn(heads, kv_rank, VALUE_DIM, device=device, dtype=dtype) / kv_rank**0.5
    cu = torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device=device)
    lens = torch.full((batch,), total, dtype=torch.int32, device=device)
    return q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table


def expanded_qkv(q_nope, q_rope, cache, w_uk, w_uv, table, total, kv_rank):
    """The issue's prefill baseline inputs: this layout's keys and values expanded per head ->
    q ``[1, h, t, n + 2p]``, k ``[1, h, s, n + 2p]`` (k_rope shared by the heads), v ``[1, h, s, v]``."""
    rows = gather_cache_rows(cache, table, total)  # [1, s, r + 2p]
    # the kernels take w_uk [h, r, n], w_uv [h, r, v]; attention_math takes [h, n, r], [h, v, r]
    k, v = expand_latent_kv(rows[..., :kv_rank], rows[..., kv_rank:], w_uk.mT, w_uv.mT, rows.dtype)
    q = torch.cat((q_nope, q_rope), dim=-1).transpose(0, 1)
    return q[None], k, v


def expanded_sdpa_variants(q, k, v, chunk, total, scale):
    """SDPA over expanded K/V, the ways a caller can ask for it (label -> fn returning [1, h, t, v]).
    Flash needs one head dim for q, k and v, so its variant pads v to n + 2p and slices the output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    sdpa = torch.nn.functional.scaled_dot_product_attention
    prefix = total - chunk
    mask = None if prefix == 0 else _prefix_causal_mask(chunk, total, q.device)
    bias = causal_lower_right(chunk, total)
    v_padded = torch.nn.functional.pad(v, (0, k.shape[-1] - v.shape[-1]))

    def flash_padded():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v_padded, attn_mask=bias, scale=scale)[..., : v.shape[-1]]

    return {
        "SDPA, bool mask": lambda: sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale),
        "SDPA, causal_lower_right": lambda: sdpa(q, k, v, attn_mask=bias, scale=scale),
        "SDPA flash, v padded to n+2p": flash_padded,
    }


def expanded_sdpa_rows(name, inputs, chunk, total, kv_rank, flops, ours, device, repeats):
    """The issue's baseline: SDPA over the expanded keys and values of the same layout (expansion not
    timed; its two GEMMs get a row of their own). Each row checks its output against our kernel's."""
    q_nope, q_rope, cache, w_uk, w_uv, _, _, table = inputs
    rows = []

    def expand():
        return expanded_qkv(q_nope, q_rope, cache, w_uk, w_uv, table, total, kv_rank)

    q, k, v = expand()
    ms = timed_ms(expand, device, repeats)
    rows.append((f"{name}, expand K/V for SDPA (2 GEMMs + concat)", total - chunk, chunk, ms, None, ""))
    for label, fn in expanded_sdpa_variants(q, k, v, chunk, total, 0.1).items():
        try:
            diff = (fn()[0].transpose(0, 1).float() - ours.float()).abs().max().item()
            ms = timed_ms(fn, device, repeats)
            rows.append((f"{name}, {label}", total - chunk, chunk, ms, flops / ms / 1e9, f"{diff:.1e}"))
        except RuntimeError as exc:  # a backend that refuses the shape is reported, not fatal
            rows.append((f"{name}, {label}", total - chunk, chunk, None, None, type(exc).__name__))
    return rows


def expanded_part_rows(name, inputs, chunk, total, flops, ours, device, repeats):
    """Our expanded prefill in parts, side by side with what each part replaced:
    - the whole call replayed from a CUDA graph (the call is sync-free: no host launch gaps);
    - the expansion alone (gather + one GEMM over [W_uk | W_uv]) and the earlier two einsums;
    - the attention kernel alone on expanded K/V (comparable to the SDPA rows), in the default
      launch order (head groups sized to L2, longest query tiles first) and the earlier one
      (`HEAD_GROUP=1`: one head's query tiles after another's)."""
    from m2la.kernels.latent_prefill.triton import expand_cache_prefix, expanded_prefill_attention, expansion_weight

    q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table = inputs
    kv_rank, prefix = w_uk.shape[1], total - chunk
    rows = []

    def whole():
        return prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, cu, lens, 0.1, table,
                                 max_seqlen_q=chunk, max_seqlen_k=total, mode="expanded")  # fmt: skip

    try:
        gms, note = graph_ms(whole, device, repeats), ""
    except RuntimeError as exc:  # reported, not fatal: the GPU tests check capture on their own
        gms, note = None, f"capture failed: {type(exc).__name__}"
    rows.append((f"{name}, m2la expanded, CUDA graph", prefix, chunk, gms, flops / gms / 1e9 if gms else None, note))

    def expand_fused():
        return expand_cache_prefix(cache, w_uk, w_uv, table, 1, total, cache.dtype)

    def expand_two_einsums():  # the expansion before 2026-11-27 (tenth session)
        latent = gather_cache_rows(cache, table, total)[..., :kv_rank]
        return torch.einsum("bsr,hrn->bshn", latent, w_uk), torch.einsum("bsr,hrv->bshv", latent, w_uv)

    k_nope, k_rope, values = expand_fused()
    diff = (k_nope.float() - expand_two_einsums()[0].float()).abs().max().item()
    rows.append((f"{name}, m2la expansion only (gather + 1 GEMM)", prefix, chunk, timed_ms(expand_fused, device, repeats),
                 None, f"{diff:.1e} (keys vs 2 einsums)"))  # fmt: skip
    rows.append((f"{name}, m2la expansion, 2 einsums (earlier)", prefix, chunk,
                 timed_ms(expand_two_einsums, device, repeats), None, ""))  # fmt: skip
    # where the expansion's time goes: the weight concatenation (a copy of h (n + v) r values each
    # call) against the GEMM alone, and the weights in converted models' layout ([h, n, r] storage,
    # passed as [h, r, n] views: `expansion_weight` then copies to [h, n + v, r], GEMM on B^T)
    w_uk_hnr, w_uv_hnr = w_uk.mT.contiguous().mT, w_uv.mT.contiguous().mT
    latent = gather_cache_rows(cache, table, total)[..., :kv_rank]
    weight = expansion_weight(w_uk, w_uv, cache.dtype)
    for label, fn in (
        ("expansion, weights stored [h, n, r] as in converted models",
         lambda: expand_cache_prefix(cache, w_uk_hnr, w_uv_hnr, table, 1, total, cache.dtype)),
        ("expansion weight concatenation only", lambda: expansion_weight(w_uk, w_uv, cache.dtype)),
        ("expansion weight concatenation only, [h, n, r] storage",
         lambda: expansion_weight(w_uk_hnr, w_uv_hnr, cache.dtype)),
        ("expansion GEMM only (gathered latent, weight ready)", lambda: latent @ weight),
    ):  # fmt: skip
        rows.append((f"{name}, m2la {label}", prefix, chunk, timed_ms(fn, device, repeats), None, ""))
    for label, config in (
        ("default order", None),
        ("HEAD_GROUP=1, earlier order", dict(HEAD_GROUP=1)),
        ("TMA tile (opt-in)", dict(TMA=True, BLOCK_D=NOPE_DIM)),  # keys and values by TMA, no cp.async
    ):

        def attend(config=config):
            return expanded_prefill_attention(
                q_nope, q_rope, k_nope, k_rope, values, cu, lens, 0.1, chunk, config=config
            )

        start = time.perf_counter()
        diff = (attend()[0].float() - ours.float()).abs().max().item()
        # CPU (the interpreter's smoke run): that one call is the timing; it takes seconds
        ms = timed_ms(attend, device, repeats) if device.type == "cuda" else (time.perf_counter() - start) * 1e3
        rows.append((f"{name}, m2la attention only, {label}", prefix, chunk, ms, flops / ms / 1e9, f"{diff:.1e}"))
    return rows


def prefill_rows(device, dtype, chunk, prefixes, repeats):
    """Chunked prefill of `chunk` new tokens after a cached prefix, one sequence; TFLOPS of the
    attention actually computed (causal). Baselines: SDPA over the same layout's expanded keys and
    values (the issue's target), and SDPA over the GQA K/V of the same length.
    Rows: (path, prefix, chunk, ms, TFLOPS, max diff vs our expanded output)."""
    rows = []
    for prefix in prefixes:
        if _out_of_time():
            break
        total = prefix + chunk
        visible_pairs = chunk * prefix + chunk * (chunk + 1) / 2
        for name, (kv_rank, rope_dim) in LAYOUTS.items():
            q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table = prefill_inputs(
                device, dtype, chunk, total, kv_rank, rope_dim
            )
            ours = None
            for mode in ("expanded", "absorbed"):
                dims = (NOPE_DIM + rope_dim + VALUE_DIM) if mode == "expanded" else (2 * kv_rank + rope_dim)
                flops = 2 * HEADS * visible_pairs * dims

                def run(mode=mode, inputs=(q_nope, q_rope, cache, w_uk, w_uv, cu, lens), table=table, total=total):
                    return prefill_attention(*inputs, 0.1, table, max_seqlen_q=chunk, max_seqlen_k=total, mode=mode)

                ours = run()[0] if ours is None else ours
                ms = timed_ms(run, device, repeats)
                rows.append((f"{name}, m2la {mode}", prefix, chunk, ms, flops / ms / 1e9, ""))
            expanded_flops = 2 * HEADS * visible_pairs * (NOPE_DIM + rope_dim + VALUE_DIM)
            inputs = (q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table)
            rows += expanded_part_rows(name, inputs, chunk, total, expanded_flops, ours, device, repeats)
            rows += expanded_sdpa_rows(name, inputs, chunk, total, kv_rank, expanded_flops, ours, device, repeats)
            del cache, inputs
        q = torch.randn(1, HEADS, chunk, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(1, GQA_KV_HEADS, total, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        mask = None if prefix == 0 else _prefix_causal_mask(chunk, total, device)
        flops = 2 * HEADS * visible_pairs * (2 * HEAD_DIM)

        def sdpa(mask=mask, q=q, k=k, v=v):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )

        ms = timed_ms(sdpa, device, repeats)
        rows.append(("GQA 8x128 SDPA (Qwen3-VL's own cache)", prefix, chunk, ms, flops / ms / 1e9, ""))
    return rows


# Prefill tile configs (overrides of `prefill_config`), timed in expanded mode (n = 128: the default
# keeps q_nope resident, BLOCK_M 128, BLOCK_N 64, 8 warps, 2 stages); the second row is the earlier
# default (64-query tiles, q_nope re-read in 64-wide chunks). In the compile-only check (triton 3.9)
# all run wgmma without spills and fit sm_90's shared memory, except BLOCK_N 128 at rope 128 (256 KiB).
PREFILL_SWEEP = [
    {},
    dict(BLOCK_M=64, BLOCK_D=64, num_warps=4),
    dict(num_stages=2),  # the default before 2026-11-27
    dict(BLOCK_N=128, num_stages=2),
    dict(BLOCK_M=64, num_warps=4),
    dict(BLOCK_N=32, num_stages=3),
    dict(TMA=True),  # keys and values through tensor descriptors (opt-in; fifteenth session)
]


def prefill_sweep_rows(device, dtype, chunk, prefixes, repeats):
    """Expanded chunked prefill (one sequence) per PREFILL_SWEEP config: ms and TFLOPS."""
    from m2la.kernels.latent_prefill.triton import latent_prefill_triton

    rows = []
    for prefix in prefixes:
        total = prefix + chunk
        visible_pairs = chunk * prefix + chunk * (chunk + 1) / 2
        for name, (kv_rank, rope_dim) in LAYOUTS.items():
            q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table = prefill_inputs(
                device, dtype, chunk, total, kv_rank, rope_dim
            )
            flops = 2 * HEADS * visible_pairs * (NOPE_DIM + rope_dim + VALUE_DIM)
            inputs = (q_nope, q_rope, cache, w_uk, w_uv, cu, lens, 0.1, table)
            ref = None
            for config in PREFILL_SWEEP:
                if _out_of_time():
                    rows.append((name, prefix, str(config or "default"), "skipped (time)", None, None))
                    continue
                try:

                    def run(config=config, inputs=inputs, total=total):
                        return latent_prefill_triton(
                            *inputs, max_seqlen_q=chunk, max_seqlen_k=total, mode="expanded", config=config
                        )

                    out, _ = run()
                    ref = out.float() if ref is None else ref
                    err = f"{(out.float() - ref).abs().max().item():.1e}"
                    ms = timed_ms(run, device, repeats)
                    rows.append((name, prefix, str(config or "default"), err, ms, flops / ms / 1e9))
                except Exception as exc:
                    rows.append((name, prefix, str(config or "default"), type(exc).__name__, None, None))
            del cache
    return rows


def extend_rows(device, dtype, batch, prefix, new_tokens, repeats):
    """Short extends (speculative tokens, short turns): `t` new tokens in each of `batch` sequences
    after a `prefix`-token cache, through each prefill mode; "auto" picks by `choose_prefill_mode`.
    Rows: (layout, t, mode, ms, max diff vs the decode route, what auto picks)."""
    from m2la.kernels.latent_prefill.triton import choose_prefill_mode

    rows = []
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        for t in new_tokens:
            if _out_of_time():
                rows.append((name, t, "all", None, "skipped (time)", ""))
                continue
            total = prefix + t
            *inputs, table = prefill_inputs(device, dtype, t, total, kv_rank, rope_dim, batch, shuffled_pages=True)
            auto = choose_prefill_mode(batch * t, batch, kv_rank, NOPE_DIM, VALUE_DIM, rope_dim)
            ref = None
            for mode in ("decode", "absorbed", "expanded"):

                def run(mode=mode, inputs=tuple(inputs), table=table, t=t, total=total):
                    return prefill_attention(*inputs, 0.1, table, max_seqlen_q=t, max_seqlen_k=total, mode=mode)

                try:
                    out = run()[0].float()
                    ref = out if ref is None else ref
                    ms = timed_ms(run, device, repeats)
                    rows.append(
                        (name, t, mode, ms, f"{(out - ref).abs().max().item():.1e}", "auto" if mode == auto else "")
                    )
                except Exception as exc:  # e.g. out of memory: reported, not fatal
                    rows.append((name, t, mode, None, type(exc).__name__, ""))
    return rows


def packed_extend_rows(device, dtype, batch, prefix, new_tokens, repeats, heads=16):
    """The decode route of a `heads`-head layer (16: two tokens share a 32-row tile) with packed query
    blocks (`max_seqlen_q` given) beside one decode a token (`max_seqlen_q=0`), each layout, `t` new
    tokens in each of `batch` sequences after `prefix`: (layout, t, route, ms, max diff vs packed)."""
    rows = []
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        for t in new_tokens:
            if _out_of_time():
                rows.append((name, t, "all", None, "skipped (time)"))
                continue
            total = prefix + t
            *inputs, table = prefill_inputs(device, dtype, t, total, kv_rank, rope_dim, batch, True, heads)
            ref = None
            for route, max_q in (("packed", t), ("one decode a token", 0)):

                def run(max_q=max_q, inputs=tuple(inputs), table=table):
                    return prefill_attention(*inputs, 0.1, table, max_seqlen_q=max_q, mode="decode")

                try:
                    out = run()[0].float()
                    ref = out if ref is None else ref
                    ms = timed_ms(run, device, repeats)
                    rows.append((name, t, route, ms, f"{(out - ref).abs().max().item():.1e}"))
                except Exception as exc:  # e.g. out of memory: reported, not fatal
                    rows.append((name, t, route, None, type(exc).__name__))
    return rows


def _prefix_causal_mask(chunk, total, device):
    pos = total - chunk + torch.arange(chunk, device=device)
    return torch.arange(total, device=device)[None, :] <= pos[:, None]


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script")
    parser.add_argument("--seconds", type=float, default=270, help="time box; later cases are reported n/a")
    parser.add_argument("--sweep-seconds", type=float, default=70, help="time box of the decode tile sweep")
    parser.add_argument(
        "--sections",
        default="sweep,decode,fp8,vllm,splits,prefill,prefill_sweep,extend",
        help="comma-separated subset to run",
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="decode contexts (default 4K..128K)")
    parser.add_argument("--warm-workers", type=int, default=12, help="processes compiling the sweep first (0: off)")
    parser.add_argument("--warm-only", action="store_true", help="only compile the sweep cases (fills triton's cache)")
    parser.add_argument("--use-best", action="store_true", help="decode table with the sweep's best tile per layout")
    parser.add_argument("--sweep-set", choices=sorted(SWEEP_SETS), default="all", help="which SWEEP list to time")
    args = parser.parse_args()
    DEADLINE[0] = time.monotonic() + args.seconds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = pathlib.Path(os.environ.get("OUT") or "/tmp/m2la-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:  # one narrow layout: the interpreter is slow
        LAYOUTS.clear()
        LAYOUTS["latent 60+16 (smoke)"] = (60, 16)
        batches, contexts, chunk, prefixes, repeats, copy_bytes = [1, 2], [64, 200], 32, [0, 64], 2, 2**20
        sweep_shapes = [(2, 200)]
    else:
        batches, contexts = [1, 8, 32, 64], [4096, 16384, 32768, 65536, 131072]
        chunk, prefixes, repeats, copy_bytes = 4096, [0, 16384], 10, 2**30
        sweep_shapes = SWEEP_SHAPES
    contexts = args.contexts or contexts
    lossless_contexts = contexts[:3]
    wanted = set(args.sections.split(","))
    SWEEP[:] = SWEEP_SETS[args.sweep_set]
    if args.warm_only:
        print(warm_all(device, sweep_shapes, max(1, args.warm_workers)) if device.type == "cuda" else "no CUDA")
        return
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import triton

    lines = [f"# m2la kernel benchmark ({device_name}, {dtype}, torch {torch.__version__}, triton {triton.__version__})",
             "", f"Command: `python benchmarks/gpu_kernels.py{' --smoke' if args.smoke else ''}`; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. n/a = skipped (memory or time box).", ""]  # fmt: skip
    report_path = out_dir / "kernels.md"

    def flush() -> None:  # rewritten after every section, so a timeout still returns what was measured
        report_path.write_text("\n".join(lines) + "\n")

    sections = []
    try:
        lines += ["## Correctness (Triton vs fp32 reference, b=3, 1000 tokens)", "",
                  "| case | max abs err | max lse err |", "|---|---|---|", *check_correctness(device, dtype), ""]  # fmt: skip
        bandwidth = copy_bandwidth_gbs(device, copy_bytes)
        lines += [f"Measured device copy bandwidth: **{bandwidth:.0f} GB/s** (read + write)", ""]
        flush()
        sections.append("sweep")
        if "sweep" not in wanted:
            sweep_shapes = []
        if sweep_shapes and device.type == "cuda" and args.warm_workers > 0:
            lines += [warm_all(device, sweep_shapes, args.warm_workers), ""]
        sweep = sweep_rows(device, dtype, sweep_shapes, bandwidth, repeats, args.sweep_seconds)
        winners = best_configs(sweep) if args.use_best else {}
        fp8_winners = best_configs(sweep, fp8=True) if args.use_best else {}
        lines += ["## Decode config sweep (overrides of `decode_config`; see SWEEP in this script)", "",
                  "| layout | shape: config | max diff vs default | ms | % of copy BW | TFLOPS |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {c} | {e} | {fmt(ms, '.3f')} | {fmt(p, '.0f')} | {fmt(tf, '.0f')} |"
                  for n, c, e, ms, p, tf in sweep]  # fmt: skip
        lines += ["", f"Best tile config per layout (geometric mean over the sweep shapes; used below): {winners}",
                  "", f"Best fp8-cache tile per layout (against the fp8 default; used below): {fp8_winners}", ""]  # fmt: skip
        flush()
        sections.append("decode")
        if "decode" not in wanted:
            contexts = []
        decode = decode_rows(device, dtype, batches, contexts, bandwidth, repeats, winners)
        if "fp8" in wanted:  # same shapes, e4m3 cache (the sweep's best fp8 tile), right after the bf16 rows
            decode += decode_rows(device, dtype, batches, contexts, bandwidth, repeats, fp8_winners, fp8=True)
        if "vllm" in wanted:  # vLLM's Triton MLA decode on the same caches, when extracted
            vllm_decode, vllm_checks = vllm_rows(device, dtype, batches, contexts, bandwidth, repeats)
            decode += vllm_decode
            if vllm_checks:
                lines += ["### vLLM's Triton MLA decode (benchmarks/vllm_triton_mla.py) against ours, same inputs", "",
                          "| case | max abs diff | |", "|---|---|---|", *vllm_checks, ""]  # fmt: skip
        try:
            import flash_attn  # noqa: F401

            use_flash = device.type == "cuda"
        except ImportError:
            use_flash = False
        decode += gqa_decode_rows(device, dtype, batches, contexts, bandwidth, repeats, use_flash)
        decode += torch_absorbed_rows(device, dtype, batches, contexts[:3], bandwidth, repeats)
        lines += ["## Decode (one token per sequence, 32 query heads; bytes = cache rows read)", "",
                  "Eager = one Python call per step (launch overhead included); graph = replayed CUDA graph.", "",
                  "TFLOPS: the attention's FLOPs over the graph time (eager where no graph), for the "
                  "tensor-core side of the roofline (`latent_decode_flops`).", "",
                  "| layout | batch | context | eager ms | GB/s | % of copy BW | graph ms | graph % of copy BW | TFLOPS |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {n} | {b} | {s} | {fmt(ms, '.3f')} | {fmt(gbs, '.0f')} | {fmt(pct, '.0f')} | {fmt(gms, '.3f')} "
            f"| {fmt(gpct, '.0f')} | {fmt(tf, '.0f')} |"
            for n, b, s, ms, gbs, pct, gms, gpct, tf in decode
        ]
        flush()
        if contexts:
            host = host_rows(device, dtype, contexts[0], repeats)
            lines += ["", f"## Host share of an eager decode call (b=1, context {contexts[0]}; same inputs)", "",
                      "| layout | entry point | back-to-back ms a call | graph ms | max diff vs decode_attention |", "|---|---|---|---|---|",
                      *[f"| {n} | {e} | {fmt(ms, '.3f')} | {fmt(gms, '.3f')} | {d:.1e} |" for n, e, ms, gms, d in host],
                      ""]  # fmt: skip
            flush()
        sections.append("lossless")
        if "lossless" in wanted:  # not in the default sections
            shape = (4, 2, 16) if args.smoke else None  # smoke: 4 query heads, 2 KV heads x 16 (interpreter)
            lossless = lossless_rows(device, dtype, batches[:3], lossless_contexts, bandwidth, repeats, shape)
            heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
            width = kv_heads * head_dim
            lines += ["", f"## Decode of a lossless conversion ({heads} heads, {width} + {width}: every key dim RoPE) "
                      f"against SDPA over the GQA cache it came from ({kv_heads} x {head_dim}; same bytes a token)", "",
                      "| batch | context | plain decode ms | % of copy BW | grouped decode ms | % of copy BW | SDPA ms "
                      "| plain / SDPA time | grouped / SDPA time | max diff |", "|---|---|---|---|---|---|---|---|---|---|",
                      *[f"| {b} | {s} | {fmt(ms, '.3f')} | {fmt(p, '.0f')} | {fmt(gm, '.3f')} | {fmt(gp, '.0f')} "
                        f"| {fmt(sd, '.3f')} | {fmt(x, '.2f')} | {fmt(gx, '.2f')} | {fmt(d, '.1e')} |"
                        for b, s, ms, p, gm, gp, sd, x, gx, d in lossless]]  # fmt: skip
            flush()
            sweep_context = 64 if args.smoke else 32768
            gd_sweep = grouped_decode_sweep_rows(device, dtype, batches[1:3], sweep_context, bandwidth, repeats, shape)
            lines += ["", f"## Grouped decode tiles ({sweep_context} tokens a sequence; overrides of "
                      "`grouped_decode_config`)", "", "| batch | config | ms | % of copy BW | max diff vs default |",
                      "|---|---|---|---|---|",
                      *[f"| {b} | {c} | {fmt(ms, '.3f')} | {fmt(p, '.0f')} | {d} |" for b, c, ms, p, d in gd_sweep]]  # fmt: skip
            flush()
        sections.append("lossless_prefill")
        if "lossless_prefill" in wanted:  # not in the default sections
            shape = (4, 2, 16) if args.smoke else None
            heads, kv_heads, head_dim = shape or (HEADS, GQA_KV_HEADS, HEAD_DIM)
            lossless_p = lossless_prefill_rows(device, dtype, chunk, prefixes, repeats, shape)
            lines += ["", f"## Chunked prefill of a lossless conversion ({heads} heads over {kv_heads} x {head_dim}, "
                      f"{chunk} new tokens, batch 1) against SDPA with GQA over the source cache's keys and values", "",
                      "TFLOPS: GQA's work (2P + v per head, query and visible key) over each row's time.", "",
                      "| path | cached prefix | chunk | ms | TFLOPS | max diff vs SDPA |", "|---|---|---|---|---|---|",
                      *[f"| {n} | {p} | {c} | {fmt(ms, '.2f')} | {fmt(tf, '.1f')} | {d} |"
                        for n, p, c, ms, tf, d in lossless_p]]  # fmt: skip
            flush()
            sweep_prefix = prefixes[-1] if prefixes else 0
            gsweep = grouped_prefill_sweep_rows(device, dtype, chunk, sweep_prefix, repeats, shape)
            lines += ["", f"## Grouped prefill tiles ({chunk} new tokens after {sweep_prefix}; overrides of "
                      "`prefill_config`)", "", "| config | ms | TFLOPS | max diff vs default |", "|---|---|---|---|",
                      *[f"| {c} | {fmt(ms, '.2f')} | {fmt(tf, '.1f')} | {d} |" for c, ms, tf, d in gsweep]]  # fmt: skip
            flush()
            batch, prefix, new_tokens = (
                (2, 40, [1, 3, 9]) if args.smoke else (8, 32768, [1, 2, 4, 8, 16, 32, 48, 64, 128])
            )
            ext = grouped_extend_rows(device, dtype, batch, prefix, new_tokens, repeats, shape)
            lines += ["", f"## Short extends of a lossless conversion ({batch} sequences, {prefix} cached tokens each; "
                      "`grouped_prefill_attention` modes)", "",
                      "| new tokens a sequence | mode | ms | max diff vs decode route | auto |", "|---|---|---|---|---|",
                      *[f"| {t} | {m} | {fmt(ms, '.3f')} | {d} | {a} |" for t, m, ms, d, a in ext]]  # fmt: skip
            flush()
        sections.append("splits")
        if "splits" in wanted:
            splits = split_rows(device, dtype, bandwidth, repeats, args.smoke)
            lines += ["", "## Split placement: by each sequence's length (default) against by capacity (same inputs)", "",
                      "Short sequences in a long static cache and a ragged paged batch; graph ms on a GPU.", "",
                      "| case | batch | capacity | lengths | ms by length | ms by capacity | % of copy BW by length "
                      "| speedup | max diff |", "|---|---|---|---|---|---|---|---|---|",
                      *[f"| {n} | {b} | {c} | {ln} | {fmt(a, '.3f')} | {fmt(o, '.3f')} | {fmt(p, '.0f')} | "
                        f"{fmt(x, '.2f')} | {fmt(d, '.1e')} |" for n, b, c, ln, a, o, p, x, d in splits]]  # fmt: skip
            flush()
        sections.append("prefill")
        if "prefill" not in wanted:
            prefixes = []
        prefill = prefill_rows(device, dtype, chunk, prefixes, repeats)
        lines += ["", f"## Chunked prefill ({chunk} new tokens, batch 1)", "",
                  "SDPA rows run over the same layout's expanded keys and values (expansion timed on its own "
                  "row); max diff is against m2la's expanded output.", "",
                  "| path | cached prefix | chunk | ms | TFLOPS | max diff |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {p} | {c} | {fmt(ms, '.2f')} | {fmt(tf, '.1f')} | {d} |" for n, p, c, ms, tf, d in prefill]
        flush()
        sections.append("prefill_sweep")
        if "prefill_sweep" in wanted:
            sweep_p = prefill_sweep_rows(device, dtype, chunk, prefixes or [0], repeats)
            lines += ["", f"## Prefill tile sweep (expanded, {chunk} new tokens; overrides of `prefill_config`)", "",
                      "| layout | prefix | config | max diff vs default | ms | TFLOPS |", "|---|---|---|---|---|---|"]  # fmt: skip
            lines += [
                f"| {n} | {p} | {c} | {e} | {fmt(ms, '.2f')} | {fmt(tf, '.1f')} |" for n, p, c, e, ms, tf in sweep_p
            ]
        flush()
        sections.append("extend")
        if "extend" in wanted:
            batch, prefix, new_tokens = (2, 40, [1, 3]) if args.smoke else (8, 32768, [1, 4, 16, 32, 48, 64, 128])
            extend = extend_rows(device, dtype, batch, prefix, new_tokens, repeats)
            lines += ["", f"## Short extends ({batch} sequences, {prefix} cached tokens each; ms per call, all prefill modes)",
                      "", "| layout | new tokens a sequence | mode | ms | max diff vs decode route | auto |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {n} | {t} | {m} | {fmt(ms, '.3f')} | {d} | {a} |" for n, t, m, ms, d, a in extend]
            flush()
            packed_tokens = [2, 3] if args.smoke else [2, 4, 8, 16]
            packed = packed_extend_rows(device, dtype, batch, prefix, packed_tokens, repeats)
            lines += ["", f"## Packed decode route, 16 heads ({batch} sequences, {prefix} cached tokens each)", "",
                      "| layout | new tokens a sequence | route | ms | max diff vs packed |", "|---|---|---|---|---|",
                      *[f"| {n} | {t} | {r} | {fmt(ms, '.3f')} | {d} |" for n, t, r, ms, d in packed]]  # fmt: skip
    except Exception:
        lines += ["", f"**FAILED** after sections {sections}:", "```", traceback.format_exc(), "```"]
        raise
    finally:
        flush()
        print("\n".join(lines))


if __name__ == "__main__":
    main()
