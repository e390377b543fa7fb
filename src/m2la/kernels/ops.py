"""Public kernel ops: backend dispatch + torch custom ops (so models using them can torch.compile).

Each op is registered as `torch.ops.m2la.<name>` with a fake (meta) implementation; the resolved
backend travels as a string argument, so the triton module is imported only when it runs.

Plain eager calls skip the dispatcher and run the implementation directly (`_dispatch_directly`):
the custom op's Python dispatch costs tens of microseconds a call on the host, about a whole
decode kernel at short context. Tracing, tensor subclasses and autograd still go through the op.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn import Parameter

from m2la.backends import resolve_backend
from m2la.kernels import _checks
from m2la.kernels._quant import check_cache_scale
from m2la.kernels.cache_write.reference import write_latent_cache_reference
from m2la.kernels.latent_decode.reference import grouped_decode_reference, latent_decode_reference
from m2la.kernels.latent_prefill.reference import grouped_prefill_reference, latent_prefill_reference


def _tracing_predicate():
    """A function telling whether a torch dispatch or torch-function mode (user or infra: fake,
    proxy, functional), or a functorch transform, is active. These torch hooks are private and move
    between releases: where one is missing the predicate always says "active", so calls keep the
    custom op."""
    try:
        C = torch._C
        infra_keys = tuple(C._TorchDispatchModeKey.__members__.values())
        user_modes, infra_mode, function_mode, functorch = (
            C._len_torch_dispatch_stack, C._get_dispatch_mode, C._is_torch_function_mode_enabled,
            C._are_functorch_transforms_active,
        )  # fmt: skip
        for probe in (user_modes, function_mode, functorch):
            probe()
        for key in infra_keys:
            infra_mode(key)
    except Exception:  # a torch without these hooks
        return lambda: True

    def active() -> bool:
        return (
            user_modes() > 0 or function_mode() or functorch()
            or any(infra_mode(key) is not None for key in infra_keys)
        )  # fmt: skip

    return active


_tracing_active = _tracing_predicate()


def _dispatch_directly(*tensors: Tensor | None) -> bool:
    """True when an op may call its implementation instead of the registered custom op: plain
    eager tensors, nothing tracing. The op stays in the path for torch.compile / export, dispatch
    and torch-function modes (make_fx, FakeTensorMode, `with torch.device(...)`), functorch
    transforms, tensor subclasses, and inputs that require grad (the ops have no backward: the
    dispatcher's error at backward time is the contract)."""
    if torch.compiler.is_compiling() or _tracing_active():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((type(t) is not Tensor and type(t) is not Parameter) or (grad and t.requires_grad)):
            return False
    return True


def _rows_contiguous(t: Tensor) -> Tensor:
    """`t` with a last-dim stride of 1 (the kernels take row strides, not element strides); small
    inputs only: a cache is refused instead of copied."""
    return t if t.is_contiguous() or t.stride(-1) == 1 else t.contiguous()


_CHECK_ARGUMENT_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "m2la_check_argument_values", default=os.environ.get("M2LA_CHECK_VALUES", "") == "1"
)


@contextlib.contextmanager
def check_argument_values(enabled: bool = True) -> Iterator[None]:
    """Debugging aid: inside the block (or everywhere with `M2LA_CHECK_VALUES=1`), eager op calls on
    either backend and any device check their argument values as the reference backend on CPU always
    does: lengths within the cache, `cu_seqlens_q` rising from 0 to the token count, each chunk
    counted in `cache_seqlens`, block-table entries of visible pages inside the cache, slots. A bad
    value raises a ValueError naming it instead of reading another sequence's pages or faulting in a
    kernel. Each check reads values on the host, a device sync a call on a GPU, hence opt-in; traced
    calls (torch.compile) and CUDA-graph capture never read values. Nests and restores on exit."""
    token = _CHECK_ARGUMENT_VALUES.set(bool(enabled))
    try:
        yield
    finally:
        _CHECK_ARGUMENT_VALUES.reset(token)


