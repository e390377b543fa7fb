"""Backend selection, custom-op registration and torch.compile over the reference ops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kernel_cases import random_paged_cache, record_calls

import m2la.backends as backends
from m2la.backends import BackendUnavailableError, get_backend, resolve_backend, use_backend
from m2la.kernels import decode_attention, prefill_attention, write_latent_cache


def cpu_tensor():
    return torch.zeros(2)


def test_auto_on_cpu_picks_reference():
    assert resolve_backend("auto", cpu_tensor()) == "reference"
    assert resolve_backend(None, cpu_tensor()) == "reference"  # default is auto


def test_named_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        resolve_backend("triton", cpu_tensor())


def test_named_triton_missing_raises(monkeypatch):
    monkeypatch.setattr(backends, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    with pytest.raises(BackendUnavailableError, match="cannot be imported"):
        resolve_backend("triton", cpu_tensor())
    assert resolve_backend("auto", cpu_tensor()) == "reference"


def test_interpreter_allows_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu_tensor()) == "triton"


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown m2la backend"):
        resolve_backend("cuda", cpu_tensor())
    with pytest.raises(ValueError), use_backend("fast"):
        pass


def test_context_manager_nests_and_restores():
    assert get_backend() == "auto"
    with use_backend("reference"):
        assert get_backend() == "reference"
        with use_backend("triton"):
            assert get_backend() == "triton"
            assert resolve_backend("reference", cpu_tensor()) == "reference"  # per-call wins
        assert get_backend() == "reference"
    assert get_backend() == "auto"


def test_context_manager_reaches_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cache, table = random_paged_cache([3], 32 + 16, 16, torch.float32)
    q, lens = torch.randn(1, 2, 48), torch.tensor([3], dtype=torch.int32)
    with use_backend("triton"), pytest.raises(BackendUnavailableError):
        decode_attention(q, cache, lens, 0.1, 32, table)
    decode_attention(q, cache, lens, 0.1, 32, table)  # auto again: reference


def test_import_does_not_load_triton_or_cuda():
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('queried CUDA'))\n"
        "import m2la, m2la.backends, m2la.kernels\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def decode_inputs():
    cache, table = random_paged_cache([5, 0, 19], 32 + 16, 8, torch.float32)
    q = torch.randn(3, 4, 48)
    return q, cache, torch.tensor([5, 0, 19], dtype=torch.int32), table


def test_custom_ops_registered_with_fake_kernels():
    q, cache, lens, table = decode_inputs()
    decode = torch.ops.m2la.latent_decode.default
    torch.library.opcheck(decode, (q, cache, lens, table, None, None, 0.2, 32, 0, "reference"))
    latent, k_rope = torch.randn(4, 32), torch.randn(4, 16)
    cos, sin, slots = torch.ones(4, 8), torch.zeros(4, 8), torch.tensor([0, -1, 9, 17])
    write = torch.ops.m2la.write_latent_cache.default
    torch.library.opcheck(write, (torch.zeros(4, 8, 48), latent, k_rope, cos, sin, slots, None, "reference"))
    # fp8 caches (the write mutates the per-token scales too). opcheck's schema test compares tensors
    # with ops CPU fp8 lacks, so it is left out; the fake-tensor and compile checks run.
    fp8_checks = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    cache8, scale = torch.zeros(4, 8, 48, dtype=torch.float8_e4m3fn), torch.ones(4, 8)
    torch.library.opcheck(write, (cache8, latent, k_rope, cos, sin, slots, scale, "reference"), test_utils=fp8_checks)
    fp8_cache = cache.nan_to_num(0.0).to(torch.float8_e4m3fn)
    fp8_scale = torch.rand(cache.shape[:2]) + 0.5
    args = (q, fp8_cache, lens, table, None, fp8_scale, 0.2, 32, 0, "reference")
    torch.library.opcheck(decode, args, test_utils=fp8_checks)


def test_grouped_ops_registered_with_fake_kernels():
    """The grouped decode and prefill ops (lossless conversions of GQA layers) pass opcheck: schema,
    fake (meta) kernels against the real ones, autograd registration, AOT dispatch."""
    gen = torch.Generator().manual_seed(5)
    cache, table = random_paged_cache([5, 0, 19], 2 * 24, 8, torch.float32)  # 2 groups x 12: r = 2p = 24
    lens = torch.tensor([5, 0, 19], dtype=torch.int32)
    q = torch.randn(3, 6, 12, generator=gen)  # 6 heads, 3 a group, 2P = 12
    decode = torch.ops.m2la.grouped_decode.default
    torch.library.opcheck(decode, (q, cache, lens, table, None, None, 0.2, 24, 2, 0, "reference"))
    cu = torch.tensor([0, 2, 2, 9], dtype=torch.int32)  # chunks of 2, 0 and 7 new tokens
    q_chunks = torch.randn(9, 6, 12, generator=gen)
    prefill = torch.ops.m2la.grouped_prefill.default
    torch.library.opcheck(prefill, (q_chunks, cache, cu, lens, table, None, None, 0.2, 24, 2, 7, "auto", "reference"))


@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
@pytest.mark.parametrize("nope", [16, 0], ids=["n16", "n0"])
def test_triton_prefill_op_matches_its_fake_kernel(mode, nope):
    """Through the Triton backend (interpreter) the prefill op returns what its fake kernel says, strides
    included, in every mode: compiled code (inductor) asserts the fake's layout. The absorbed modes
    once returned their output as a permuted [h, tq, v] buffer."""
    from test_kernel_prefill import make_case

    q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table = make_case(3, 32, 16, nope, 24, [5, 2], [7, 3], 16,
                                                                   torch.float32)  # fmt: skip
    prefill = torch.ops.m2la.latent_prefill.default
    args = (q_nope, q_rope, cache, w_uk, w_uv, cu, lens, table, None, None, 0.2, 5, 12, mode, "triton")
    torch.library.opcheck(prefill, args, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_triton_decode_ops_match_their_fake_kernels():
    """The decode ops (plain, RoPE-only queries, grouped) and the grouped prefill's two routes, through
    the Triton backend."""
    q, cache, lens, table = decode_inputs()
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    decode = torch.ops.m2la.latent_decode.default
    torch.library.opcheck(decode, (q, cache, lens, table, None, None, 0.2, 32, 0, "triton"), test_utils=checks)
    rope_only = q[..., 32:].contiguous()
    torch.library.opcheck(decode, (rope_only, cache, lens, table, None, None, 0.2, 32, 0, "triton"), test_utils=checks)
    grouped_cache, grouped_table = random_paged_cache([5, 0, 19], 2 * 24, 8, torch.float32)
    gen = torch.Generator().manual_seed(6)
    grouped = torch.ops.m2la.grouped_decode.default
    q_groups = torch.randn(3, 6, 12, generator=gen)
    torch.library.opcheck(grouped, (q_groups, grouped_cache, lens, grouped_table, None, None, 0.2, 24, 2, 0, "triton"),
                          test_utils=checks)  # fmt: skip
    cu = torch.tensor([0, 2, 2, 9], dtype=torch.int32)
    q_chunks = torch.randn(9, 6, 12, generator=gen)
    prefill = torch.ops.m2la.grouped_prefill.default
    for mode in ("flash", "decode"):
        args = (q_chunks, grouped_cache, cu, lens, grouped_table, None, None, 0.2, 24, 2, 7, mode, "triton")
        torch.library.opcheck(prefill, args, test_utils=checks)


def test_torch_compile_over_reference_ops():
    q, cache, lens, table = decode_inputs()

    def step(q, cache, latent, k_rope, cos, sin, slots):
        write_latent_cache(cache, latent, k_rope, cos, sin, slots, backend="reference")
        out, lse = decode_attention(q, cache, lens + 1, 0.2, 32, table, backend="reference")
        return out * 2, lse

    gen = torch.Generator().manual_seed(3)
    latent, k_rope = torch.randn(3, 32, generator=gen), torch.randn(3, 16, generator=gen)
    cos, sin = torch.rand(3, 8, generator=gen), torch.rand(3, 8, generator=gen)
    slots = torch.tensor([int(table[0, 0]) * 8 + 5, int(table[1, 0]) * 8, int(table[2, 2]) * 8 + 3])
    eager_cache = cache.clone()
    expected = step(q, eager_cache, latent, k_rope, cos, sin, slots)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, cache, latent, k_rope, cos, sin, slots)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cache, eager_cache, equal_nan=True)


def test_torch_compile_prefill_reference():
    gen = torch.Generator().manual_seed(4)
    cache, table = random_paged_cache([7, 4], 32 + 16, 8, torch.float32)
    q_nope, q_rope = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 16, generator=gen)
    w_uk, w_uv = torch.randn(2, 32, 8, generator=gen), torch.randn(2, 32, 12, generator=gen)
    args = (q_nope, q_rope, cache, w_uk, w_uv, torch.tensor([0, 3, 5], dtype=torch.int32),
            torch.tensor([7, 4], dtype=torch.int32), 0.3, table)  # fmt: skip

    def run(*a):
        return prefill_attention(*a, backend="reference")

    torch.testing.assert_close(torch.compile(run, backend="aot_eager")(*args), run(*args))


def test_torch_compile_over_fp8_cache_ops():
    """The fp8 write (mutating cache and scales) and decode compile fullgraph like the others."""
    from m2la.quantization import quantize_rows

    q, cache, lens, table = decode_inputs()
    cache8, scale = quantize_rows(cache.nan_to_num(0.0), torch.float8_e4m3fn)

    def step(q, cache8, scale, latent, k_rope, cos, sin, slots):
        write_latent_cache(cache8, latent, k_rope, cos, sin, slots, kv_scale=scale, backend="reference")
        out, lse = decode_attention(q, cache8, lens + 1, 0.2, 32, table, kv_scale=scale, backend="reference")
        return out * 2, lse

    gen = torch.Generator().manual_seed(3)
    latent, k_rope = torch.randn(3, 32, generator=gen), torch.randn(3, 16, generator=gen)
    cos, sin = torch.rand(3, 8, generator=gen), torch.rand(3, 8, generator=gen)
    slots = torch.tensor([int(table[0, 0]) * 8 + 5, int(table[1, 0]) * 8, int(table[2, 2]) * 8 + 3])
    eager_cache, eager_scale = cache8.clone(), scale.clone()
    expected = step(q, eager_cache, eager_scale, latent, k_rope, cos, sin, slots)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, cache8, scale, latent, k_rope, cos, sin, slots)
    torch.testing.assert_close(got, expected)
    assert torch.equal(cache8.view(torch.uint8), eager_cache.view(torch.uint8))
    torch.testing.assert_close(scale, eager_scale)
    assert not torch.equal(scale, quantize_rows(cache.nan_to_num(0.0), torch.float8_e4m3fn)[1])  # the write landed


def _op_calls(monkeypatch) -> list[str]:
    """Record which public ops went through their registered custom op (the dispatcher route)."""
    from m2la.kernels import ops

    calls: list[str] = []
    for name in ("_latent_decode_op", "_latent_prefill_op", "_write_latent_cache_op"):
        record_calls(monkeypatch, ops, name, calls)
    return calls


def _three_ops(q, cache, lens, table, backend):
    """decode, prefill (3 new tokens of sequence 2) and a cache write on the decode inputs."""
    gen = torch.Generator().manual_seed(5)
    heads = q.shape[1]
    out, lse = decode_attention(q, cache, lens, 0.2, 32, table, backend=backend)
    w_uk, w_uv = torch.randn(heads, 32, 8, generator=gen), torch.randn(heads, 32, 12, generator=gen)
    q_nope, q_rope = torch.randn(3, heads, 8, generator=gen), q[:1, :, 32:].expand(3, heads, 16).contiguous()
    cu, seqlens = torch.tensor([0, 0, 0, 3], dtype=torch.int32), lens.clone()
    p_out, p_lse = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, 0.3, table, backend=backend)
    written = torch.zeros(2, 8, 48)
    latent, k_rope = torch.randn(3, 32, generator=gen), torch.randn(3, 16, generator=gen)
    cos, sin = torch.rand(3, 8, generator=gen), torch.rand(3, 8, generator=gen)
    write_latent_cache(written, latent, k_rope, cos, sin, torch.tensor([0, -1, 9]), backend=backend)
    return out, lse, p_out, p_lse, written


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eager_calls_skip_the_dispatcher_with_the_same_result(monkeypatch, backend):
    """Plain eager calls run the implementation directly (the custom op's Python dispatch costs
    tens of microseconds a call); the result is bit for bit the custom op's."""
    from m2la.kernels import ops

    q, cache, lens, table = decode_inputs()
    calls = _op_calls(monkeypatch)
    direct = _three_ops(q, cache, lens, table, backend)
    assert calls == []
    monkeypatch.setattr(ops, "_dispatch_directly", lambda *tensors: False)
    through_op = _three_ops(q, cache, lens, table, backend)
    assert calls == ["_latent_decode_op", "_latent_prefill_op", "_write_latent_cache_op"]
    for got, expected in zip(direct, through_op, strict=True):
        assert torch.equal(got, expected)


