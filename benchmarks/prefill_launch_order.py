"""A model of the prefill kernel's launch order: makespan over the ideal, by head-group size.

Programs are dispatched in launch order onto `--sms` slots (one resident prefill program per SM on
an H100: 160-208 KiB of shared memory); each takes as long as its key tiles plus a fixed
`--overhead` (prologue, epilogue), in key-tile units. This is greedy list scheduling, which is
what the hardware block scheduler does to first order; it is a model, not a timing.

    python benchmarks/prefill_launch_order.py            # 32 heads, 4K chunk, prefixes 0 and 16K
"""

from __future__ import annotations

import argparse
import heapq

from m2la.kernels.latent_prefill.triton import prefill_head_group


def launch_order(num_query_tiles: int, num_head_tiles: int, head_group: int) -> list[tuple[int, int]]:
    """(query tile, head tile) per program id, as `_prefill_kernel` decodes axis 0."""
    order = []
    for pid in range(num_query_tiles * num_head_tiles):
        group = pid // (head_group * num_query_tiles)
        first = group * head_group
        size = min(head_group, num_head_tiles - first)
        in_group = pid - first * num_query_tiles
        order.append((num_query_tiles - 1 - in_group // size, first + in_group % size))
    return order


def makespan(costs: list[float], slots: int) -> float:
    free = [0.0] * slots
    end = 0.0
    for cost in costs:
        done = heapq.heappop(free) + cost
        end = max(end, done)
        heapq.heappush(free, done)
    return end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[0, 16384])
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--overhead", type=float, default=4.0, help="per-program cost in key tiles")
    parser.add_argument("--head-bytes-per-key", type=int, default=(128 + 128) * 2, help="(n + v) x bf16")
    args = parser.parse_args()
    query_tiles = -(-args.chunk // args.block_m)
    print("| prefix | head group | makespan / ideal | |\n|---|---|---|---|")
    for prefix in args.prefixes:
        # a query tile's key tiles: keys up to its last query, in BLOCK_N tiles
        last_keys = [prefix + min(args.chunk, (m + 1) * args.block_m) for m in range(query_tiles)]
        costs = {m: -(-last_key // args.block_n) + args.overhead for m, last_key in enumerate(last_keys)}
        ideal = sum(costs.values()) * args.heads / args.sms
        default = prefill_head_group(args.heads, (prefix + args.chunk) * args.head_bytes_per_key)
        for group in sorted({1, 2, 4, 8, 16, args.heads, default}):
            order = launch_order(query_tiles, args.heads, group)
            ratio = makespan([costs[m] for m, _ in order], args.sms) / ideal
            note = "default" if group == default else ("earlier order" if group == 1 else "")
            print(f"| {prefix} | {group} | {ratio:.3f} | {note} |")


if __name__ == "__main__":
    main()