def _values_readable(direct: bool, backend: str, device: torch.device) -> bool:
    """Whether the argument checks may read tensor values: the reference backend on plain eager CPU
    tensors, or any eager call inside `check_argument_values`. Otherwise the Triton path never reads
    values on the host (CUDA graphs; the interpreter on CPU behaves the same), and on a GPU a read
    would sync every call."""
    if not direct:
        return False
    if backend == "reference" and device.type == "cpu":
        return True
    if not _CHECK_ARGUMENT_VALUES.get():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------- latent decode


def _decode_inputs(
    q: Tensor,
    kv_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    kv_start: Tensor | None,
    kv_scale: Tensor | None,
    backend: str | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, str, bool]:
    """What both decode ops do once their shapes are checked: the fp8 scale check, small inputs made
    contiguous, the backend resolved, the dispatch route, and (reference on CPU) the length values.
    -> (q, cache_seqlens, block_table, kv_start, backend, direct)."""
    check_cache_scale(kv_cache, kv_scale)
    q, cache_seqlens = _rows_contiguous(q), cache_seqlens.contiguous()
    block_table = None if block_table is None else block_table.contiguous()
    kv_start = None if kv_start is None else kv_start.contiguous()
    tensors = (q, kv_cache, cache_seqlens, block_table, kv_start, kv_scale)
    chosen = resolve_backend(backend, *tensors)
    direct = _dispatch_directly(*tensors)
    if _values_readable(direct, chosen, q.device):
        _checks.check_lengths(kv_cache, cache_seqlens, block_table, kv_start)
    return q, cache_seqlens, block_table, kv_start, chosen, direct


