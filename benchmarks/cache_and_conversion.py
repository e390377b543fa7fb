"""Cache bytes per token (measured and from configs) and the cost of converting SmolLM2.

    python benchmarks/cache_and_conversion.py

Measured rows read ``nbytes`` of the cache objects a real forward returned; config rows multiply
out the published layouts (no weights needed). Conversion time and peak memory are measured in this
process around ``m2la.convert`` on the real SmolLM2-135M (fp32).
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time

import torch

import m2la
from m2la.assets import load_smollm2, wiki_split
from m2la.config import M2LAConfig
from m2la.evaluation import cache_bytes_per_token, token_windows

FP8 = torch.float8_e4m3fn


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def layout_bytes_per_token(layers: int, kv_rank: int, rope_dim: int, dtype_bytes: int) -> int:
    """Bytes per token of an M²LA cache: layers x (r + d_r) x dtype bytes, via M2LAConfig."""
    config = M2LAConfig(
        hidden_size=1,
        num_heads=1,
        kv_rank=kv_rank,
        rope_dim=rope_dim,
        qk_nope_dim=0,
        v_head_dim=1,
        softmax_scale=1.0,
        rope_inv_freq=[1.0] * (rope_dim // 2),
        rope_axis=[0] * (rope_dim // 2),
        rope_source_column=list(range(rope_dim // 2)),
    )
    return layers * config.cache_bytes_per_token(dtype_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    rss_loaded = _peak_rss_mib()
    ids = token_windows(tokenizer, wiki_split("heldout"), 128, 1)
    original_bpt = cache_bytes_per_token(model, ids)

    converted = copy.deepcopy(model)
    rss_copied = _peak_rss_mib()
    start = time.perf_counter()
    report = m2la.convert(converted)
    seconds = time.perf_counter() - start
    rss_converted = _peak_rss_mib()
    lossless_bpt = cache_bytes_per_token(converted, ids)
    fp8_bpt = cache_bytes_per_token(converted, ids, make_cache=lambda: m2la.M2LACache.for_model(converted, FP8))

    rows = [
        ("SmolLM2-135M original (HF DynamicCache, fp32), measured", original_bpt),
        ("SmolLM2-135M m2la lossless (M2LACache, fp32), measured", lossless_bpt),
        ("SmolLM2-135M original, bf16 (30 x 2 x 3 x 64 x 2)", 30 * 2 * 3 * 64 * 2),
        ("SmolLM2-135M m2la lossless, bf16 (30 x (192 + 192) x 2)", layout_bytes_per_token(30, 192, 192, 2)),
        ("Qwen3-VL-8B GQA, bf16 (36 x 2 x 8 x 128 x 2)", 36 * 2 * 8 * 128 * 2),
        ("Qwen3-VL-8B m2la lossless, bf16 (36 x (1024 + 1024) x 2)", layout_bytes_per_token(36, 1024, 1024, 2)),
        ("InternVideo3 M²LA, bf16 (36 x (896 + 128) x 2)", layout_bytes_per_token(36, 896, 128, 2)),
        ("SmolLM2-135M m2la lossless, fp8 e4m3 M2LACache (rows + fp32 scale per token), measured", fp8_bpt),
        ("InternVideo3 M²LA, fp8 + fp32 scale (36 x (896 + 128 + 4))", 36 * (896 + 128 + 4)),
    ]
    print(
        f"date {time.strftime('%Y-%m-%d')}, machine {platform.machine()} {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print("\n| layout | bytes / token |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,.0f} |")
    print("\n| conversion of SmolLM2-135M (fp32) | value |\n|---|---:|")
    print(f"| m2la.convert wall time | {seconds:.2f} s |")
    print(f"| peak RSS after loading the model | {rss_loaded:,.0f} MiB |")
    print(f"| peak RSS after copy + convert | {rss_converted:,.0f} MiB |")
    print(f"| peak RSS added by convert (over the copied model) | {rss_converted - rss_copied:,.0f} MiB |")
    print(
        f"| report: {report.bytes_per_token_before} -> {report.bytes_per_token_after} B/token | "
        f"{report.compression_ratio:.2f}x |"
    )


if __name__ == "__main__":
    main()
