"""Argument checks of the public kernel ops: both backends refuse the same bad inputs with a
ValueError naming the argument; strided views of the small inputs give the contiguous result (the
Triton launchers take row strides only, so a strided index tensor was once read wrongly); values
are checked by the reference backend on CPU, and never read on the host by the Triton path unless
the caller asks (`check_argument_values`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assert_close_with_lse, random_contiguous_cache, random_paged_cache

from m2la.kernels import (
    check_argument_values,
    decode_attention,
    grouped_decode_attention,
    prefill_attention,
    write_latent_cache,
)

BACKENDS = ["reference", "triton"]
I32 = torch.int32


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a last-dim stride of 2 (every other element of a wider tensor)."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def strided_vector(t: torch.Tensor) -> torch.Tensor:
    """A 1-d tensor as a column of a 2-d one (stride 3, not 1)."""
    wide = torch.full((t.shape[0], 3), -7, dtype=t.dtype)
    wide[:, 0] = t
    return wide[:, 0]


# ---------------------------------------------------------------- decode


def decode_args(seed: int = 0) -> dict:
    """3 sequences (lengths 20, 0, 7), 5 heads, r = 16, 2p = 8, a paged cache of 8-token blocks."""
    cache, table = random_paged_cache([20, 0, 7], 24, 8, torch.float32, seed=seed)
    q = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(seed))
    return dict(
        q=q, kv_cache=cache, cache_seqlens=torch.tensor([20, 0, 7], dtype=I32), softmax_scale=0.2, kv_rank=16,
        block_table=table, kv_start=torch.tensor([3, 0, 0], dtype=I32),
    )  # fmt: skip


BAD_DECODE = {
    "q 2-d": (dict(q=torch.zeros(3, 24)), r"q \[b, h, r\+2p\]"),
    "q width": (dict(q=torch.zeros(3, 5, 23)), r"q \[b, h, r\+2p\]"),
    "kv_rank 0": (dict(kv_rank=0), "kv_rank=0"),
    "kv_rank too big": (dict(kv_rank=25), "kv_rank=25"),
    "q int": (dict(q=torch.zeros(3, 5, 24, dtype=torch.int32)), "q must be fp16"),
    "q and cache dtypes": (dict(q=torch.zeros(3, 5, 24, dtype=torch.float16)), r"q \(torch.float16\) and kv_cache"),
    "seqlens int64": (dict(cache_seqlens=torch.tensor([20, 0, 7])), "cache_seqlens must be a 1-d torch.int32"),
    "seqlens length": (dict(cache_seqlens=torch.tensor([20, 0], dtype=I32)), "cache_seqlens .* length 3"),
    "seqlens 2-d": (dict(cache_seqlens=torch.zeros(3, 1, dtype=I32)), "cache_seqlens must be a 1-d"),
    "kv_start int64": (dict(kv_start=torch.zeros(3, dtype=torch.int64)), "kv_start must be a 1-d torch.int32"),
    "kv_start length": (dict(kv_start=torch.zeros(4, dtype=I32)), "kv_start .* length 3"),
    "table int64": (
        dict(block_table=torch.Tensor.long),
        r"block_table must be a 2-d torch.int32 tensor \[3, max_blocks\]",
    ),
    "table rows": (dict(block_table=lambda t: t[:2]), r"block_table .* \[3, max_blocks\]"),
    "table 1-d": (dict(block_table=lambda t: t[0]), r"block_table .* \[3, max_blocks\]"),
    "contiguous cache, too few rows": (dict(block_table=None, kv_cache=torch.zeros(2, 32, 24)), "a row per sequence"),
    "cache rows strided": (dict(kv_cache=strided), "kv_cache rows must be contiguous"),
    "cache 2-d": (dict(kv_cache=torch.zeros(64, 24)), "3-d cache"),
}


def _apply(args: dict, changes: dict) -> dict:
    """`args` with each changed entry replaced: a value, or a function of the original one."""
    return {**args, **{name: value(args[name]) if callable(value) else value for name, value in changes.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_DECODE))
def test_decode_refuses_bad_arguments_on_both_backends(case, backend):
    changes, message = BAD_DECODE[case]
    with pytest.raises(ValueError, match=message):
        decode_attention(**_apply(decode_args(), changes), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_strided_small_inputs_give_the_contiguous_result(backend):
    """q with a last-dim stride of 2 and cache_seqlens / kv_start / block_table as strided views:
    the result of contiguous copies. Before the checks, Triton read a strided cache_seqlens as if
    contiguous (a silent wrong answer)."""
    args = decode_args(seed=1)
    want_out, want_lse = decode_attention(**args, backend="reference")
    table = args["block_table"]
    wide_table = torch.full((table.shape[0], 2 * table.shape[1]), -5, dtype=I32)
    wide_table[:, ::2] = table
    views = dict(
        q=strided(args["q"]), cache_seqlens=strided_vector(args["cache_seqlens"]),
        kv_start=strided_vector(args["kv_start"]), block_table=wide_table[:, ::2],
    )  # fmt: skip
    assert not any(v.is_contiguous() for v in views.values())
    out, lse = decode_attention(**{**args, **views}, backend=backend)
    assert_close_with_lse(out, lse, want_out, want_lse, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_contiguous_cache_may_hold_more_rows_than_the_batch(backend):
    """A preallocated contiguous cache `[b_max, s, w]` serves a smaller batch from its first rows."""
    seqlens = [9, 4]
    cache = random_contiguous_cache([*seqlens, 11], 24, 16, torch.float32)  # row 2: another sequence
    q = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor(seqlens, dtype=I32)
    out, lse = decode_attention(q, cache, lengths, 0.3, 16, backend=backend)
    want_out, want_lse = decode_attention(q, cache[:2].clone(), lengths, 0.3, 16, backend="reference")
    assert_close_with_lse(out, lse, want_out, want_lse, atol=1e-5)


def _set_entry(value: int):
    def change(table: torch.Tensor) -> torch.Tensor:
        table = table.clone()
        table[0, 1] = value  # sequence 0 (20 tokens, 8-token blocks) reads blocks 0..2
        return table

    return change


BAD_DECODE_VALUES = {
    "length past the capacity": (dict(cache_seqlens=torch.tensor([20, 0, 33], dtype=I32)), r"cache_seqlens must be in \[0, 32\]"),
    "negative length": (dict(cache_seqlens=torch.tensor([20, -1, 7], dtype=I32)), r"in \[0, 32\].*-1"),
    "negative kv_start": (dict(kv_start=torch.tensor([0, 0, -2], dtype=I32)), "kv_start must be >= 0"),
    "table entry out of range": (dict(block_table=_set_entry(99)), r"block_table\[0, 1\] = 99 names no block"),
    "table entry -1": (dict(block_table=_set_entry(-1)), r"block_table\[0, 1\] = -1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DECODE_VALUES))
def test_reference_decode_on_cpu_checks_values(case):
    changes, message = BAD_DECODE_VALUES[case]
    with pytest.raises(ValueError, match=message):
        decode_attention(**_apply(decode_args(), changes), backend="reference")


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped"])
@pytest.mark.parametrize("case", list(BAD_DECODE_VALUES))
def test_triton_decode_checks_values_when_asked(case, grouped):
    """Under `check_argument_values` the Triton path reads the values too (a sync a call on a GPU),
    with the reference's messages; the grouped op shares the checks."""
    changes, message = BAD_DECODE_VALUES[case]
    args = _apply(decode_args(), changes)
    with check_argument_values(), pytest.raises(ValueError, match=message):
        if grouped:  # 5 heads over 1 group: q [b, h, 2P] with 2P = the cache's 8 RoPE columns
            args.pop("kv_rank")
            q_rope = args.pop("q")[..., 16:]
            grouped_decode_attention(q_rope, **args, kv_rank=16, head_groups=1, backend="triton")
        else:
            decode_attention(**args, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_table_entries_outside_the_visible_pages_may_be_anything(backend):
    """Entries past a sequence's length, or wholly before its kv_start, may be anything (engines
    leave -1 there): the reference's check reads only the visible pages' entries, and neither
    backend reads the others."""
    args = {**decode_args(), "kv_start": torch.tensor([8, 0, 0], dtype=I32)}
    want = decode_attention(**args, backend="reference")
    table = args["block_table"].clone()
    table[0, 0] = -3  # before sequence 0's kv_start of 8 (blocks 1 and 2 hold its visible rows)
    table[0, 3:] = -1  # past its 20 tokens
    table[1, :] = 10_000  # sequence 1 is empty
    table[2, 1:] = -1  # sequence 2 holds 7 tokens: block 0 only
    got = decode_attention(**{**args, "block_table": table}, backend=backend)
    assert_close_with_lse(*got, *want, atol=1e-5)


def test_triton_decode_reads_no_value_on_the_host(monkeypatch):
    """The Triton path checks metadata only (values would cost a device sync per call on a GPU)."""
    args = decode_args()
    want = decode_attention(**args, backend="reference")

    def no_host_reads(self, *a, **kw):
        raise AssertionError("host sync: a tensor value was read on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__int__", "__bool__", "__index__"):
            patch.setattr(torch.Tensor, name, no_host_reads)
        got = decode_attention(**args, backend="triton")
    assert_close_with_lse(*got, *want, atol=1e-5)


@pytest.mark.parametrize("op", ["decode", "prefill", "write"])
def test_tensors_on_two_devices_are_refused_by_name(op):
    """One argument on another device (the meta device stands in for a GPU here)."""
    if op == "decode":
        args, moved, call = decode_args(), "kv_start", decode_attention
    elif op == "prefill":
        args, moved, call = prefill_args(), "w_uv", prefill_attention
    else:
        args, moved, call = write_args(), "sin", write_latent_cache
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError, match=f"one device, got .*{moved} on meta"):
        call(**args, backend="reference")


