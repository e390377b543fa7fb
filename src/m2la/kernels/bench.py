"""Kernel microbenchmarks, measured side by side in one run: m2la's latent decode and chunked
prefill against torch SDPA over the same model's uncompressed GQA cache (and, where they import,
flash_attn's kvcache decode and vLLM's Triton MLA decode on the same latent cache). `lossless`
times instead the grouped kernels that a GQA model's lossless conversion (`m2la.convert(model)`) runs.

Each row gives milliseconds, the bytes the kernel must move at the least (cache rows read, queries
read, outputs written), GB/s and its share of the device's measured copy bandwidth, TFLOPS of the
attention computed and (on CUDA) their share of a dense GEMM's measured in the same run: the two
sides of the roofline. Last, its speed over the SDPA row of the same batch and context. Every kernel is
checked against an fp32 run of the reference backend before anything is timed. `m2la bench decode`
and `m2la bench prefill` print the tables; `benchmarks/gpu_kernels.py`, the repository's fuller GPU
report, times with the same helpers.

Importing this module imports neither triton nor anything CUDA; timing on CUDA uses triton's
`do_bench` (L2 flushed between calls) over CUDA-graph replays where the call can be captured.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from m2la import kernels  # called as kernels.<op>, so the ops are looked up (and can be patched) at call time
from m2la.backends import resolve_backend

# The baselines' row labels, and what an fp8 cache adds to a kernel's
GQA_SDPA = "SDPA over the GQA cache"
EXPANDED_SDPA = "SDPA over expanded K/V"
FP8_LABEL = ", fp8 e4m3 cache"

# --- shapes and row accounting -------------------------------------------------------------------


@dataclass(frozen=True)
class BenchShape:
    """One attention layer, uncompressed and converted. The defaults are the comparison m2la's GPU
    benchmarks report: Qwen3-VL-8B's attention (32 query heads, GQA with 8 KV heads x 128) against InternVideo3's M²LA
    layout (latent r = 896, shared RoPE key 2p = 128, per-head no-RoPE query and value 128 wide)."""

    heads: int = 32
    kv_rank: int = 896
    rope_dim: int = 128
    nope_dim: int = 128
    value_dim: int = 128
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 64

    def __post_init__(self) -> None:
        for name in ("heads", "kv_rank", "rope_dim", "kv_heads", "head_dim", "block_size", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.nope_dim < 0:
            raise ValueError(f"nope_dim must be at least 0, got {self.nope_dim}")
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim is 2 x the rotary pairs, so it must be even; got {self.rope_dim}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def latent_width(self) -> int:
        return self.kv_rank + self.rope_dim

    @property
    def softmax_scale(self) -> float:
        return (self.nope_dim + self.rope_dim) ** -0.5

    def latent_row_bytes(self, dtype: torch.dtype, fp8: bool = False) -> int:
        """Cache bytes a token: `r + 2p` elements (fp8: one byte each plus a 4-byte scale)."""
        return self.latent_width + 4 if fp8 else self.latent_width * dtype.itemsize

    def gqa_row_bytes(self, dtype: torch.dtype) -> int:
        """The uncompressed cache's bytes a token: keys and values of every KV head."""
        return 2 * self.kv_heads * self.head_dim * dtype.itemsize


def _check_sizes(**sizes: tuple[Sequence[int], int]) -> None:
    """Each named list of sizes (values, least allowed) must be non-empty and at least its least value."""
    for name, (values, least) in sizes.items():
        if not values or min(values) < least:
            raise ValueError(f"{name} must be at least {least}, got {list(values)}")


def lossless_shape(shape: BenchShape) -> BenchShape:
    """`shape`'s GQA attention after a lossless conversion: latent and RoPE key each `kv_heads x
    head_dim` wide (every key dim rotary, so the head dim must be even), no no-RoPE part."""
    if shape.head_dim % 2:
        raise ValueError(f"a lossless conversion rotates every key dim, so head_dim must be even; got {shape.head_dim}")
    width = shape.kv_heads * shape.head_dim
    return replace(shape, kv_rank=width, rope_dim=width, nope_dim=0, value_dim=shape.head_dim)


@dataclass(frozen=True)
class ModelLayout:
    """One attention layout of a model (`model_layouts`): the shape, whether it is the lossless
    conversion of the GQA attention (so its layers run the grouped kernels), and its layers."""

    shape: BenchShape
    lossless: bool
    layers: tuple[int, ...]