def test_tracing_keeps_the_dispatcher():
    """Modes that trace or intercept calls (torch-function and dispatch modes, functorch
    transforms), tensor subclasses and autograd keep the custom op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from m2la.kernels import ops

    x = torch.ones(2)
    assert ops._dispatch_directly(x, None)
    with _PassThroughMode():
        assert not ops._dispatch_directly(x)
    seen = []
    make_fx(lambda t: seen.append(ops._dispatch_directly(t)) or t + 1)(x)
    torch.vmap(lambda t: seen.append(ops._dispatch_directly(t)) or t)(torch.ones(2, 2))
    assert seen == [False, False]
    assert not ops._dispatch_directly(x, torch.ones(2, requires_grad=True))
    assert not ops._dispatch_directly(x, torch.nn.Parameter(torch.ones(2)))
    with torch.no_grad():  # no graph to lose
        assert ops._dispatch_directly(x, torch.ones(2, requires_grad=True), torch.nn.Parameter(torch.ones(2)))
    assert not ops._dispatch_directly(torch.ones(2).as_subclass(_TensorSubclass))


class _TensorSubclass(torch.Tensor):
    pass


def test_dispatcher_kept_for_autograd_and_fake_tensors(monkeypatch):
    """An input that requires grad goes through the custom op, which raises at backward (the ops
    have no derivative) instead of a direct call that would silently drop the graph; fake tensors
    (torch.compile's tracing) get the registered fake kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, cache, lens, table = decode_inputs()
    calls = _op_calls(monkeypatch)
    out, _ = decode_attention(q.clone().requires_grad_(), cache, lens, 0.2, 32, table, backend="reference")
    assert calls == ["_latent_decode_op"]
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    with torch.no_grad():  # no graph to lose: direct
        decode_attention(q, cache, lens, 0.2, 32, table, backend="reference")
    assert calls == ["_latent_decode_op"]
    with FakeTensorMode() as mode:
        fake_q, fake_cache = mode.from_tensor(q), mode.from_tensor(cache)
        fake_lens, fake_table = mode.from_tensor(lens), mode.from_tensor(table)
        fake_out, fake_lse = decode_attention(fake_q, fake_cache, fake_lens, 0.2, 32, fake_table, backend="reference")
    assert fake_out.shape == (3, 4, 32) and fake_lse.shape == (3, 4)
    assert calls == ["_latent_decode_op"] * 2