def test_checks_run_under_fake_tensors():
    """Under FakeTensorMode (how torch.compile traces the ops) bad metadata is still refused and
    a good call reads no values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = decode_args()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        out, lse = decode_attention(**fake, backend="reference")
        assert out.shape == (3, 5, 16) and lse.shape == (3, 5)
        with pytest.raises(ValueError, match="cache_seqlens must be a 1-d torch.int32"):
            decode_attention(**{**fake, "cache_seqlens": fake["cache_seqlens"].long()}, backend="reference")


# ---------------------------------------------------------------- prefill


def prefill_args(seed: int = 0) -> dict:
    """2 sequences: chunks of 5 and 3 new tokens after 7 and 0 cached; 3 heads, r = 16, n = 8,
    2p = 8, v = 12; a paged cache of 8-token blocks."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [12, 3]
    cache, table = random_paged_cache(lengths, 24, 8, torch.float32, seed=seed)
    return dict(
        q_nope=torch.randn(8, 3, 8, generator=gen), q_rope=torch.randn(8, 3, 8, generator=gen), kv_cache=cache,
        w_uk=torch.randn(3, 16, 8, generator=gen) / 4, w_uv=torch.randn(3, 16, 12, generator=gen) / 4,
        cu_seqlens_q=torch.tensor([0, 5, 8], dtype=I32), cache_seqlens=torch.tensor(lengths, dtype=I32),
        softmax_scale=0.25, block_table=table,
    )  # fmt: skip