def model_layouts(config: dict, block_size: int = 64) -> list[ModelLayout]:
    """The distinct attention layouts of a transformers `config.json` (a dict): an m2la checkpoint's
    converted layers (its "m2la" entry), grouped by layout in layer order, or for an unconverted
    model its GQA attention alone (latent ranks left at the defaults). Raises ValueError naming
    what is missing."""
    text = config.get("text_config") or config  # VL models keep the language model's in text_config
    try:
        heads = int(text.get("num_attention_heads") or config["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or config.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or (text.get("hidden_size") or config["hidden_size"]) // heads)
    except (KeyError, TypeError) as error:
        raise ValueError(f"config.json has no attention shape (num_attention_heads, hidden_size): {error}") from None
    base = BenchShape(heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size)
    meta = config.get("m2la")
    if meta is None:
        return [ModelLayout(base, False, ())]
    layouts: dict[tuple, list[int]] = {}
    try:
        for index, layer in enumerate(meta["layers"]):
            key = (layer["num_heads"], layer["kv_rank"], layer["rope_dim"], layer["qk_nope_dim"], layer["v_head_dim"])
            layouts.setdefault(key, []).append(index)
    except (KeyError, TypeError) as error:
        raise ValueError(f"config.json's m2la entry lists no layer configs: {error}") from None
    result = []
    for (layer_heads, kv_rank, rope_dim, nope, value), layers in layouts.items():
        shape = replace(base, heads=layer_heads, kv_rank=kv_rank, rope_dim=rope_dim, nope_dim=nope, value_dim=value)
        lossless = nope == 0 and kv_rank == rope_dim == kv_heads * head_dim and value == head_dim
        result.append(ModelLayout(shape, lossless, tuple(layers)))
    return result


def latent_decode_flops(
    batch: int, context: int, kv_rank: int, rope_dim: int, heads: int, rope_only: bool = False
) -> int:  # fmt: skip
    """Absorbed decode: scores over `r + 2p` (`rope_only`: `2p`) and the value sum over `r`, per
    query head and key."""
    score_width = rope_dim if rope_only else kv_rank + rope_dim
    return 2 * heads * batch * context * (score_width + kv_rank)


def gqa_decode_flops(batch: int, context: int, head_dim: int, heads: int) -> int:
    """Decode over a GQA cache: scores and value sum over `head_dim` each, per query head and key."""
    return 2 * heads * batch * context * 2 * head_dim


def causal_pairs(chunk: int, prefix: int) -> int:
    """(query, key) pairs a causal chunk of `chunk` new tokens after `prefix` cached ones computes."""
    return chunk * prefix + chunk * (chunk + 1) // 2


@dataclass(frozen=True)
class BenchRow:
    """One timed kernel call. `ms` None: not measured (`note` says why)."""

    kernel: str
    batch: int
    context: int  # decode: keys a sequence; prefill: the cached prefix before the chunk
    new_tokens: int  # query tokens a sequence: 1 for decode
    ms: float | None
    nbytes: int  # the least a call moves: cache rows read, queries read, outputs written
    flops: int
    timing: str  # "cuda graph", "eager" or "wall"
    baseline: str = ""  # the kernel this row is compared with (same batch, context and chunk)
    note: str = ""

    @property
    def gbs(self) -> float | None:
        return None if self.ms is None else self.nbytes / self.ms / 1e6

    @property
    def tflops(self) -> float | None:
        return None if self.ms is None else self.flops / self.ms / 1e9


@dataclass
class BenchReport:
    """What one `decode_benchmark` / `prefill_benchmark` call measured, with the device it ran on."""

    kind: str  # "decode" or "prefill"
    device: str
    dtype: str
    shape: BenchShape
    copy_bandwidth_gbs: float
    gemm_tflops: float | None = None  # a dense GEMM's in the report's dtype (`gemm_tflops`); None: not measured
    checks: list[str] = field(default_factory=list)  # the correctness checks run before timing
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how to read the rows

    def speedup(self, row: BenchRow) -> float | None:
        """The row's baseline time over its own (> 1: faster than the baseline)."""
        base = next(
            (
                r
                for r in self.rows
                if r.kernel == row.baseline
                and (r.batch, r.context, r.new_tokens) == (row.batch, row.context, row.new_tokens)
            ),
            None,
        )
        if base is None or base.ms is None or row.ms is None:
            return None
        return base.ms / row.ms

    def gemm_share(self, row: BenchRow) -> float | None:
        """The row's TFLOPS as a percentage of the dense GEMM's (None where either is unmeasured)."""
        if row.tflops is None or not self.gemm_tflops:
            return None
        return 100 * row.tflops / self.gemm_tflops

    def to_markdown(self) -> str:
        def fmt(value, spec=None):
            if value is None:
                return "n/a"
            return format(value, spec or (".0f" if abs(value) >= 100 else ".3g"))

        shape = self.shape
        gemm = "" if self.gemm_tflops is None else f", dense GEMM {self.gemm_tflops:.0f} TFLOPS"
        lines = [
            f"{self.kind} on {self.device}, {self.dtype}; copy bandwidth {self.copy_bandwidth_gbs:.0f} GB/s "
            f"(read + write){gemm}. Layer: {shape.heads} query heads; GQA {shape.kv_heads} x {shape.head_dim} against "
            f"latent {shape.kv_rank} + RoPE {shape.rope_dim} (no-RoPE {shape.nope_dim}, value {shape.value_dim}), "
            f"pages of {shape.block_size}.",
            "",
            *(f"- {check}" for check in self.checks),
            *(f"- {note}" for note in self.notes),
            "",
            "| kernel | batch | context | new tokens | ms | timing | GB/s | % of copy BW | TFLOPS | % of GEMM "
            "| x baseline | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            share = None if row.gbs is None else 100 * row.gbs / self.copy_bandwidth_gbs
            compute_share = self.gemm_share(row)
            ratio = self.speedup(row)
            lines.append(
                f"| {row.kernel} | {row.batch} | {row.context} | {row.new_tokens} | {fmt(row.ms, '.4f')} | "
                f"{row.timing} | {fmt(row.gbs)} | {fmt(share)} | {fmt(row.tflops)} | {fmt(compute_share)} | "
                f"{'' if ratio is None else f'{ratio:.2f}x vs {row.baseline}'} | {row.note} |"
            )
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "device": self.device,
            "dtype": self.dtype,
            "shape": asdict(self.shape),
            "copy_bandwidth_gbs": self.copy_bandwidth_gbs,
            "gemm_tflops": self.gemm_tflops,
            "checks": self.checks,
            "notes": self.notes,
            "rows": [
                {
                    **asdict(row),
                    "gbs": row.gbs,
                    "tflops": row.tflops,
                    "gemm_percent": self.gemm_share(row),
                    "speedup": self.speedup(row),
                }
                for row in self.rows
            ],
        }


# --- timing --------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3,
            flush_l2: bool = True) -> float:  # fmt: skip
    """Milliseconds a call. CUDA: `triton.testing.do_bench` (L2 flushed before every call, so
    short contexts are not served from L2; mean over ~`repeats * 10` ms), or with `flush_l2=False`
    the median of `repeats` CUDA-event timings (warm L2). Else: median wall time."""
    if device.type == "cuda" and flush_l2:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(50, 10 * repeats))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def capture_graph(fn: Callable[[], object], warmups: int = 1) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph, after `warmups` calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float | None:
    """Milliseconds a call replayed from a CUDA graph (no Python or launch overhead); None off CUDA."""
    if device.type != "cuda":
        return None
    return time_ms(capture_graph(fn).replay, device, repeats)


def measure_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, str]:
    """(ms, how): on CUDA a CUDA-graph replay, as a serving engine runs decode, else eager calls
    (a call that cannot be captured); off CUDA the median wall time."""
    if device.type == "cuda":
        with _on_device(device):
            try:
                return graph_ms(fn, device, repeats), "cuda graph"
            except Exception:  # noqa: BLE001  (not capturable: a host sync inside; time it eagerly)
                torch.cuda.synchronize(device)
                return time_ms(fn, device, repeats), "eager"
    return time_ms(fn, device, repeats, warmup=min(3, repeats)), "wall"