def _latent_decode_impl(
    q: Tensor,
    kv_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    kv_start: Tensor | None,
    kv_scale: Tensor | None,
    softmax_scale: float,
    kv_rank: int,
    num_splits: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from m2la.kernels.latent_decode.triton import latent_decode_triton

        return latent_decode_triton(
            q, kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table, kv_start, num_splits, kv_scale=kv_scale
        )
    return latent_decode_reference(q, kv_cache, cache_seqlens, softmax_scale, kv_rank, block_table, kv_start, kv_scale)


# Each op is registered from its implementation, so the dispatcher route (compile, tracing,
# autograd) and the direct eager call run the same function.
_latent_decode_op = torch.library.custom_op("m2la::latent_decode", mutates_args=())(_latent_decode_impl)


@_latent_decode_op.register_fake
def _latent_decode_fake(
    q, kv_cache, cache_seqlens, block_table, kv_start, kv_scale, softmax_scale, kv_rank, num_splits, backend
):
    batch, heads, _ = q.shape
    return q.new_empty(batch, heads, kv_rank), q.new_empty(batch, heads, dtype=torch.float32)


def decode_attention(
    q: Tensor,
    kv_cache: Tensor,
    cache_seqlens: Tensor,
    softmax_scale: float,
    kv_rank: int,
    block_table: Tensor | None = None,
    kv_start: Tensor | None = None,
    *,
    kv_scale: Tensor | None = None,
    num_splits: int = 0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Absorbed decode: MQA of `q [b, h, r+2p]` over the latent cache, V = latent. A layer with no
    latent query (`n = 0`: a lossless conversion fine-tuned out of its grouped form) passes its RoPE
    query `q [b, h, 2p]` alone, and the scores skip the latent columns.

    `kv_cache [num_blocks, block_size, r+2p]` with `block_table [b, max_blocks]` int32 (paged), or
    `[b, s_max, r+2p]` with `block_table=None` (contiguous). `cache_seqlens [b]` int32; optional
    `kv_start [b]` int32 hides tokens before it (left padding). Returns `out [b, h, r]` (q's dtype)
    and `lse [b, h]` fp32, natural log; an empty sequence gives 0 and -inf. `num_splits=0` lets
    the Triton backend choose the split-KV factor. An fp8 cache (`torch.float8_e4m3fn` / `e5m2`, as
    `write_latent_cache` fills it) takes `kv_scale`, one fp32 per token slot (`kv_cache.shape[:2]`).
    """
    _checks.check_decode_args(q, kv_cache, cache_seqlens, kv_rank, block_table, kv_start)
    q, cache_seqlens, block_table, kv_start, chosen, direct = _decode_inputs(
        q, kv_cache, cache_seqlens, block_table, kv_start, kv_scale, backend
    )
    run = _latent_decode_impl if direct else _latent_decode_op
    return run(
        q, kv_cache, cache_seqlens, block_table, kv_start, kv_scale, float(softmax_scale), int(kv_rank),
        int(num_splits), chosen,
    )  # fmt: skip


def _grouped_decode_impl(
    q_rope: Tensor,
    kv_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    kv_start: Tensor | None,
    kv_scale: Tensor | None,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    num_splits: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from m2la.kernels.latent_decode.triton import grouped_decode_triton

        return grouped_decode_triton(
            q_rope, kv_cache, cache_seqlens, softmax_scale, kv_rank, head_groups, block_table, kv_start, num_splits,
            kv_scale=kv_scale,
        )  # fmt: skip
    return grouped_decode_reference(
        q_rope, kv_cache, cache_seqlens, softmax_scale, kv_rank, head_groups, block_table, kv_start, kv_scale
    )


_grouped_decode_op = torch.library.custom_op("m2la::grouped_decode", mutates_args=())(_grouped_decode_impl)


@_grouped_decode_op.register_fake
def _grouped_decode_fake(
    q_rope, kv_cache, cache_seqlens, block_table, kv_start, kv_scale, softmax_scale, kv_rank, head_groups, num_splits,
    backend,
):  # fmt: skip
    batch, heads, _ = q_rope.shape
    return q_rope.new_empty(batch, heads, kv_rank // head_groups), q_rope.new_empty(batch, heads, dtype=torch.float32)


def grouped_decode_attention(
    q_rope: Tensor,
    kv_cache: Tensor,
    cache_seqlens: Tensor,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    block_table: Tensor | None = None,
    kv_start: Tensor | None = None,
    *,
    kv_scale: Tensor | None = None,
    num_splits: int = 0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """`decode_attention` for a grouped layer, such as the lossless conversion of a GQA attention with
    `G = head_groups` KV heads: no latent query, and query head h (group g = h // (h / G)) scores only
    its group's P RoPE pairs (columns `r + [gP, (g+1)P)` and `r + p + [gP, (g+1)P)` of the half-layout
    key, p = G P) and reads only its group's latent slice `[g r/G, (g+1) r/G)`. That is GQA's work:
    the plain decode would spend (r + 2p + r) multiply-adds a head and token on the mostly-zero query.

    `q_rope [b, h, 2P]` (x half then y half of the head's pairs); cache, lengths, `kv_start` and
    `kv_scale` as in `decode_attention`, rows of `r + 2p`. Returns `out [b, h, r/G]` (q's dtype) and
    `lse [b, h]` fp32: the plain decode's result on the group's columns (its other columns are 0).
    """
    _checks.check_grouped_decode_args(q_rope, kv_cache, cache_seqlens, kv_rank, head_groups, block_table, kv_start)
    q_rope, cache_seqlens, block_table, kv_start, chosen, direct = _decode_inputs(
        q_rope, kv_cache, cache_seqlens, block_table, kv_start, kv_scale, backend
    )
    run = _grouped_decode_impl if direct else _grouped_decode_op
    return run(
        q_rope, kv_cache, cache_seqlens, block_table, kv_start, kv_scale, float(softmax_scale), int(kv_rank),
        int(head_groups), int(num_splits), chosen,
    )  # fmt: skip


# ---------------------------------------------------------------- latent prefill


def _prefill_inputs(
    queries: tuple[Tensor, ...], weights: tuple[Tensor, ...], kv_cache: Tensor, cu_seqlens_q: Tensor,
    cache_seqlens: Tensor, block_table: Tensor | None, kv_start: Tensor | None, kv_scale: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, backend: str | None,
) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor | None, Tensor | None, str, bool]:  # fmt: skip
    """What both prefill ops do once their shapes are checked (`_decode_inputs` for prefill): the fp8
    scale check, small inputs made contiguous, the backend resolved, the dispatch route, and
    (reference on CPU) the chunk and length values.
    -> (queries, cu_seqlens_q, cache_seqlens, block_table, kv_start, backend, direct)."""
    check_cache_scale(kv_cache, kv_scale)
    queries = tuple(_rows_contiguous(q) for q in queries)
    cu_seqlens_q, cache_seqlens = cu_seqlens_q.contiguous(), cache_seqlens.contiguous()
    block_table = None if block_table is None else block_table.contiguous()
    kv_start = None if kv_start is None else kv_start.contiguous()
    tensors = (*queries, kv_cache, *weights, cu_seqlens_q, cache_seqlens, block_table, kv_start, kv_scale)
    chosen = resolve_backend(backend, *tensors)
    direct = _dispatch_directly(*tensors)
    if _values_readable(direct, chosen, queries[0].device):
        _checks.check_chunks(cu_seqlens_q, cache_seqlens, queries[0].shape[0], max_seqlen_q, max_seqlen_k)
        _checks.check_lengths(kv_cache, cache_seqlens, block_table, kv_start)
    return queries, cu_seqlens_q, cache_seqlens, block_table, kv_start, chosen, direct


def _latent_prefill_impl(
    q_nope: Tensor,
    q_rope: Tensor,
    kv_cache: Tensor,
    w_uk: Tensor,
    w_uv: Tensor,
    cu_seqlens_q: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    kv_start: Tensor | None,
    kv_scale: Tensor | None,
    softmax_scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    mode: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from m2la.kernels.latent_prefill.triton import latent_prefill_triton

        return latent_prefill_triton(
            q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, softmax_scale,
            block_table, max_seqlen_q, mode, kv_start, kv_scale=kv_scale, max_seqlen_k=max_seqlen_k,
        )  # fmt: skip
    return latent_prefill_reference(
        q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, softmax_scale, block_table, kv_start,
        kv_scale,
    )  # fmt: skip


_latent_prefill_op = torch.library.custom_op("m2la::latent_prefill", mutates_args=())(_latent_prefill_impl)


@_latent_prefill_op.register_fake
def _latent_prefill_fake(q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, block_table, kv_start,
                         kv_scale, softmax_scale, max_seqlen_q, max_seqlen_k, mode, backend):  # fmt: skip
    tokens, heads, _ = q_nope.shape
    return q_nope.new_empty(tokens, heads, w_uv.shape[-1]), q_nope.new_empty(tokens, heads, dtype=torch.float32)


def prefill_attention(
    q_nope: Tensor,
    q_rope: Tensor,
    kv_cache: Tensor,
    w_uk: Tensor,
    w_uv: Tensor,
    cu_seqlens_q: Tensor,
    cache_seqlens: Tensor,
    softmax_scale: float,
    block_table: Tensor | None = None,
    kv_start: Tensor | None = None,
    *,
    kv_scale: Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    mode: str = "auto",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal varlen chunked prefill: new tokens attend to their cached prefix + causal chunk.

    `q_nope [tq, h, n]`, `q_rope [tq, h, 2p]` packed by `cu_seqlens_q [b+1]` int32; the chunk must
    already be in the cache (`write_latent_cache`), `cache_seqlens [b]` int32 counts it. `w_uk [h, r, n]`
    (k_nope_h = latent @ w_uk[h]), `w_uv [h, r, v]` (v_h = latent @ w_uv[h]). Returns `out [tq, h, v]`
    and `lse [tq, h]` fp32. Optional `kv_start [b]` int32 hides cache positions before it (left
    padding); a query that sees no key gives 0 and -inf. `mode` picks how the Triton backend runs:
    "decode" (absorbed: one split-KV decode per query token), "absorbed" (absorbed, the prefill
    kernel), "expanded" (keys and values up-projected per head, then flash attention) or "auto":
    `latent_prefill.triton.choose_prefill_mode`, a tensor-core cost count that sends chunks of up to
    ~52 tokens a sequence (InternVideo3's layout) down the decode route and longer ones expanded.
    `max_seqlen_q` (longest chunk) and `max_seqlen_k` (longest `cache_seqlens`, at least): 0 makes the
    Triton path read each from its tensor (one host sync each); with both given it never syncs (CUDA
    graphs). An fp8 cache takes `kv_scale` as in `decode_attention`; the Triton path then computes
    in q_nope's dtype.
    """
    if mode not in ("auto", "decode", "absorbed", "expanded"):
        raise ValueError(f"mode must be 'auto', 'decode', 'absorbed' or 'expanded', got {mode!r}")
    _checks.check_prefill_args(
        q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, block_table, kv_start, max_seqlen_q,
        max_seqlen_k,
    )  # fmt: skip
    (q_nope, q_rope), cu_seqlens_q, cache_seqlens, block_table, kv_start, chosen, direct = _prefill_inputs(
        (q_nope, q_rope), (w_uk, w_uv), kv_cache, cu_seqlens_q, cache_seqlens, block_table, kv_start, kv_scale,
        max_seqlen_q, max_seqlen_k, backend,
    )  # fmt: skip
    run = _latent_prefill_impl if direct else _latent_prefill_op
    return run(
        q_nope, q_rope, kv_cache, w_uk, w_uv, cu_seqlens_q, cache_seqlens, block_table, kv_start, kv_scale,
        float(softmax_scale), int(max_seqlen_q), int(max_seqlen_k), mode, chosen,
    )  # fmt: skip


def _grouped_prefill_impl(
    q_rope: Tensor,
    kv_cache: Tensor,
    cu_seqlens_q: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    kv_start: Tensor | None,
    kv_scale: Tensor | None,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    max_seqlen_q: int,
    mode: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from m2la.kernels.latent_prefill.triton import grouped_prefill_triton

        return grouped_prefill_triton(
            q_rope, kv_cache, cu_seqlens_q, cache_seqlens, softmax_scale, kv_rank, head_groups, block_table,
            max_seqlen_q, mode, kv_start, kv_scale=kv_scale,
        )  # fmt: skip
    return grouped_prefill_reference(
        q_rope, kv_cache, cu_seqlens_q, cache_seqlens, softmax_scale, kv_rank, head_groups, block_table, kv_start,
        kv_scale,
    )  # fmt: skip


_grouped_prefill_op = torch.library.custom_op("m2la::grouped_prefill", mutates_args=())(_grouped_prefill_impl)


@_grouped_prefill_op.register_fake
def _grouped_prefill_fake(q_rope, kv_cache, cu_seqlens_q, cache_seqlens, block_table, kv_start, kv_scale,
                          softmax_scale, kv_rank, head_groups, max_seqlen_q, mode, backend):  # fmt: skip
    tokens, heads, _ = q_rope.shape
    return q_rope.new_empty(tokens, heads, kv_rank // head_groups), q_rope.new_empty(tokens, heads, dtype=torch.float32)


def grouped_prefill_attention(
    q_rope: Tensor,
    kv_cache: Tensor,
    cu_seqlens_q: Tensor,
    cache_seqlens: Tensor,
    softmax_scale: float,
    kv_rank: int,
    head_groups: int,
    block_table: Tensor | None = None,
    kv_start: Tensor | None = None,
    *,
    kv_scale: Tensor | None = None,
    max_seqlen_q: int = 0,
    mode: str = "auto",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """`prefill_attention` for a grouped layer (see `grouped_decode_attention`: a lossless conversion of
    a GQA attention with `G = head_groups` KV heads): GQA's flash attention straight over the cache,
    each head reading its group's `2P` RoPE key columns and `r/G` latent columns as key and value.
    Nothing is expanded, and the keys are `2P` wide where the plain prefill's would be `2p = G 2P`.

    `q_rope [tq, h, 2P]` (x half then y half of each head's pairs) packed by `cu_seqlens_q [b+1]`; the
    chunk must already be in the cache; cache, `cache_seqlens`, `block_table`, `kv_start` and `kv_scale`
    as in `prefill_attention`. Returns `out [tq, h, r/G]` (q's dtype) and `lse [tq, h]` fp32. `mode`
    (Triton): "flash", "decode" (split-KV grouped decodes, a few query tokens x a group's heads a
    program) or "auto" (`latent_prefill.triton.choose_grouped_prefill_mode`). `max_seqlen_q`: the
    longest chunk (0: read it from `cu_seqlens_q`, one host sync).
    """
    if mode not in ("auto", "flash", "decode"):
        raise ValueError(f"mode must be 'auto', 'flash' or 'decode', got {mode!r}")
    _checks.check_grouped_prefill_args(
        q_rope, kv_cache, cu_seqlens_q, cache_seqlens, kv_rank, head_groups, block_table, kv_start, max_seqlen_q
    )
    (q_rope,), cu_seqlens_q, cache_seqlens, block_table, kv_start, chosen, direct = _prefill_inputs(
        (q_rope,), (), kv_cache, cu_seqlens_q, cache_seqlens, block_table, kv_start, kv_scale, max_seqlen_q, 0,
        backend,
    )  # fmt: skip
    run = _grouped_prefill_impl if direct else _grouped_prefill_op
    return run(
        q_rope, kv_cache, cu_seqlens_q, cache_seqlens, block_table, kv_start, kv_scale, float(softmax_scale),
        int(kv_rank), int(head_groups), int(max_seqlen_q), mode, chosen,
    )  # fmt: skip


# ---------------------------------------------------------------- cache write


def _write_latent_cache_impl(
    kv_cache: Tensor, latent: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor, slot_mapping: Tensor,
    kv_scale: Tensor | None, backend: str,
) -> None:  # fmt: skip
    if backend == "triton":
        from m2la.kernels.cache_write.triton import write_latent_cache_triton

        write_latent_cache_triton(kv_cache, latent, k_rope, cos, sin, slot_mapping, kv_scale)
    else:
        write_latent_cache_reference(kv_cache, latent, k_rope, cos, sin, slot_mapping, kv_scale)


_write_latent_cache_op = torch.library.custom_op("m2la::write_latent_cache", mutates_args=("kv_cache", "kv_scale"))(
    _write_latent_cache_impl
)


@_write_latent_cache_op.register_fake
def _write_latent_cache_fake(kv_cache, latent, k_rope, cos, sin, slot_mapping, kv_scale, backend):
    return None


def write_latent_cache(
    kv_cache: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    cos: Tensor,
    sin: Tensor,
    slot_mapping: Tensor,
    *,
    kv_scale: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Write `[latent [t, r] | RoPE(k_rope [t, 2p])]` rows into the paged cache, in place.

    `cos/sin [t, p]` per pair, half layout (pair j = (x[j], x[p+j])). `slot_mapping [t]` int64 =
    `block * block_size + offset`; `-1` skips the token. An fp8 cache (`torch.float8_e4m3fn` /
    `e5m2`) stores each row divided by its scale `amax(|row|) / fp8 max` and writes that scale to
    `kv_scale [num_blocks, block_size]` fp32 (m2la.quantization).
    """
    _checks.check_cache_write_args(kv_cache, latent, k_rope, cos, sin, slot_mapping)
    check_cache_scale(kv_cache, kv_scale)
    latent, k_rope, cos, sin = (_rows_contiguous(t) for t in (latent, k_rope, cos, sin))
    tensors = (kv_cache, latent, k_rope, cos, sin, slot_mapping.contiguous(), kv_scale)
    chosen = resolve_backend(backend, *tensors)
    direct = _dispatch_directly(*tensors)
    if _values_readable(direct, chosen, kv_cache.device):
        _checks.check_slots(kv_cache, tensors[5])
    run = _write_latent_cache_impl if direct else _write_latent_cache_op
    run(*tensors, chosen)
