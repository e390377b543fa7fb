"""One lossless-converted attention layer on CPU (reference backend math): the plain latent paths
against the grouped ones (`attention_math.grouped_attention_from_rows`), side by side in one run.

    python benchmarks/grouped_reference_cpu.py [--heads 9 --kv-heads 3 --head-dim 64] [--contexts 8192 32768]
        [--prefill 2048]

Default shape: SmolLM2-135M (9 query heads over 3 KV heads x 64), whose lossless conversion caches
rows of r + 2p = 192 + 192. Decode: one query token over `context` cached rows, the plain absorbed
decode (`latent_mqa`, two GEMMs over all r + 2p columns with the zero-padded query) against the grouped
one. Prefill: `prefill` tokens from an empty cache, the plain expanded SDPA (per-head keys of width 2p,
values expanded through w_uv) against the grouped SDPA (keys of width 2P). Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from m2la import attention_math as am
from m2la.kernels.latent_decode.reference import grouped_query


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, groups, head_dim = args.heads, args.kv_heads, args.head_dim
    kv_rank, scale = groups * head_dim, head_dim**-0.5
    group = torch.arange(heads) // (heads // groups)
    w_uv = torch.zeros(heads, head_dim, kv_rank)  # each head's values: its group's latent slice
    for h in range(heads):
        w_uv[h, :, group[h] * head_dim : (group[h] + 1) * head_dim] = torch.randn(head_dim, head_dim)
    w_group = torch.stack([w_uv[h, :, group[h] * head_dim : (group[h] + 1) * head_dim] for h in range(heads)])

    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, batch 1; {heads} heads over {groups} x {head_dim}"
    )
    print("\n| step | tokens | plain ms | grouped ms | plain / grouped | max diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        rows = torch.randn(1, context, 2 * kv_rank)
        q = torch.randn(1, 1, heads, head_dim)  # each head's own pairs
        placed = grouped_query(q[:, 0], kv_rank, groups)[:, None]  # [1, 1, h, r + 2p]

        def plain(placed=placed, rows=rows):
            return am.absorbed_from_rows(placed, rows, w_uv, scale, return_lse=False)[0]

        def grouped(q=q, rows=rows):
            out = am.grouped_attention_from_rows(q, rows, kv_rank, groups, scale, fused_softmax=False)
            return torch.einsum("bthr,hvr->bthv", out, w_group)

        diff = (plain() - grouped()).abs().max().item()
        p_ms, g_ms = median_ms(plain, args.repeats), median_ms(grouped, args.repeats)
        print(f"| decode | {context} | {p_ms:.2f} | {g_ms:.2f} | {p_ms / g_ms:.2f}x | {diff:.1e} |", flush=True)

    t = args.prefill
    rows = torch.randn(1, t, 2 * kv_rank)
    q = torch.randn(1, t, heads, head_dim)
    placed = grouped_query(q.flatten(0, 1), kv_rank, groups).unflatten(0, (1, t))[..., kv_rank:]  # [1, t, h, 2p]

    def plain_prefill():
        no_nope = placed[..., :0]
        return am.latent_attention_expanded_sdpa(
            no_nope, placed, rows[..., :kv_rank], rows[..., kv_rank:], torch.zeros(heads, 0, kv_rank), w_uv, scale
        )

    def grouped_prefill():
        out = am.grouped_attention_from_rows(q, rows, kv_rank, groups, scale, fused_softmax=True)
        return torch.einsum("bthr,hvr->bthv", out, w_group)

    diff = (plain_prefill() - grouped_prefill()).abs().max().item()
    p_ms, g_ms = median_ms(plain_prefill, args.repeats), median_ms(grouped_prefill, args.repeats)
    print(f"| prefill (causal) | {t} | {p_ms:.1f} | {g_ms:.1f} | {p_ms / g_ms:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