def _on_device(device: torch.device):
    """Streams, graphs and do_bench's buffers on `device`, not on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device`, or CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written) over `nbytes` buffers (default
    1 GiB on CUDA, far past L2; 256 MiB elsewhere)."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_(-1, 1)
    dst = torch.empty_like(src)
    with _on_device(device):
        ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Dense `[size, size] @ [size, size]` matmul throughput in `dtype`: the compute side of the
    roofline, measured beside `copy_bandwidth_gbs` (default size 8192 on CUDA, 512 elsewhere)."""
    size = size or (8192 if device.type == "cuda" else 512)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    with _on_device(device):
        ms = time_ms(lambda: a @ b, device)
    return 2 * size**3 / ms / 1e9


# --- inputs --------------------------------------------------------------------------------------


def paged_latent_cache(shape: BenchShape, batch: int, context: int, dtype: torch.dtype, device: torch.device,
                       fp8: bool = False, generator: torch.Generator | None = None):  # fmt: skip
    """A paged latent cache holding `batch` sequences of `context` tokens on shuffled pages (as a
    serving engine's allocator leaves them) -> (cache `[pages, block_size, r + 2p]`, kv_scale
    `[pages, block_size]` fp32 or None, block_table `[batch, pages a sequence]` int32, lengths `[batch]` int32).
    With a (CPU) `generator` the values and the page order are drawn from it on the host, so a case is
    the same on every run and device; without one they are drawn on the device (timed sizes)."""
    per_seq = math.ceil(context / shape.block_size)
    pages = batch * per_seq
    bound = 448.0 if fp8 else 1.0  # fp8: e4m3 codes over their whole range, each token scaled by 1 / 448
    size = (pages, shape.block_size, shape.latent_width)
    if generator is None:
        cache = torch.empty(size, device=device, dtype=dtype).uniform_(-bound, bound)
    else:
        cache = (torch.rand(size, generator=generator) * (2 * bound) - bound).to(device=device, dtype=dtype)
    kv_scale = None
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
        kv_scale = torch.full((pages, shape.block_size), 1 / 448, device=device)
    order = torch.randperm(pages, generator=generator).to(device)
    table = order.view(batch, per_seq).to(torch.int32)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    return cache, kv_scale, table, lengths


def _free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _fits(device: torch.device, nbytes: int) -> bool:
    free = _free_bytes(device)
    return free is None or nbytes <= 0.8 * free


# --- correctness, before timing ------------------------------------------------------------------


def check_within_budget(name: str, got: torch.Tensor, same_dtype_torch: torch.Tensor, fp32: torch.Tensor) -> str:
    """The kernel's error against an fp32 reference may be at most twice that of a torch run in the
    kernel's dtype (flash-attention's budget), plus 1e-5 for fp32 runs where both are ~0.
    Raises AssertionError naming the kernel when it is not; returns a line for the report."""
    err = (got.double() - fp32.double()).abs().max().item()
    torch_err = (same_dtype_torch.double() - fp32.double()).abs().max().item()
    budget = 2 * torch_err + 1e-5
    if not err <= budget:  # NaN fails too
        raise AssertionError(f"{name}: max error {err:.3g} against fp32, over the budget {budget:.3g} (2x torch's)")
    return f"{name}: max error {err:.2e} against fp32 (torch in the same dtype: {torch_err:.2e})"


@dataclass(frozen=True)
class _OurDecode:
    """The m2la decode a benchmark times: the plain absorbed decode over `[latent | RoPE key]` rows,
    or (`lossless`) the grouped decode of a GQA attention's lossless conversion, whose rows are
    `kv_heads x head_dim` latent (the values) + the same width of RoPE key, the original's bytes.
    A plain layout with no no-RoPE part (`nope_dim` 0) decodes RoPE-only queries, as its layers do."""

    shape: BenchShape
    lossless: bool

    @property
    def rope_only(self) -> bool:
        return not self.lossless and self.shape.nope_dim == 0

    @property
    def query_width(self) -> int:  # [b, h, query_width]
        if self.lossless:
            return self.shape.head_dim
        return self.shape.rope_dim if self.rope_only else self.shape.latent_width

    def full_query(self, q: torch.Tensor) -> torch.Tensor:
        """A plain decode's query as `[b, h, r + 2p]` (a RoPE-only one with its zero latent part), for
        kernels that take only that."""
        return torch.cat((q.new_zeros(*q.shape[:-1], self.shape.kv_rank), q), dim=-1) if self.rope_only else q

    @property
    def out_width(self) -> int:  # [b, h, out_width]
        return self.shape.head_dim if self.lossless else self.shape.kv_rank

    @property
    def scale(self) -> float:
        return self.shape.head_dim**-0.5 if self.lossless else self.shape.softmax_scale

    def flops(self, batch: int, context: int) -> int:
        shape = self.shape
        if self.lossless:  # GQA's work: each head scores its group's head_dim and sums its head_dim values
            return gqa_decode_flops(batch, context, shape.head_dim, shape.heads)
        return latent_decode_flops(batch, context, shape.kv_rank, shape.rope_dim, shape.heads, self.rope_only)

    def in_torch(self, q, cache, lengths, table):
        """The same decode in plain torch ops in q's dtype (the error budget's yardstick; the reference
        backend computes in fp32): `cache` a paged cache in q's dtype -> `[b, h, out_width]`."""
        from m2la.attention_math import grouped_attention_from_rows, latent_mqa
        from m2la.kernels._paging import gather_cache_rows

        shape = self.shape
        rows = gather_cache_rows(cache, table, table.shape[1] * cache.shape[1])  # [b, s, r + 2p]
        visible = (torch.arange(rows.shape[1], device=rows.device) < lengths[:, None]).long()  # [b, s]
        if self.lossless:
            out = grouped_attention_from_rows(q[:, None], rows, shape.kv_rank, shape.kv_heads, self.scale, visible,
                                              fused_softmax=False)  # fmt: skip
        else:
            out, _ = latent_mqa(q[:, None], rows, shape.kv_rank, self.scale, visible, return_lse=False)
        return out[:, 0]

    def __call__(self, q, cache, lengths, table, kv_scale, backend):
        shape = self.shape
        if self.lossless:
            return kernels.grouped_decode_attention(q, cache, lengths, self.scale, shape.kv_rank, shape.kv_heads,
                                                    table, kv_scale=kv_scale, backend=backend)  # fmt: skip
        return kernels.decode_attention(q, cache, lengths, self.scale, shape.kv_rank, table, kv_scale=kv_scale,
                                        backend=backend)  # fmt: skip


