"""torch.compile of a converted transformers model (CPU; the Triton backend through the interpreter).

A converted model traces as one graph per forward (prefill and decode, left padding included), for
both backends; compiled steps give the eager logits; the backend selected by `use_backend` is
guarded on, so switching it recompiles; conflicting selections across threads raise. Over an
M2LAStaticCache, every decode step of a run is one graph (what CUDA graphs replay).
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")
import m2la  # noqa: E402
import tiny_hf  # noqa: E402
from m2la import attention_math, backends  # noqa: E402
from m2la.backends import BackendUnavailableError, use_backend  # noqa: E402
from m2la.integrations.hf import M2LACache, M2LAStaticCache  # noqa: E402


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: kv_start in the fused kernels
    return ids, mask


def greedy_steps(model, ids, mask, steps: int = 3, cache=None) -> list[torch.Tensor]:
    """Prefill, then `steps - 1` greedy decode steps through one cache (default: an M2LACache):
    every step's logits. An M2LAStaticCache gets a padding mask over its whole capacity, so every
    decode step has the same input shapes."""
    cache = M2LACache.for_model(model) if cache is None else cache
    if isinstance(cache, M2LAStaticCache):
        mask = torch.cat((mask, mask.new_zeros(mask.shape[0], cache.get_max_length() - mask.shape[1])), dim=1)
    held, logits = ids.shape[1], []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        logits.append(out.logits)
        ids = out.logits[:, -1:].argmax(-1)
        if isinstance(cache, M2LAStaticCache):
            mask = mask.clone()
            mask[:, held] = 1
        else:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        held += 1
    return logits


def recording_aot_eager(graphs: list):
    """aot_eager that appends every graph it compiles to `graphs`."""

    def compile_fn(graph_module, example_inputs, **_):
        graphs.append(graph_module)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda gm, _: gm)(graph_module, example_inputs)

    return compile_fn


def m2la_op_calls(graph_module: torch.fx.GraphModule) -> int:
    return sum("m2la" in str(node.target) for node in graph_module.graph.nodes)


@pytest.fixture
def converted():
    model = tiny_hf.build("llama", 3, 1, 16)
    m2la.convert(model)
    torch._dynamo.reset()
    yield model
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_converted_model_traces_without_graph_breaks(converted, backend):
    ids, mask = padded_batch()
    with torch.no_grad(), use_backend(backend):
        cache = converted(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        decode_mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        for kwargs in (
            dict(input_ids=ids, attention_mask=mask, use_cache=True),
            dict(input_ids=ids[:, -1:], attention_mask=decode_mask, past_key_values=cache, use_cache=True),
        ):
            explained = torch._dynamo.explain(converted)(**kwargs)
            assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
            assert explained.graph_count == 1


def test_compiled_steps_match_eager_and_backend_switch_recompiles(converted):
    """aot_eager runs AOT autograd's functionalization of the in-place cache appends and of the
    mutating cache-write op, so the cache is a real compiled input. Each backend compiles its own
    graphs: only the Triton ones call m2la's ops."""
    graphs = []
    compiled = torch.compile(converted, backend=recording_aot_eager(graphs), fullgraph=True)
    ids, mask = padded_batch(1)
    with torch.no_grad():
        for backend in ("reference", "triton"):
            with use_backend(backend):
                expected = greedy_steps(converted, ids, mask)
                seen = len(graphs)
                got = greedy_steps(compiled, ids, mask)
            for want, have in zip(expected, got, strict=True):
                torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
            new = graphs[seen:]
            assert new, f"switching to {backend} reused the other backend's graphs"
            assert all((m2la_op_calls(g) > 0) == (backend == "triton") for g in new)


def test_inductor_compiled_triton_backend_matches_eager(converted):
    ids, mask = padded_batch(2)
    compiled = torch.compile(converted, fullgraph=True)
    with torch.no_grad(), use_backend("triton"):
        expected = greedy_steps(converted, ids, mask, steps=2)
        got = greedy_steps(compiled, ids, mask, steps=2)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_traced_mask_check_asserts_instead_of_returning_none():
    """Compiled, a mask the kernels cannot take fails on the device with the eager error's text."""
    torch._dynamo.reset()
    check = torch.compile(attention_math.causal_window_starts, backend="aot_eager", fullgraph=True)
    cpu = torch.device("cpu")
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert check(pad, 2, 1, 5, cpu).tolist() == [2, 0]
    holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert attention_math.causal_window_starts(holes, 2, 1, 5, cpu) is None  # eager: None
    with pytest.raises(RuntimeError, match="causal masks with left padding only"):
        check(holes, 2, 1, 5, cpu)
    torch._dynamo.reset()