BAD_PREFILL = {
    "q_rope tokens": (dict(q_rope=torch.zeros(7, 3, 8)), r"q_nope \[tq, h, n\] and q_rope \[tq, h, 2p\]"),
    "q_nope 2-d": (dict(q_nope=torch.zeros(8, 24)), r"q_nope \[tq, h, n\]"),
    "w_uk heads": (dict(w_uk=torch.zeros(2, 16, 8)), r"w_uk must be \[h=3, r, n=8\]"),
    "w_uk nope dim": (dict(w_uk=torch.zeros(3, 16, 9)), r"w_uk must be \[h=3, r, n=8\]"),
    "w_uv rank": (dict(w_uv=torch.zeros(3, 15, 12)), r"w_uv must be \[h=3, r=16, v\]"),
    "cache width": (dict(w_uk=torch.zeros(3, 17, 8), w_uv=torch.zeros(3, 17, 12)), r"rows of r \(17\) \+ 2p \(8\)"),
    "cu_seqlens int64": (dict(cu_seqlens_q=torch.tensor([0, 5, 8])), "cu_seqlens_q must be a 1-d torch.int32"),
    "cu_seqlens empty": (dict(cu_seqlens_q=torch.zeros(0, dtype=I32)), r"cu_seqlens_q must be .*\[b \+ 1\]"),
    "seqlens length": (dict(cache_seqlens=torch.tensor([12, 3, 1], dtype=I32)), "cache_seqlens .* length 2"),
    "kv_start int64": (dict(kv_start=torch.zeros(2, dtype=torch.int64)), "kv_start must be a 1-d torch.int32"),
    "table rows": (dict(block_table=lambda t: torch.cat((t, t[:1]))), r"block_table .* \[2, max_blocks\]"),
    "negative max_seqlen_q": (dict(max_seqlen_q=-1), "max_seqlen_q / max_seqlen_k must be >= 0"),
    "q int": (dict(q_nope=torch.zeros(8, 3, 8, dtype=torch.int64)), "q_nope must be fp16"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_PREFILL))