def _check_context(shape: BenchShape) -> int:
    """The decode gates' longest sequence: 3 pages and 5 tokens (not a multiple of the page)."""
    return 3 * shape.block_size + 5


def _decode_check_case(kernel: _OurDecode, dtype: torch.dtype, device: torch.device, fp8: bool) -> tuple:
    """The decode gates' case, 3 sequences (one of 1 token) of up to `_check_context` tokens -> (q
    `[3, h, query width]`, cache, kv_scale, block table, lengths, the cache in fp32, dequantized)."""
    from m2la.quantization import dequantize_rows

    shape = kernel.shape
    gen = torch.Generator().manual_seed(0)
    cache, kv_scale, table, lengths = paged_latent_cache(shape, 3, _check_context(shape), dtype, device, fp8, gen)
    lengths[1] = 1
    q = torch.randn(3, shape.heads, kernel.query_width, generator=gen).to(device=device, dtype=dtype)
    cache32 = cache.float() if kv_scale is None else dequantize_rows(cache, kv_scale)
    return q, cache, kv_scale, table, lengths, cache32


def _check_decode(kernel: _OurDecode, dtype: torch.dtype, device: torch.device, backend: str, fp8: bool) -> str:
    """Our decode through `backend` on `_decode_check_case` against the fp32 reference, before any timing."""
    q, cache, kv_scale, table, lengths, cache32 = _decode_check_case(kernel, dtype, device, fp8)
    out, _ = kernel(q, cache, lengths, table, kv_scale, backend)
    fp32, _ = kernel(q.float(), cache32, lengths, table, None, "reference")
    torch_dtype = kernel.in_torch(q, cache32.to(dtype), lengths, table)
    name = "m2la lossless grouped decode" if kernel.lossless else "m2la decode"
    return check_within_budget(f"{name} ({backend})", out, torch_dtype, fp32)


def _check_vllm_decode(module, shape: BenchShape, dtype: torch.dtype, device: torch.device) -> str:
    """`_check_decode` for vLLM's kernel (bf16/fp16 caches only)."""
    kernel = _OurDecode(shape, lossless=False)
    q, cache, _, table, lengths, cache32 = _decode_check_case(kernel, dtype, device, fp8=False)
    out, _ = vllm_mla_decode(module, kernel.full_query(q), cache, table, lengths, kernel.scale, shape.kv_rank,
                             _check_context(shape), _sm_count(device))  # fmt: skip
    fp32, _ = kernel(q.float(), cache32, lengths, table, None, "reference")
    return check_within_budget("vLLM Triton MLA decode", out, kernel.in_torch(q, cache, lengths, table), fp32)


# --- vLLM's Triton MLA decode, where it imports ---------------------------------------------------

VLLM_TRITON_MLA_MODULES = (
    "vllm.v1.attention.ops.triton_decode_attention",  # vLLM 0.9 and later
    "vllm.attention.ops.triton_decode_attention",
)