def test_traced_selection_follows_the_innermost_block_and_flags_conflicts():
    assert backends._traced_selection == "auto"
    with use_backend("triton"):
        assert backends._traced_selection == "triton"
        with use_backend("reference"):
            assert backends._traced_selection == "reference"
        assert backends._traced_selection == "triton"
        entered, release = threading.Event(), threading.Event()

        def other_thread(name: str) -> None:
            with use_backend(name):
                entered.set()
                release.wait(10)

        for name, expected in (("triton", "triton"), ("reference", backends._CONFLICTING)):
            entered.clear(), release.clear()
            worker = threading.Thread(target=other_thread, args=(name,))
            worker.start()
            assert entered.wait(10)
            assert backends._traced_selection == expected  # same name: no conflict
            release.set()
            worker.join()
            assert backends._traced_selection == "triton"
    assert backends._traced_selection == "auto"


def test_compiled_code_refuses_conflicting_selections():
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def selected(x):
        return x + (1 if backends.get_backend() == "triton" else 2)

    entered, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        with use_backend("reference"):
            entered.set()
            release.wait(10)

    with use_backend("triton"):
        assert selected(torch.zeros(1)).item() == 1
        worker = threading.Thread(target=other_thread)
        worker.start()
        try:
            assert entered.wait(10)
            with pytest.raises((BackendUnavailableError, torch._dynamo.exc.TorchDynamoException), match="use_backend"):
                selected(torch.zeros(1))  # the guard on the selection fails; retracing raises
        finally:
            release.set()
            worker.join()
        assert selected(torch.zeros(1)).item() == 1
    torch._dynamo.reset()


def test_compiled_first_call_leaves_the_rope_column_memo_alone(converted):
    """Traced code reads the per-device RoPE column copies but never stores one (storing a tensor
    made in the graph into the memo failed under fullgraph on an H100, where the copy is a new
    tensor); the eager calls that follow still fill it."""
    ids, mask = padded_batch(3)
    attention = [m for m in converted.modules() if hasattr(m, "_rope_columns_on")]
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), use_backend("triton"):
        got = compiled(input_ids=ids, attention_mask=mask).logits
        assert attention and not any("_rope_column_copies" in m.__dict__ for m in attention)
        expected = converted(input_ids=ids, attention_mask=mask).logits
    assert all("_rope_column_copies" in m.__dict__ for m in attention)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def small_attention_module():
    from m2la import M2LAConfig, M2LAttention

    config = M2LAConfig(
        hidden_size=24, num_heads=3, kv_rank=16, rope_dim=8, qk_nope_dim=8, v_head_dim=8, softmax_scale=0.3,
        rope_inv_freq=[1.0, 0.5, 0.25, 0.125], rope_axis=[0] * 4, rope_source_column=[0, 1, 2, 3],
    )  # fmt: skip
    torch.manual_seed(0)
    return M2LAttention(config)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_module_with_latent_cache_matches_eager(backend, cache_dtype):
    """The core LatentCache under AOT autograd: traced code reads its buffers and lengths (views of
    other inputs with dynamic sizes fail there), and the appends stay in place in the buffers."""
    from m2la import LatentCache

    module = small_attention_module()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    eager_cache, compiled_cache = LatentCache(1, cache_dtype), LatentCache(1, cache_dtype)
    with torch.no_grad(), use_backend(backend):
        for step in range(5):
            t = 6 if step == 0 else 1
            hidden = torch.randn(2, t, 24)
            positions = torch.arange(eager_cache.seq_length(), eager_cache.seq_length() + t).expand(2, -1)
            want = module(hidden, positions, cache=eager_cache)
            torch.testing.assert_close(compiled(hidden, positions, cache=compiled_cache), want, rtol=1e-6, atol=1e-6)
    assert compiled_cache.seq_length() == 10 and compiled_cache._row_buffers[0].shape[1] > 10
    assert compiled_cache.rows[0].data_ptr() == compiled_cache._row_buffers[0].data_ptr()  # decode steps wrote in place
    torch._dynamo.reset()


