"""Where expanded prefill's up-projection (`expand_cache_prefix`) spends its time, per weight storage.

Converted models store W_uk / W_uv as `[h, n, r]` and pass `[h, r, n]` views (`M2LAttention`);
`benchmarks/gpu_kernels.py` passes row-major `[h, r, n]` weights. `expansion_weight` copies each
into the layout its strides read fastest. This script times, for both storages, at a 4096-token
chunk with no prefix and after a 16K prefix (the prefill table's shapes): the gather, the weight
copy, the GEMM alone, the whole expansion, and the earlier code (one `[r, h, n + v]` copy whatever
the strides). Each row is timed three ways: CUDA-event median (warm L2), `triton.testing.do_bench`
(L2 flushed; what gpu_kernels.py reports) and a CUDA-graph replay (no host launch gaps), each
repeated over 3 rounds to show the spread.

Usage (GPU): python benchmarks/expansion_layouts.py  -> markdown table on stdout and in $OUT.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_kernels import LAYOUTS, capture_graph, prefill_inputs, timed_ms  # noqa: E402  (the prefill table's inputs)
from m2la.kernels._paging import gather_cache_rows  # noqa: E402
from m2la.kernels.latent_prefill.triton import expand_cache_prefix, expansion_weight  # noqa: E402

CUDA = torch.device("cuda")


# the three timings of each row (see the module docstring), through gpu_kernels' timers
def event_ms(fn) -> float:
    return timed_ms(fn, CUDA, 40, warmup=5, flush_l2=False)


def flushed_ms(fn) -> float:
    return timed_ms(fn, CUDA, 10)  # do_bench: 25 ms warm-up, 100 ms timed


def graph_ms(fn) -> float:
    return event_ms(capture_graph(fn, warmups=3).replay)


def old_weight(w_uk, w_uv, dtype):  # the code before 2026-11-27 (twelfth session), whatever the strides
    return torch.cat((w_uk.transpose(0, 1), w_uv.transpose(0, 1)), dim=-1).to(dtype).flatten(1)


def timing_rows(name: str, kv_rank: int, rope_dim: int, prefix: int, chunk: int, dtype, device) -> list[str]:
    total = prefix + chunk
    _, _, cache, w_uk, w_uv, _, _, table = prefill_inputs(device, dtype, chunk, total, kv_rank, rope_dim)
    latent = gather_cache_rows(cache, table, total)[..., :kv_rank]
    storages = {
        "[h, r, n] row-major": (w_uk, w_uv),
        "[h, n, r] (converted models)": (w_uk.mT.contiguous().mT, w_uv.mT.contiguous().mT),
    }
    lines = []
    for storage, (uk, uv) in storages.items():
        new_w, old_w = expansion_weight(uk, uv, dtype), old_weight(uk, uv, dtype)
        torch.testing.assert_close(new_w, old_w, rtol=0, atol=0)  # same values, maybe another layout
        parts = {
            "gather": lambda: gather_cache_rows(cache, table, total),
            "weight copy (expansion_weight)": lambda uk=uk, uv=uv: expansion_weight(uk, uv, dtype),
            "weight copy (earlier code)": lambda uk=uk, uv=uv: old_weight(uk, uv, dtype),
            "GEMM only (expansion_weight's layout)": lambda w=new_w: latent @ w,
            "GEMM only (earlier layout)": lambda w=old_w: latent @ w,
            "whole expand_cache_prefix": lambda uk=uk, uv=uv: expand_cache_prefix(
                cache, uk, uv, table, 1, total, dtype
            ),
        }
        for part, fn in parts.items():
            cols = []
            for timer in (event_ms, flushed_ms, graph_ms):
                runs = sorted(timer(fn) for _ in range(3))
                cols.append(f"{runs[0]:.3f} / {runs[1]:.3f} / {runs[2]:.3f}")
            lines.append(f"| {name} | {prefix} | {storage} | {part} | " + " | ".join(cols) + " |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    dtype = torch.bfloat16
    lines = [f"# Expansion timing by weight storage ({torch.cuda.get_device_name(CUDA)}, {dtype}, torch {torch.__version__})",
             "", "ms: min / median / max over 3 rounds.", "",
             "| layout | prefix | storage | part | event ms (warm L2) | do_bench ms (L2 flushed) | graph ms |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (kv_rank, rope_dim) in LAYOUTS.items():
        for prefix in (0, 16384):
            lines += timing_rows(name, kv_rank, rope_dim, prefix, 4096, dtype, CUDA)
    out = pathlib.Path(os.environ.get("OUT", "/tmp/m2la-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "expansion_layouts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