def load_vllm_triton_mla(path: str | None = None):
    """vLLM's Triton MLA decode module (the kernel behind its `TritonMLAImpl`): from the file at
    `path` (a copy, such as `benchmarks/vllm_triton_mla.py` extracts from a wheel), else from an
    installed vLLM, else None. Raises ImportError naming the file when `path` does not load."""
    import importlib
    import importlib.util

    if path is not None:
        spec = importlib.util.spec_from_file_location("vllm_triton_decode_attention", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except (OSError, SyntaxError) as error:
            raise ImportError(f"{path}: {error}") from error
        return module
    if importlib.util.find_spec("vllm") is None:
        return None
    for name in VLLM_TRITON_MLA_MODULES:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112  (moved, or a vLLM that fails to import here: no baseline)
            continue
    return None


def vllm_num_kv_splits(max_seq_len: int, sm_count: int) -> int:
    """vLLM's split rule (TritonMLAImpl): next power of 2 of seq_len / 512, capped at 2 x SMs."""
    ideal = 1 << max(0, (max(1, max_seq_len // 512) - 1).bit_length())
    return min(ideal, 2 * sm_count)


def vllm_mla_decode(module, q, kv_cache, block_table, seqlens, softmax_scale, kv_rank, max_seq_len, sm_count):
    """vLLM's Triton MLA decode called as its `forward_mqa` does: `q [b, h, r + 2p]` over the paged
    `kv_cache [blocks, page, r + 2p]` -> (`out [b, h, r]`, `lse [b, h]`). The cache gains a head
    dim of 1, V is its first `kv_rank` columns, and the split-KV scratch holds r + 1 floats a split."""
    batch, heads, _ = q.shape
    splits = vllm_num_kv_splits(max_seq_len, sm_count)
    out = torch.zeros(batch, heads, kv_rank, dtype=q.dtype, device=q.device)
    lse = torch.zeros(batch, heads, dtype=q.dtype, device=q.device)
    logits = torch.empty(batch, heads, splits, kv_rank + 1, dtype=torch.float32, device=q.device)
    cache = kv_cache.unsqueeze(2)  # [blocks, page, 1, r + 2p]
    module.decode_attention_fwd(
        q, cache, cache[..., :kv_rank], out, lse, block_table, seqlens, logits, splits, softmax_scale,
        kv_cache.shape[1], is_mla=True,
    )  # fmt: skip
    return out, lse


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# --- decode --------------------------------------------------------------------------------------


def _sdpa_gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q `[b, 1, h, d]`, k / v `[b, s, kv heads, d]` (the cache as it lies) -> `[b, h, 1, d]`."""
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    )


def _flash_attn_kvcache():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def decode_benchmark(
    shape: BenchShape = BenchShape(),
    batches: Sequence[int] = (1, 8, 32),
    contexts: Sequence[int] = (4096, 32768),
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    backend: str = "auto",
    fp8: bool = False,
    repeats: int = 20,
    bandwidth_gbs: float | None = None,
    vllm_module=None,
    lossless: bool = False,
) -> BenchReport:
    """One decode step (one query token a sequence, all `shape.heads` heads) over a paged latent
    cache of `context` tokens a sequence, through `m2la.kernels.decode_attention` on `backend`, side
    by side with SDPA over the GQA cache of the same model and length (and flash_attn's kvcache
    decode where it imports). `fp8`: the latent cache in e4m3 with a scale a token; the baseline
    stays in `dtype`. Combinations that do not fit in free device memory are reported unmeasured.
    `vllm_module` (`load_vllm_triton_mla()`): vLLM's Triton MLA decode is timed too, on the same
    latent cache and queries, once it passes the same error budget (not with an fp8 cache, which it
    does not read).

    `lossless`: time the layout `m2la.convert(model)` gives a GQA attention instead, whatever
    `shape.kv_rank` and `shape.rope_dim` say: rows of `kv_heads x head_dim` latent plus as wide a
    RoPE key (the original cache's bytes), decoded by `grouped_decode_attention` (GQA's work)."""
    _check_sizes(batches=(batches, 1), contexts=(contexts, 1), repeats=((repeats,), 1))
    device = resolve_device(device)
    if lossless:
        shape = lossless_shape(shape)
    kernel = _OurDecode(shape, lossless)
    chosen = resolve_backend(backend, torch.empty(0, device=device))
    report = _new_report("decode", device, dtype, shape, chosen, bandwidth_gbs)
    report.checks.append(_check_decode(kernel, dtype, device, chosen, fp8))
    vllm = "vLLM Triton MLA decode (same latent cache)"
    for reason, applies in (("it reads no fp8 cache", fp8), ("it has no grouped decode", lossless)):
        if vllm_module is not None and applies:
            report.checks.append(f"vLLM Triton MLA decode: not timed ({reason})")
            vllm_module = None
    if vllm_module is not None:
        try:
            report.checks.append(_check_vllm_decode(vllm_module, shape, dtype, device))
        except Exception as error:  # noqa: BLE001  (theirs failing must not sink our report)
            report.checks.append(f"vLLM Triton MLA decode: not timed ({type(error).__name__}: {error})")
            vllm_module = None
    ours = f"m2la {'lossless grouped' if lossless else 'latent'} decode ({chosen}{FP8_LABEL if fp8 else ''})"
    sdpa = GQA_SDPA
    flash = _flash_attn_kvcache() if device.type == "cuda" else None
    sms = _sm_count(device)  # vLLM's split rule; read once, not inside a timed call
    for context in contexts:
        for batch in batches:
            common = dict(batch=batch, context=context, new_tokens=1)
            q_bytes = batch * shape.heads * (kernel.query_width + kernel.out_width) * dtype.itemsize  # q in, out back
            latent_bytes = batch * context * shape.latent_row_bytes(dtype, fp8) + q_bytes
            gqa_bytes = (
                batch * context * shape.gqa_row_bytes(dtype) + 2 * batch * shape.heads * shape.head_dim * dtype.itemsize
            )
            latent_flops = kernel.flops(batch, context)
            gqa_flops = gqa_decode_flops(batch, context, shape.head_dim, shape.heads)
            made_bytes = batch * context * shape.latent_row_bytes(dtype) * (1.5 if fp8 else 1)  # fp8: made in dtype
            if _fits(device, made_bytes):
                cache, kv_scale, table, lengths = paged_latent_cache(shape, batch, context, dtype, device, fp8)
                q = torch.randn(batch, shape.heads, kernel.query_width, device=device, dtype=dtype)

                def run(q=q, cache=cache, lengths=lengths, table=table, kv_scale=kv_scale):
                    return kernel(q, cache, lengths, table, kv_scale, chosen)

                ms, how = measure_ms(run, device, repeats)
                report.rows.append(BenchRow(ours, **common, ms=ms, nbytes=latent_bytes, flops=latent_flops, timing=how,
                                            baseline=sdpa))  # fmt: skip
                theirs = None
                if vllm_module is not None:
                    q_full = kernel.full_query(q)  # vLLM takes [b, h, r + 2p] only

                    def theirs(q=q_full, cache=cache, lengths=lengths, table=table, context=context):
                        return vllm_mla_decode(vllm_module, q, cache, table, lengths, shape.softmax_scale,
                                               shape.kv_rank, context, sms)  # fmt: skip

                    ms, how = measure_ms(theirs, device, repeats)
                    report.rows.append(BenchRow(vllm, **common, ms=ms, nbytes=latent_bytes, flops=latent_flops,
                                                timing=how, baseline=sdpa))  # fmt: skip
                del cache, kv_scale, table, q, run, theirs
            else:
                report.rows.append(BenchRow(ours, **common, ms=None, nbytes=latent_bytes, flops=latent_flops,
                                            timing="", baseline=sdpa, note="does not fit in free memory"))  # fmt: skip
            if not _fits(device, gqa_bytes):
                report.rows.append(BenchRow(sdpa, **common, ms=None, nbytes=gqa_bytes, flops=gqa_flops, timing="",
                                            note="does not fit in free memory"))  # fmt: skip
                continue
            k = torch.empty(batch, context, shape.kv_heads, shape.head_dim, device=device, dtype=dtype).uniform_(-1, 1)
            v = torch.empty_like(k).uniform_(-1, 1)
            q = torch.randn(batch, 1, shape.heads, shape.head_dim, device=device, dtype=dtype)
            ms, how = measure_ms(lambda q=q, k=k, v=v: _sdpa_gqa_decode(q, k, v), device, repeats)
            report.rows.append(BenchRow(sdpa, **common, ms=ms, nbytes=gqa_bytes, flops=gqa_flops, timing=how))
            if flash is not None:
                ms, how = measure_ms(lambda q=q, k=k, v=v: flash(q, k, v, causal=True), device, repeats)
                report.rows.append(BenchRow("flash_attn kvcache over the GQA cache", **common, ms=ms, nbytes=gqa_bytes,
                                            flops=gqa_flops, timing=how, baseline=sdpa))  # fmt: skip
            del k, v, q
    return report


# --- prefill -------------------------------------------------------------------------------------


def _expanded_qkv(q_nope, q_rope, cache, w_uk, w_uv, table, total, kv_rank):
    """The prefill baseline's inputs: the layer's keys and values expanded per head from the latent
    rows of `b` sequences -> q `[b, h, t, n + 2p]`, k `[b, h, s, n + 2p]` (the RoPE key shared by the
    heads), v `[b, h, s, v]`."""
    from m2la.attention_math import expand_latent_kv
    from m2la.kernels._paging import gather_cache_rows

    rows = gather_cache_rows(cache, table, total)  # [b, s, r + 2p]
    # the kernels take w_uk [h, r, n] and w_uv [h, r, v]; attention_math takes [h, n, r] and [h, v, r]
    k, v = expand_latent_kv(rows[..., :kv_rank], rows[..., kv_rank:], w_uk.mT, w_uv.mT, rows.dtype)
    q = torch.cat((q_nope, q_rope), dim=-1)  # [b t, h, n + 2p]
    return q.unflatten(0, (rows.shape[0], -1)).transpose(1, 2), k, v


def prefill_benchmark(
    shape: BenchShape = BenchShape(),
    chunk: int = 4096,
    prefixes: Sequence[int] = (0, 16384),
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    backend: str = "auto",
    repeats: int = 20,
    bandwidth_gbs: float | None = None,
    lossless: bool = False,
    batches: Sequence[int] = (1,),
    fp8: bool = False,
) -> BenchReport:
    """A chunk of `chunk` new tokens a sequence (`batches`: how many sequences) after `prefix` cached
    ones, causal, through
    `m2la.kernels.prefill_attention` (`mode="auto"`, both maximum lengths given: no host sync), side
    by side with SDPA over the same layer's expanded keys and values (the issue's baseline; the
    expansion not timed) and SDPA over the GQA cache of the same length. TFLOPS count the causal
    pairs computed. `lossless` (see `decode_benchmark`): `grouped_prefill_attention` over the
    lossless layout instead, against SDPA over the GQA cache it came from. `fp8`: the latent cache in
    e4m3 with a scale a token (the baselines read it dequantized to `dtype`)."""
    _check_sizes(chunk=((chunk,), 1), prefixes=(prefixes, 0), batches=(batches, 1), repeats=((repeats,), 1))
    device = resolve_device(device)
    if lossless:
        shape = lossless_shape(shape)
    chosen = resolve_backend(backend, torch.empty(0, device=device))
    report = _new_report("prefill", device, dtype, shape, chosen, bandwidth_gbs)
    layout = _LosslessPrefill if lossless else _LatentPrefill
    # Correctness first, on a case of the same chunk route but at most 2 sequences and 300 cached
    # tokens: the fp32 reference expands keys per head, too much memory at the timed sizes.
    gate = _PrefillCase(shape, min(max(batches), 2), min(chunk, 512), min(max(prefixes), 300), dtype, device, fp8)
    report.checks.append(layout(gate, chosen).check())
    for prefix in prefixes:
        for batch in batches:
            case = _PrefillCase(shape, batch, chunk, prefix, dtype, device, fp8)
            report.rows += layout(case, chosen).rows(repeats)
            report.rows.append(_gqa_prefill_row(case, repeats, baseline="" if lossless else EXPANDED_SDPA))
    return report


class _PrefillCase:
    """`batch` sequences, each `chunk` new tokens after `prefix` cached ones in a paged latent cache,
    and random inputs drawn from a generator seeded by the case."""

    def __init__(self, shape: BenchShape, batch: int, chunk: int, prefix: int, dtype: torch.dtype,
                 device: torch.device, fp8: bool = False):  # fmt: skip
        self.shape, self.batch, self.chunk, self.prefix, self.total = shape, batch, chunk, prefix, prefix + chunk
        self.dtype, self.device, self.fp8 = dtype, device, fp8
        self.tokens = batch * chunk  # query rows, packed by cu_seqlens
        self.gen = torch.Generator().manual_seed(prefix * 1000 + batch)
        self.cache, self.kv_scale, self.table, self.lengths = paged_latent_cache(shape, batch, self.total, dtype,
                                                                                 device, fp8, self.gen)  # fmt: skip
        self.cu_seqlens = torch.arange(0, (batch + 1) * chunk, chunk, dtype=torch.int32, device=device)  # [b + 1]
        self.common = dict(batch=batch, context=prefix, new_tokens=chunk)
        self.pairs = batch * causal_pairs(chunk, prefix)  # over the batch

    def randn(self, *size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=self.gen) * scale).to(device=self.device, dtype=self.dtype)

    def rows_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The paged cache in `dtype` (an fp8 cache dequantized): what the baselines and references read."""
        from m2la.quantization import dequantize_rows

        if self.kv_scale is None:
            return self.cache.to(dtype)
        return dequantize_rows(self.cache, self.kv_scale, dtype)

    @property
    def label(self) -> str:
        return FP8_LABEL if self.fp8 else ""

    @property
    def cache_bytes(self) -> int:
        return self.batch * self.total * self.shape.latent_row_bytes(self.dtype, self.fp8)

    def causal_bias(self):
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(self.chunk, self.total)


class _LatentPrefill:
    """Ours (`prefill_attention`) and SDPA over the expanded keys and values of the same layer."""

    def __init__(self, case: _PrefillCase, backend: str):
        shape = case.shape
        self.case, self.backend = case, backend
        self.q_nope = case.randn(case.tokens, shape.heads, shape.nope_dim)
        self.q_rope = case.randn(case.tokens, shape.heads, shape.rope_dim)
        # one [h (n + v), r] up-projection, passed as [h, r, n] / [h, r, v] views as a converted model's
        # kv_b_proj.weight is (the expansion GEMM then reads it in place)
        kv_b = case.randn(shape.heads * (shape.nope_dim + shape.value_dim), shape.kv_rank, scale=shape.kv_rank**-0.5)
        per_head = kv_b.unflatten(0, (shape.heads, shape.nope_dim + shape.value_dim))
        self.w_uk, self.w_uv = per_head[:, : shape.nope_dim].mT, per_head[:, shape.nope_dim :].mT
        self.q, self.k, self.v = _expanded_qkv(self.q_nope, self.q_rope, case.rows_in(case.dtype), self.w_uk,
                                               self.w_uv, case.table, case.total, shape.kv_rank)  # fmt: skip
        self.bias = case.causal_bias()

    def inputs(self, dtype: torch.dtype | None = None) -> tuple:
        """The prefill's arguments: as timed, or (`dtype`) cast, with the cache dequantized."""
        case = self.case
        queries = (self.q_nope, self.q_rope) if dtype is None else (self.q_nope.to(dtype), self.q_rope.to(dtype))
        cache = case.cache if dtype is None else case.rows_in(dtype)
        weights = (self.w_uk, self.w_uv) if dtype is None else (self.w_uk.to(dtype), self.w_uv.to(dtype))
        return (*queries, cache, *weights, case.cu_seqlens, case.lengths, case.shape.softmax_scale, case.table)

    def run(self):
        case = self.case
        return kernels.prefill_attention(*self.inputs(), kv_scale=case.kv_scale, max_seqlen_q=case.chunk,
                                         max_seqlen_k=case.total, backend=self.backend)  # fmt: skip

    def baseline(self) -> torch.Tensor:  # [b, h, t, v]
        return torch.nn.functional.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.bias,
                                                                scale=self.case.shape.softmax_scale)  # fmt: skip

    def check(self) -> str:
        shape = self.case.shape
        fp32 = kernels.prefill_attention(*self.inputs(torch.float32), backend="reference")[0]
        same_dtype = self.baseline().transpose(1, 2).reshape(self.case.tokens, shape.heads, shape.value_dim)
        return check_within_budget(f"m2la prefill ({self.backend}{self.case.label})", self.run()[0], same_dtype, fp32)

    def rows(self, repeats: int) -> list[BenchRow]:
        case, shape, dtype = self.case, self.case.shape, self.case.dtype
        flops = 2 * shape.heads * case.pairs * (shape.nope_dim + shape.rope_dim + shape.value_dim)
        q_out_bytes = case.tokens * shape.heads * (shape.nope_dim + shape.rope_dim + shape.value_dim) * dtype.itemsize
        ms, how = measure_ms(self.run, case.device, repeats)
        ours = BenchRow(f"m2la latent prefill ({self.backend}{case.label})", **case.common, ms=ms, flops=flops,
                        timing=how, nbytes=case.cache_bytes + q_out_bytes, baseline=EXPANDED_SDPA)  # fmt: skip
        ms, how = measure_ms(self.baseline, case.device, repeats)
        theirs = BenchRow(EXPANDED_SDPA, **case.common, ms=ms, flops=flops, timing=how, note="expansion not timed",
                          nbytes=(self.k.numel() + self.v.numel()) * dtype.itemsize + q_out_bytes)  # fmt: skip
        return [ours, theirs]


class _LosslessPrefill:
    """Ours (`grouped_prefill_attention` over the lossless layout: GQA's work from the latent cache)."""

    def __init__(self, case: _PrefillCase, backend: str):
        shape = case.shape
        self.case, self.backend = case, backend
        self.q = case.randn(case.tokens, shape.heads, shape.head_dim)  # each head's own pairs, x half then y half
        self.scale = shape.head_dim**-0.5

    def run(self, q: torch.Tensor | None = None, cache: torch.Tensor | None = None, backend: str | None = None):
        """As timed, or the reference backend over the query `q` and the plain cache `cache`."""
        case, shape = self.case, self.case.shape
        kv_scale = case.kv_scale if cache is None else None
        return kernels.grouped_prefill_attention(
            self.q if q is None else q, case.cache if cache is None else cache, case.cu_seqlens, case.lengths,
            self.scale, shape.kv_rank, shape.kv_heads, case.table, kv_scale=kv_scale, max_seqlen_q=case.chunk,
            backend=backend or self.backend,
        )  # fmt: skip

    def check(self) -> str:
        from m2la.attention_math import grouped_attention_from_rows
        from m2la.kernels._paging import gather_cache_rows

        case, shape = self.case, self.case.shape
        fp32 = self.run(self.q.float(), case.rows_in(torch.float32), "reference")[0]
        rows = gather_cache_rows(case.rows_in(case.dtype), case.table, case.total)  # [b, s, r + 2p]
        same_dtype = grouped_attention_from_rows(self.q.unflatten(0, (case.batch, case.chunk)), rows, shape.kv_rank,
                                                 shape.kv_heads, self.scale, fused_softmax=True)  # SDPA, q's dtype  # fmt: skip
        return check_within_budget(f"m2la lossless grouped prefill ({self.backend}{case.label})", self.run()[0],
                                   same_dtype.flatten(0, 1), fp32)  # fmt: skip

    def rows(self, repeats: int) -> list[BenchRow]:
        case, shape, itemsize = self.case, self.case.shape, self.case.dtype.itemsize
        ms, how = measure_ms(self.run, case.device, repeats)
        nbytes = case.cache_bytes + 2 * case.tokens * shape.heads * shape.head_dim * itemsize
        return [BenchRow(f"m2la lossless grouped prefill ({self.backend}{case.label})", **case.common, ms=ms, nbytes=nbytes,
                         timing=how, flops=2 * shape.heads * case.pairs * 2 * shape.head_dim, baseline=GQA_SDPA)]  # fmt: skip


def _gqa_prefill_row(case: _PrefillCase, repeats: int, baseline: str) -> BenchRow:
    """SDPA over the uncompressed GQA cache of the same length (the model before conversion),
    compared with the row named `baseline` (none: it is the baseline)."""
    shape, batch, chunk, total = case.shape, case.batch, case.chunk, case.total
    q = case.randn(batch, shape.heads, chunk, shape.head_dim)
    k = case.randn(batch, shape.kv_heads, total, shape.head_dim)
    v = case.randn(batch, shape.kv_heads, total, shape.head_dim)
    bias = case.causal_bias()

    def run():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    ms, how = measure_ms(run, case.device, repeats)
    nbytes = batch * (
        total * shape.gqa_row_bytes(case.dtype) + 2 * chunk * shape.heads * shape.head_dim * case.dtype.itemsize
    )
    return BenchRow(GQA_SDPA, **case.common, ms=ms, nbytes=nbytes, flops=2 * shape.heads * case.pairs * 2 * shape.head_dim,
                    timing=how, baseline=baseline)  # fmt: skip


# --- fused cache write ---------------------------------------------------------------------------

UNFUSED_WRITE = "torch, unfused (rotate, concatenate, index_copy_)"


def _unfused_write(cache, scale_rows, latent, k_rope, cos, sin, slots) -> None:
    """What m2la does without the fused kernel: RoPE on the key in the inputs' dtype, the row
    concatenated (fp8: quantized, `m2la.quantization`), then copied into the cache's slots."""
    from m2la.cache import copy_rows_at
    from m2la.quantization import is_fp8, quantize_rows
    from m2la.rope import apply_rope_half

    rows = torch.cat((latent, apply_rope_half(k_rope, cos, sin)), dim=-1)  # [t, r + 2p]
    if is_fp8(cache.dtype):
        rows, scales = quantize_rows(rows, cache.dtype)
        copy_rows_at(scale_rows.view(1, -1), slots, scales[None])
    copy_rows_at(cache.view(1, -1, cache.shape[-1]), slots, rows[None])  # slots of [1, pages * page size, r + 2p]


class _WriteCase:
    """`tokens` new rows for scattered slots of a paged cache just big enough (as a serving engine's
    allocator hands out slots), random inputs; cos/sin fp32 as the converted models pass them."""

    def __init__(self, shape: BenchShape, tokens: int, dtype: torch.dtype, device: torch.device, fp8: bool, seed: int):
        gen = torch.Generator().manual_seed(seed)
        pages = math.ceil(tokens / shape.block_size)
        cache_dtype = torch.float8_e4m3fn if fp8 else dtype
        self.cache = torch.zeros(pages, shape.block_size, shape.latent_width, dtype=cache_dtype, device=device)
        self.kv_scale = torch.zeros(pages, shape.block_size, device=device) if fp8 else None
        self.latent = torch.randn(tokens, shape.kv_rank, generator=gen).to(device=device, dtype=dtype)
        self.k_rope = torch.randn(tokens, shape.rope_dim, generator=gen).to(device=device, dtype=dtype)
        angles = torch.rand(tokens, shape.rope_dim // 2, generator=gen).to(device) * 6.3
        self.cos, self.sin = angles.cos(), angles.sin()  # [t, p] fp32
        self.slots = torch.randperm(pages * shape.block_size, generator=gen)[:tokens].to(device)  # int64

    def inputs(self) -> tuple:
        return self.latent, self.k_rope, self.cos, self.sin, self.slots


def write_benchmark(
    shape: BenchShape = BenchShape(),
    tokens: Sequence[int] = (32, 4096, 32768),
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    backend: str = "auto",
    fp8: bool = False,
    repeats: int = 20,
    bandwidth_gbs: float | None = None,
) -> BenchReport:
    """`m2la.kernels.write_latent_cache` (RoPE on the key, fp8 scale, store: one pass) writing
    `tokens` rows to scattered slots (a decode step's batch, or a prefill chunk), side by side with
    the same write done by unfused torch ops. Bytes: inputs read (latent, RoPE key, fp32 cos/sin,
    slots) and rows written (fp8: one byte an element and a 4-byte scale)."""
    _check_sizes(tokens=(tokens, 1), repeats=((repeats,), 1))
    device = resolve_device(device)
    chosen = resolve_backend(backend, torch.empty(0, device=device))
    report = _new_report("cache write", device, dtype, shape, chosen, bandwidth_gbs)
    report.checks.append(_check_write(shape, dtype, device, chosen, fp8))
    ours = f"m2la fused cache write ({chosen}{FP8_LABEL if fp8 else ''})"
    for count in tokens:
        case = _WriteCase(shape, count, dtype, device, fp8, seed=count)
        nbytes = count * (
            shape.latent_width * dtype.itemsize + shape.rope_dim * 4 + 8 + shape.latent_row_bytes(dtype, fp8)
        )
        common = dict(batch=count, context=0, new_tokens=1, nbytes=nbytes, flops=0)

        def run(case=case):
            kernels.write_latent_cache(case.cache, *case.inputs(), kv_scale=case.kv_scale, backend=chosen)

        def unfused(case=case):
            _unfused_write(case.cache, case.kv_scale, *case.inputs())

        ms, how = measure_ms(run, device, repeats)
        report.rows.append(BenchRow(ours, **common, ms=ms, timing=how, baseline=UNFUSED_WRITE))
        ms, how = measure_ms(unfused, device, repeats)
        report.rows.append(BenchRow(UNFUSED_WRITE, **common, ms=ms, timing=how))
    report.notes.append("Rows: batch = rows written (one token each); FLOPs not counted (a copy with a rotation).")
    return report


def _check_write(shape: BenchShape, dtype: torch.dtype, device: torch.device, backend: str, fp8: bool) -> str:
    """The fused write of 77 rows (one skipped, slot -1) against the fp32 reference write, with the
    unfused torch write in `dtype` as the yardstick; fp8 rows compared after dequantizing."""
    from m2la.quantization import dequantize_rows

    case = _WriteCase(shape, 77, dtype, device, fp8, seed=1)
    case.slots[5] = -1
    kept = case.slots >= 0

    def written(cache, kv_scale):  # the rows at the kept slots, fp32 [t', r + 2p]
        rows = cache.view(-1, cache.shape[-1])[case.slots[kept]]
        return rows.float() if kv_scale is None else dequantize_rows(rows, kv_scale.view(-1)[case.slots[kept]])

    kernels.write_latent_cache(case.cache, *case.inputs(), kv_scale=case.kv_scale, backend=backend)
    fp32 = torch.zeros(case.cache.shape, device=device)
    kernels.write_latent_cache(fp32, *(t.float() for t in case.inputs()[:4]), case.slots, backend="reference")
    torch_cache = torch.zeros_like(case.cache)
    torch_scale = None if case.kv_scale is None else torch.zeros_like(case.kv_scale)
    _unfused_write(torch_cache, torch_scale, *(t[kept] for t in case.inputs()))
    got = written(case.cache, case.kv_scale)
    return check_within_budget(f"m2la cache write ({backend})", got, written(torch_cache, torch_scale),
                               written(fp32, None))  # fmt: skip


REFERENCE_NOTE = (
    "The reference backend is the kernels' pure-torch test oracle (fp32 throughout; the attention "
    "oracles read every cache slot), not a fast path: its times do not measure m2la's kernels. Time "
    "backend 'triton' on a GPU."
)


def _new_report(kind: str, device: torch.device, dtype: torch.dtype, shape: BenchShape, backend: str,
                bandwidth_gbs: float | None) -> BenchReport:  # fmt: skip
    report = BenchReport(kind, _device_name(device), str(dtype).removeprefix("torch."), shape,
                         bandwidth_gbs or copy_bandwidth_gbs(device),
                         gemm_tflops(device, dtype) if device.type == "cuda" else None)  # fmt: skip
    if backend == "reference":
        report.notes.append(REFERENCE_NOTE)
    elif device.type != "cuda":
        report.notes.append("Triton on CPU runs under its interpreter: only the correctness checks mean anything.")
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"