def test_generate_with_a_compiled_forward_gives_the_eager_tokens(converted):
    """transformers' generate() (left padding, greedy) through a fullgraph-compiled forward."""
    ids, mask = padded_batch(4)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with use_backend("triton"):
        expected = converted.generate(**kwargs)
        converted.forward = torch.compile(converted.forward, backend="aot_eager", fullgraph=True)
        assert torch.equal(converted.generate(**kwargs), expected)


@pytest.mark.parametrize(
    "backend,cache_dtype", [("reference", None), ("triton", None), ("triton", torch.float8_e4m3fn)],
    ids=["reference", "triton", "triton-fp8"],
)  # fmt: skip
def test_compiled_static_cache_decodes_every_step_in_one_graph(converted, backend, cache_dtype):
    """Over an M2LAStaticCache a fullgraph, dynamic=False compile makes two graphs for a whole run,
    prefill and decode (every decode step replays the second, as a CUDA graph would), and gives the
    growing cache's eager logits. Traced, a full cache fails the device-side assert."""
    graphs = []
    compiled = torch.compile(converted, backend=recording_aot_eager(graphs), fullgraph=True, dynamic=False)
    ids, mask = padded_batch(5)
    with torch.no_grad(), use_backend(backend):
        expected = greedy_steps(converted, ids, mask, steps=6, cache=M2LACache.for_model(converted, cache_dtype))
        static = M2LAStaticCache.for_model(converted, 16, batch_size=2, dtype=cache_dtype)
        got = greedy_steps(compiled, ids, mask, steps=6, cache=static)
        assert len(graphs) == 2 and int(static.get_seq_length()) == 14
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
        assert all((m2la_op_calls(g) > 0) == (backend == "triton") for g in graphs)
        step = dict(input_ids=ids[:, :1].clone(), attention_mask=torch.ones(2, 16, dtype=torch.long), cache=static)
        compiled(**step, use_cache=True)  # 15 of 16
        compiled(**step, use_cache=True)  # 16 of 16
        with pytest.raises(RuntimeError, match="static latent cache is full"):
            compiled(**step, use_cache=True)
        assert len(graphs) == 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_generate_compiles_decode_over_a_static_cache(converted, backend):
    """transformers' auto-compile (forced on CPU) of generate() with cache_implementation="static"
    or an M2LAStaticCache: one decode graph a run, the eager tokens."""
    from transformers import CompileConfig

    graphs = []
    compile_config = CompileConfig(backend=recording_aot_eager(graphs), fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    ids, mask = padded_batch(6)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with use_backend(backend):
        expected = converted.generate(**kwargs)
        static = converted.generate(**kwargs, cache_implementation="static", compile_config=compile_config)
        assert torch.equal(static, expected) and len(graphs) == 1
        cache = M2LAStaticCache.for_model(converted, 20)
        assert torch.equal(converted.generate(**kwargs, cache=cache, compile_config=compile_config), expected)
        assert len(graphs) == 2 and int(cache.get_seq_length()) == 14


@pytest.mark.parametrize(
    "backend,cache_dtype", [("reference", None), ("triton", None), ("triton", torch.float8_e4m3fn)],
    ids=["reference", "triton", "triton-fp8"],
)  # fmt: skip
def test_compiled_module_with_static_latent_cache_decodes_in_one_graph(backend, cache_dtype):
    """The core StaticLatentCache: eager and compiled (dynamic=False) M2LAttention give the growing
    LatentCache's outputs, and every compiled decode step reuses one graph."""
    from m2la import LatentCache, StaticLatentCache

    module = small_attention_module()
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=recording_aot_eager(graphs), fullgraph=True, dynamic=False)
    growing = LatentCache(1, cache_dtype)
    eager_static, compiled_static = StaticLatentCache(1, 12, cache_dtype), StaticLatentCache(1, 12, cache_dtype)
    with torch.no_grad(), use_backend(backend):
        for step in range(6):
            t = 6 if step == 0 else 1
            hidden = torch.randn(2, t, 24)
            positions = torch.arange(growing.seq_length(), growing.seq_length() + t).expand(2, -1).contiguous()
            want = module(hidden, positions, cache=growing)
            torch.testing.assert_close(module(hidden, positions, cache=eager_static), want, rtol=1e-6, atol=1e-6)
            got = compiled(hidden, positions, cache=compiled_static)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2 and compiled_static.seq_length(0) == 11  # prefill + one decode graph
    torch._dynamo.reset()
