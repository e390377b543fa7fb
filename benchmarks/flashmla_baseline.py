"""FlashMLA's dense decode as a side-by-side baseline for `gpu_kernels.py` (not part of m2la).

FlashMLA (deepseek-ai/FlashMLA, MIT) is the Hopper MLA decode kernel users compare against. No
FlashMLA wheel installs here, but vLLM's wheel ships it, built for sm_90a, as
`vllm/_flashmla_C.abi3.so`. That file is a torch stable-ABI extension: from libtorch it needs only
`aoti_torch_*` / `torch_*` symbols, plus libcudart.so.13. The device's torch 2.11 cu130 exports all
of them (checked with `nm` against the torch 2.11.0+cu130 wheel; RESULTS.md, fifteenth session).

`extract` copies that one file out of a locally downloaded wheel into `benchmarks/_third_party/`.
That folder is git-ignored and never committed; pass it to the device with `carry`. `load`
registers the ops (`torch.ops._flashmla_C`) and `decode` calls `dense_decode_fwd` the way
FlashMLA's `flash_mla_with_kvcache` does. `run` checks both kernels against the fp32 reference and
times them side by side from CUDA graphs on the same paged cache, with vLLM's Triton MLA decode as a
third when `vllm_triton_mla.py` has extracted it. It runs in a process of its own
(gpu_check.sh's `flashmla` section), so a FlashMLA that fails to load or faults cannot take the
other benchmarks down.

FlashMLA's dense decode takes one layout only: DeepSeek's 512-wide latent plus a 64-wide RoPE key
(576 key columns, V = the first 512), 64-token pages, one KV head, bf16 or fp16. So the side-by-side
runs on that layout (`KV_RANK`, `ROPE_DIM`, `PAGE_SIZE`), not on InternVideo3's 896 + 128.

    pip download --no-deps vllm==0.33.0 -d /tmp/wheels
    python benchmarks/flashmla_baseline.py extract /tmp/wheels/vllm-0.33.0-*.whl
    python benchmarks/flashmla_baseline.py run            # on the GPU (gpu_check.sh, section flashmla)
    TRITON_INTERPRET=1 python benchmarks/flashmla_baseline.py run --smoke   # CPU: checks the script

`--smoke` runs a narrow layout on CPU with `TorchStandIn` in FlashMLA's place: plain torch written
from FlashMLA's documented interface (4-d query and cache, `[b, h, s_q]` LSE), so the adapter's
shapes and the report are checked without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import zipfile

import torch
import triton

SOURCE = "vllm/_flashmla_C.abi3.so"
DEST = pathlib.Path(__file__).with_name("_third_party") / "flashmla" / "_flashmla_C.abi3.so"
SCHEMA = b"dense_decode_fwd(Tensor q, Tensor kcache, int head_size_v, Tensor seqlens_k, Tensor block_table"
KV_RANK, ROPE_DIM, PAGE_SIZE = 512, 64, 64  # the one dense layout FlashMLA decodes


def extract(wheel: str | pathlib.Path) -> pathlib.Path:
    """Write FlashMLA's extension from a vLLM wheel to `DEST` (atomically); returns the path.

    Raises ValueError when the wheel lacks the file or the file lacks the `dense_decode_fwd` schema
    `decode` calls (a later FlashMLA may rename it)."""
    with zipfile.ZipFile(wheel) as archive:
        if SOURCE not in archive.namelist():
            raise ValueError(f"{wheel}: no {SOURCE} (this vLLM build has no FlashMLA)")
        binary = archive.read(SOURCE)
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), "vllm-?.dist-info")
    if not binary.startswith(b"\x7fELF") or SCHEMA not in binary:
        raise ValueError(f"{wheel}: {SOURCE} has no op {SCHEMA.decode()}...; update flashmla_baseline.decode")
    version = metadata.split("/")[0].removesuffix(".dist-info").split("-")[-1]
    DEST.parent.mkdir(parents=True, exist_ok=True)
    tmp = DEST.with_suffix(".tmp")
    tmp.write_bytes(binary)
    tmp.replace(DEST)
    DEST.with_name("SOURCE.txt").write_text(f"{SOURCE} from vLLM {version} (FlashMLA, MIT); not m2la code\n")
    return DEST


def load():
    """`torch.ops._flashmla_C` once `extract` has run here, else None. Raises RuntimeError naming
    the file when it is there but does not load (a torch or CUDA runtime it cannot bind to)."""
    if not DEST.is_file():
        return None
    try:
        torch.ops.load_library(str(DEST))
    except OSError as error:
        raise RuntimeError(f"FlashMLA ({DEST}) does not load into torch {torch.__version__}: {error}") from error
    return torch.ops._flashmla_C


def decode(ops, q, kv_cache, block_table, seqlens, softmax_scale, schedule: dict, kv_rank: int = KV_RANK):
    """`q [b, h, 576]` over the paged `kv_cache [blocks, 64, 576]` -> (`out [b, h, 512]`, `lse [b, h]`).

    `schedule` starts as an empty dict. The first call fills it with FlashMLA's tile-scheduler
    metadata, which later calls and graph replays reuse. It is valid only while the shapes and
    `seqlens` stay the same, as in FlashMLA's own interface. Pass `ops` from `load()`.
    """
    out, lse, metadata, num_splits = ops.dense_decode_fwd(
        q.unsqueeze(1),  # [b, s_q = 1, h, 576]
        kv_cache.unsqueeze(2),  # [blocks, 64, h_k = 1, 576]
        kv_rank, seqlens, block_table, softmax_scale, False,
        schedule.get("metadata"), schedule.get("num_splits"), None,
    )  # fmt: skip
    schedule["metadata"], schedule["num_splits"] = metadata, num_splits
    return out.squeeze(1), lse.squeeze(-1)  # [b, h, 512], [b, h]


class TorchStandIn:
    """FlashMLA's `dense_decode_fwd` contract in plain torch, for `run --smoke` on CPU: `q [b, s_q,
    h, d]`, `kcache [blocks, page, 1, d]` (V = its first `head_size_v` columns) -> `out [b, s_q, h,
    dv]` in q's dtype, `lse [b, h, s_q]` fp32, and the scheduler metadata (here a counter)."""

    def __init__(self):
        self.schedules_made = 0

    def dense_decode_fwd(self, q, kcache, head_size_v, seqlens_k, block_table, softmax_scale, is_causal,
                         tile_scheduler_metadata, num_splits, out_):  # fmt: skip
        assert q.dim() == 4 and kcache.dim() == 4 and kcache.shape[2] == 1 and q.shape[1] == 1 and out_ is None
        if tile_scheduler_metadata is None:
            self.schedules_made += 1
            tile_scheduler_metadata, num_splits = torch.zeros(1), torch.zeros(1)
        outs, lses = [], []
        for row, length in enumerate(seqlens_k.tolist()):
            keys = kcache[block_table[row].long(), :, 0].flatten(0, 1)[:length].double()  # [s, d]
            scores = torch.einsum("qhd,sd->hqs", q[row].double(), keys) * softmax_scale  # [h, s_q, s]
            lses.append(torch.logsumexp(scores, dim=-1))  # [h, s_q]
            outs.append(torch.einsum("hqs,sv->qhv", scores.softmax(-1), keys[:, :head_size_v]))
        return torch.stack(outs).to(q.dtype), torch.stack(lses).float(), tile_scheduler_metadata, num_splits


def _max_diff(a, b) -> float:
    both = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    return (a.double() - b.double())[both].abs().max().item() if both.any() else 0.0


def many_heads_tiles(kv_rank: int) -> dict[str, dict]:
    """Decode tiles for more than 32 heads, timed beside the default (not defaults: not yet timed).

    64 heads on the MMA M dimension, the whole latent resident (one key tile serves as the values),
    8 warps, 2 stages, 64- or 32-token tiles. For 64 or 128 heads at 512 + 64, sm_90 with triton 3.6
    gives 0 spills and wgmma only: 247 registers and 216 KiB of shared memory at 64 tokens, 214 and
    144 KiB at 32. The default for more than 32 heads chunks the scores over r and splits the values
    into two tiles, each recomputing the scores (68 B of spills, 64 KiB)."""
    width = triton.next_power_of_2(kv_rank)
    tile = dict(BLOCK_H=64, BLOCK_D=width, BLOCK_V=width, HEADS_ON_N=False, LATENT_PIECES=False, num_warps=8,
                num_stages=2)  # fmt: skip
    return {f"64-head tile, {n} tokens": dict(tile, BLOCK_N=n) for n in (64, 32)}


def case_rows(ops, heads, batch, context, kv_rank, rope_dim, device, dtype, bandwidth, cache, vllm=None) -> list[str]:
    """One shape on one paged cache: FlashMLA and m2la's `decode_attention` (and vLLM's Triton MLA
    decode when `vllm`, from `vllm_triton_mla.load()`) on the same queries and shuffled block table,
    each checked against the fp32 reference (output and LSE) and, on CUDA, timed from CUDA graphs.
    Table rows."""
    from m2la.kernels import decode_attention
    from m2la.kernels.latent_decode.triton import latent_decode_triton

    width = kv_rank + rope_dim
    blocks = -(-context // PAGE_SIZE)
    table = torch.randperm(cache.shape[0], device=device)[: batch * blocks].view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    if batch > 1:  # ragged: a one-token row and a row ending inside a page
        lens[0], lens[-1] = 1, context - PAGE_SIZE // 2 - 1
    q = torch.randn(batch, heads, width, device=device).to(dtype)
    scale = (128 + rope_dim) ** -0.5  # DeepSeek's: nope 128 + rope 64 per head before absorption
    schedule: dict = {}

    def flashmla():
        return decode(ops, q, cache, table, lens, scale, schedule, kv_rank)

    def m2la():
        return decode_attention(q, cache, lens, scale, kv_rank, table, backend="triton")

    def m2la_tile(config):
        return latent_decode_triton(q, cache, lens, scale, kv_rank, table, config=config)

    def vllm_triton_mla():
        import vllm_triton_mla  # noqa: PLC0415  (same folder)

        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        return vllm_triton_mla.decode(vllm, q, cache, table, lens, scale, kv_rank, context, sms)

    ref, ref_lse = decode_attention(q.float(), cache.float(), lens, scale, kv_rank, table, backend="reference")
    nbytes = int(lens.sum()) * width * cache.element_size() + q.numel() * q.element_size() * (1 + kv_rank / width)
    rows, timings = [], {}
    kernels = [("FlashMLA", flashmla), ("m2la", m2la)]
    if heads > 32 or not bandwidth:  # (the default tile already holds up to 32 heads whole)
        kernels += [(f"m2la, {name} (candidate)", functools.partial(m2la_tile, config))
                    for name, config in many_heads_tiles(kv_rank).items()]  # fmt: skip
    if vllm is not None:
        kernels.append(("vLLM Triton MLA", vllm_triton_mla))
    for name, fn in kernels:
        try:
            out, lse = fn()
            err, lse_err = f"{_max_diff(out, ref):.1e}", f"{_max_diff(lse, ref_lse):.1e}"
            ms = gbs = None
            if bandwidth:
                import gpu_kernels  # noqa: PLC0415  (timing helpers; same folder)

                try:
                    ms = gpu_kernels.graph_ms(fn, device, 20)
                except RuntimeError:  # not capturable (a host sync inside): eager, and said so
                    ms, name = gpu_kernels.timed_ms(fn, device, 20), f"{name} (eager: no CUDA graph)"
                timings[name.split(" (eager")[0]] = ms
                gbs = nbytes / ms / 1e6
        except RuntimeError as error:  # reported in its row; the other kernels still run
            err, lse_err, ms, gbs = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}", "-", None, None
        rows.append((name, err, lse_err, ms, gbs))
    lines = []
    for name, err, lse_err, ms, gbs in rows:
        pct = f"{100 * gbs / bandwidth:.0f}" if gbs else "n/a"
        speed = f"{timings['FlashMLA'] / ms:.2f}" if ms and "FlashMLA" in timings else "n/a"  # FlashMLA's / this
        lines.append(f"| {heads} | {batch} | {context} | {name} | {err} | {lse_err} | "
                     f"{f'{ms:.3f}' if ms else 'n/a'} | {f'{gbs:.0f}' if gbs else 'n/a'} | {pct} | {speed} |")  # fmt: skip
    return lines


def run(smoke: bool, stand_in: bool = False) -> int:
    """Check and time FlashMLA against m2la; prints a markdown table. Returns an exit status: 0, or
    1 when FlashMLA is unavailable (not extracted, or it does not load)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kv_rank, rope_dim = (60, 16) if smoke else (KV_RANK, ROPE_DIM)
    if stand_in:
        ops, origin = TorchStandIn(), "TorchStandIn (plain torch, FlashMLA's interface; not FlashMLA)"
    else:
        try:
            ops = load()
        except RuntimeError as error:
            print(f"FlashMLA unavailable: {error}")
            return 1
        if ops is None:
            print(f"FlashMLA unavailable: {DEST} not extracted (see this script's docstring)")
            return 1
        origin = (DEST.with_name("SOURCE.txt").read_text().strip() if DEST.with_name("SOURCE.txt").is_file()
                  else str(DEST))  # fmt: skip
    # DeepSeek-V3's 128 heads, its 16 per GPU at 8-way tensor parallelism, and Qwen3-VL-8B's 32;
    # 32K at batch 1, 8 and 64, and 4K at batch 64 (sized for 1-2 minutes with compiles; not yet run)
    shapes = [(1, 32768), (8, 32768), (64, 32768), (64, 4096)]
    cases = [(3, 1, 200), (70, 3, 200)] if smoke else [(h, b, s) for h in (16, 32, 128) for b, s in shapes]
    bandwidth = None
    header = f"FlashMLA: {origin}; layout {kv_rank} + {rope_dim}, {PAGE_SIZE}-token pages, {dtype}"
    if device.type == "cuda":
        import gpu_kernels  # noqa: PLC0415  (timing helpers; same folder)

        bandwidth = gpu_kernels.copy_bandwidth_gbs(device, 2**30)
        header += f"; {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth:.0f} GB/s"
    print(header + "\n")
    print("Errors: max abs against the fp32 reference (output, natural-log LSE). Graph ms: one decode call "
          "replayed from a CUDA graph (FlashMLA's scheduler metadata made before capture). Speed: FlashMLA's "
          "time / this row's time (above 1: faster than FlashMLA).\n")  # fmt: skip
    print(
        "| heads | batch | context | kernel | max err | max LSE err | graph ms | GB/s | % of copy BW | speed vs FlashMLA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    width = kv_rank + rope_dim
    max_blocks = max(b * -(-s // PAGE_SIZE) for _, b, s in cases)
    cache = torch.empty(max_blocks + 8, PAGE_SIZE, width, device=device).uniform_(-1, 1).to(dtype)
    import vllm_triton_mla  # noqa: PLC0415  (same folder; its kernel when extracted, else None)

    vllm = None if smoke else vllm_triton_mla.load()
    for heads, batch, context in cases:
        rows = case_rows(ops, heads, batch, context, kv_rank, rope_dim, device, dtype, bandwidth, cache, vllm)
        print("\n".join(rows), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="FlashMLA's dense decode beside m2la's (see the docstring)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("extract", help="copy FlashMLA's extension out of a vLLM wheel").add_argument("wheel")
    run_parser = commands.add_parser("run", help="check and time FlashMLA and m2la side by side")
    run_parser.add_argument("--smoke", action="store_true", help="narrow layout and TorchStandIn (CPU interpreter)")
    args = parser.parse_args()
    if args.command == "extract":
        print(extract(args.wheel), file=sys.stderr)
        return
    sys.exit(run(args.smoke, stand_in=args.smoke))


if __name__ == "__main__":
    main()