def test_prefill_refuses_bad_arguments_on_both_backends(case, backend):
    changes, message = BAD_PREFILL[case]
    args = _apply(prefill_args(), changes)
    with pytest.raises(ValueError, match=message):
        prefill_attention(**args, backend=backend)


BAD_PREFILL_VALUES = {
    "cu_seqlens not from 0": (dict(cu_seqlens_q=torch.tensor([1, 5, 8], dtype=I32)), "cu_seqlens_q must rise from 0"),
    "cu_seqlens short of the tokens": (dict(cu_seqlens_q=torch.tensor([0, 5, 7], dtype=I32)), "to the 8 query tokens"),
    "cu_seqlens going down": (dict(cu_seqlens_q=torch.tensor([0, 9, 8], dtype=I32)), "must rise"),
    "chunk not in the cache": (dict(cache_seqlens=torch.tensor([12, 2], dtype=I32)), "must count each new chunk"),
    "length past the capacity": (dict(cache_seqlens=torch.tensor([33, 3], dtype=I32)), r"cache_seqlens must be in \[0, 24\]"),
    "max_seqlen_q short": (dict(max_seqlen_q=4), r"max_seqlen_q=4 is shorter than the longest chunk \(5\)"),
    "max_seqlen_k short": (dict(max_seqlen_k=11), r"max_seqlen_k=11 is shorter than the longest cache_seqlens \(12\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PREFILL_VALUES))
def test_reference_prefill_on_cpu_checks_values(case):
    changes, message = BAD_PREFILL_VALUES[case]
    with pytest.raises(ValueError, match=message):
        prefill_attention(**{**prefill_args(), **changes}, backend="reference")


@pytest.mark.parametrize("case", list(BAD_PREFILL_VALUES))
def test_triton_prefill_checks_values_when_asked(case):
    changes, message = BAD_PREFILL_VALUES[case]
    with check_argument_values(), pytest.raises(ValueError, match=message):
        prefill_attention(**{**prefill_args(), **changes}, backend="triton")


def test_value_checks_are_opt_in_and_restored(monkeypatch):
    """Off by default for the Triton path, on inside the block (nested blocks restore the outer
    setting), off again after it; `M2LA_CHECK_VALUES=1` sets the default (read at import)."""
    from m2la.kernels import _checks

    calls = []
    monkeypatch.setattr(_checks, "check_lengths", lambda *args: calls.append("checked"))
    args = decode_args()
    decode_attention(**args, backend="triton")
    assert calls == []
    with check_argument_values():
        with check_argument_values(False):
            decode_attention(**args, backend="triton")
        assert calls == []
        decode_attention(**args, backend="triton")
    assert calls == ["checked"]
    decode_attention(**args, backend="triton")
    assert calls == ["checked"]
    code = "import m2la.kernels.ops as o; print(o._CHECK_ARGUMENT_VALUES.get())"
    env = {**os.environ, "M2LA_CHECK_VALUES": "1"}
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "True"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["decode", "absorbed", "expanded"])
def test_prefill_strided_small_inputs_give_the_contiguous_result(mode, backend):
    """Strided q_nope / q_rope (last-dim stride 2) and index vectors: the contiguous result. Before
    the checks, expanded mode read a strided q_nope as if contiguous (a silent wrong answer)."""
    if backend == "reference" and mode != "expanded":
        pytest.skip("the reference has one mode")
    args = prefill_args(seed=2)
    want_out, want_lse = prefill_attention(**args, backend="reference")
    views = dict(
        q_nope=strided(args["q_nope"]), q_rope=strided(args["q_rope"]),
        cu_seqlens_q=strided_vector(args["cu_seqlens_q"]), cache_seqlens=strided_vector(args["cache_seqlens"]),
    )  # fmt: skip
    out, lse = prefill_attention(**{**args, **views}, mode=mode, backend=backend)
    assert_close_with_lse(out, lse, want_out, want_lse, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_of_no_sequences_returns_empty_results(backend):
    """b = 0 (`cu_seqlens_q = [0]`): empty outputs in the contract's shapes and dtypes (the
    reference used to fail concatenating no sequences)."""
    args = prefill_args()
    empty = dict(
        q_nope=args["q_nope"][:0], q_rope=args["q_rope"][:0], cu_seqlens_q=torch.zeros(1, dtype=I32),
        cache_seqlens=torch.zeros(0, dtype=I32), block_table=args["block_table"][:0],
    )  # fmt: skip
    out, lse = prefill_attention(**{**args, **empty}, backend=backend)
    assert out.shape == (0, 3, 12) and out.dtype == torch.float32
    assert lse.shape == (0, 3) and lse.dtype == torch.float32


# ---------------------------------------------------------------- cache write


def write_args(seed: int = 0) -> dict:
    """4 tokens (one skipped) of r = 16, 2p = 8 into a paged cache of 3 blocks of 4 slots."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        kv_cache=torch.zeros(3, 4, 24), latent=torch.randn(4, 16, generator=gen), k_rope=torch.randn(4, 8, generator=gen),
        cos=torch.rand(4, 4, generator=gen), sin=torch.rand(4, 4, generator=gen),
        slot_mapping=torch.tensor([5, -1, 0, 11]),
    )  # fmt: skip


BAD_WRITE = {
    "latent 1-d": (dict(latent=torch.zeros(16)), r"latent \[t, r\] and k_rope \[t, 2p\]"),
    "k_rope tokens": (dict(k_rope=torch.zeros(3, 8)), r"latent \[t, r\] and k_rope \[t, 2p\]"),
    "k_rope odd": (dict(k_rope=torch.zeros(4, 7)), "an even width"),
    "cos pairs": (dict(cos=torch.zeros(4, 3)), r"cos must be \[t=4, p=4\]"),
    "sin tokens": (dict(sin=torch.zeros(1, 4)), r"sin must be \[t=4, p=4\]"),
    "cache width": (dict(kv_cache=torch.zeros(3, 4, 25)), r"rows of r \(16\) \+ 2p \(8\) = 24"),
    "slots int32": (dict(slot_mapping=torch.tensor([5, -1, 0, 11], dtype=I32)), "slot_mapping must be a 1-d torch.int64"),
    "slots length": (dict(slot_mapping=torch.tensor([5, -1, 0])), "slot_mapping .* length 4"),
    "cache strided": (dict(kv_cache=strided), "kv_cache rows must be contiguous"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_WRITE))
def test_cache_write_refuses_bad_arguments_on_both_backends(case, backend):
    changes, message = BAD_WRITE[case]
    args = _apply(write_args(), changes)
    before = args["kv_cache"].clone()
    with pytest.raises(ValueError, match=message):
        write_latent_cache(**args, backend=backend)
    assert torch.equal(args["kv_cache"], before), "a refused write must leave the cache as it was"


@pytest.mark.parametrize("slot", [12, -2])
@pytest.mark.parametrize("backend", ["reference", "triton, checked"])
def test_cache_write_on_cpu_checks_slots(slot, backend):
    args = write_args()
    args["slot_mapping"] = torch.tensor([5, -1, slot, 0])
    checked = check_argument_values() if backend == "triton, checked" else contextlib.nullcontext()
    with checked, pytest.raises(ValueError, match=r"slot_mapping entries must be -1 \(skip\) or in \[0, 12\)"):
        write_latent_cache(**args, backend=backend.split(",")[0])
    assert (args["kv_cache"] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_write_strided_inputs_write_the_contiguous_rows(backend):
    """slot_mapping as a strided column, latent / k_rope / cos with a last-dim stride of 2. Before
    the checks, Triton read a strided slot_mapping as if contiguous and wrote to the wrong slots."""
    args = write_args(seed=1)
    want = args["kv_cache"].clone()
    write_latent_cache(**{**args, "kv_cache": want}, backend="reference")
    views = dict(
        slot_mapping=strided_vector(args["slot_mapping"]), latent=strided(args["latent"]),
        k_rope=strided(args["k_rope"]), cos=strided(args["cos"]),
    )  # fmt: skip
    write_latent_cache(**{**args, **views}, backend=backend)
    torch.testing.assert_close(args["kv_cache"], want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- hypothesis: layouts and views


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    heads=st.sampled_from([1, 3, 7]),
    paged=st.booleans(),
    extra_rows=st.integers(0, 2),
    views=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_layouts_and_views_agree_across_backends(lengths, heads, paged, extra_rows, views, seed):
    """Paged or contiguous caches (with rows past the batch), strided or contiguous small inputs:
    Triton (interpreter) and the reference agree, NaN in every unused slot."""
    r, width = 16, 24
    gen = torch.Generator().manual_seed(seed)
    if paged:
        cache, table = random_paged_cache(lengths, width, 8, torch.float32, seed=seed)
    else:
        cache = random_contiguous_cache(lengths + [40] * extra_rows, width, 40, torch.float32, seed=seed)
        table = None
    q = torch.randn(len(lengths), heads, width, generator=gen)
    seqlens = torch.tensor(lengths, dtype=I32)
    want = decode_attention(q, cache, seqlens, 0.2, r, table, backend="reference")
    if views:
        q, seqlens = strided(q), strided_vector(seqlens)
    got = decode_attention(q, cache, seqlens, 0.2, r, table, backend="triton")
    assert_close_with_lse(*got, *want, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 20)), min_size=1, max_size=3),
    heads=st.sampled_from([1, 3]),
    paged=st.booleans(),
    mode=st.sampled_from(["decode", "absorbed", "expanded"]),
    views=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prefill_layouts_and_views_agree_across_backends(chunks, heads, paged, mode, views, seed):
    """Chunks of 0-9 new tokens after 0-20 cached, paged or contiguous (one spare row), strided or
    contiguous q_nope / q_rope / index vectors, each Triton mode against the reference."""
    r, nope, rope, value = 16, 8, 8, 12
    gen = torch.Generator().manual_seed(seed)
    new = [t for t, _ in chunks]
    lengths = [t + cached for t, cached in chunks]
    if paged:
        cache, table = random_paged_cache(lengths, r + rope, 8, torch.float32, seed=seed)
    else:
        cache, table = random_contiguous_cache(lengths + [29], r + rope, 29, torch.float32, seed=seed), None
    tokens = sum(new)
    q_nope, q_rope = torch.randn(tokens, heads, nope, generator=gen), torch.randn(tokens, heads, rope, generator=gen)
    w_uk = torch.randn(heads, r, nope, generator=gen) / 4
    w_uv = torch.randn(heads, r, value, generator=gen) / 4
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=I32)
    seqlens = torch.tensor(lengths, dtype=I32)
    want = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, 0.3, table, backend="reference")
    if views:
        q_nope, q_rope, cu, seqlens = strided(q_nope), strided(q_rope), strided_vector(cu), strided_vector(seqlens)
    got = prefill_attention(q_nope, q_rope, cache, w_uk, w_uv, cu, seqlens, 0.3, table, mode=mode, backend="triton")
    assert_close_with_lse(*got, *want, atol=1e-4)
