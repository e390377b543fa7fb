"""Host (Python) time per call of the Triton ops, with the kernels themselves left out.

A decode step at short context runs its kernels in tens of microseconds, so what the host spends
before the launch (checks, backend choice, the custom-op dispatcher, tile and split choice) is
much of an eager step. This measures that part on any machine: the ops run with the Triton
backend on CPU tensors under the interpreter, with every kernel launch replaced by a no-op.
Triton's own launch cost (argument binding, the driver call) is not in these numbers; on a GPU
the decode table's "eager ms" column holds everything.

    python benchmarks/host_overhead.py                   # this tree
    python benchmarks/host_overhead.py --against b85bcf9 # and a git revision's src, side by side

Rows:
- decode: `decode_attention`, InternVideo3's layout (32 heads, 896 + 128, bf16), b=8, paged 32K.
- write: `write_latent_cache` of 8 rows (one decode step of b=8).
- split choice, growing cache: `choose_num_splits` for a contiguous cache that grows one row a
  step (M2LACache's rows in `generate()`), b=1 from 32K, 132 SMs: the mean over 512 steps.
- torch ops per decode step of a converted llama (tests/tiny_hf.py, random weights, b=2 with left
  padding, Triton backend): non-view aten ops (each a device launch on a GPU) and view ops, split
  into a part per layer and a part per step by counting at 2 and 4 layers. Counted by a dispatch mode,
  which keeps every m2la op on its custom-op route (one op each) in both trees.
- torch ops of a 1-token extend: `prefill_attention` of one new token for each of 8 sequences
  through the decode route with `max_seqlen_q=1` (the decode layout and cache above), counted
  inside the op (the custom-op route skipped, as an eager call skips it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPEATS = 7  # medians of 7 timed loops
OPS_PREFIX = "decode step: "  # rows that count ops, not microseconds


def _per_call_us(fn, calls: int) -> float:
    fn()  # warm: imports, caches
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def measure() -> dict[str, float]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
    import torch
    import triton.runtime.interpreter as interpreter

    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None  # launches do nothing

    import m2la
    from m2la.kernels import decode_attention, write_latent_cache
    from m2la.kernels.latent_decode.triton import choose_num_splits

    torch.manual_seed(0)
    batch, heads, kv_rank, rope_dim, block, context = 8, 32, 896, 128, 64, 32768
    width = kv_rank + rope_dim
    cache = torch.zeros(64, block, width, dtype=torch.bfloat16)  # the table may point anywhere: nothing reads
    table = torch.randint(0, 64, (batch, context // block), dtype=torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, width, dtype=torch.bfloat16)
    rows = {"source": m2la.__file__}
    rows["decode"] = _per_call_us(
        lambda: decode_attention(q, cache, lens, 0.07, kv_rank, table, backend="triton"), 2000
    )
    latent, k_rope = (
        torch.randn(batch, kv_rank, dtype=torch.bfloat16),
        torch.randn(batch, rope_dim, dtype=torch.bfloat16),
    )
    cos, sin = torch.rand(batch, rope_dim // 2), torch.rand(batch, rope_dim // 2)
    slots = torch.arange(batch) * block
    rows["write (8 rows)"] = _per_call_us(
        lambda: write_latent_cache(cache, latent, k_rope, cos, sin, slots, backend="triton"), 2000
    )
    steps = iter(range(context, context + 10**7))
    rows["split choice, cache growing a row a step"] = _per_call_us(
        lambda: choose_num_splits(1, 1, next(steps), 64, width * 2, heads * kv_rank * 4, 132), 512 // REPEATS
    )
    rows.update(_decode_step_ops())
    rows.update(_extend_ops(batch, heads, kv_rank, rope_dim, cache, table, lens))
    return rows


def _op_counter():
    """A dispatch mode counting aten ops: non-view ones (each a device launch on a GPU) and views."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts["views" if getattr(func, "is_view", False) else "launches"] += 1
            return func(*args, **(kwargs or {}))

    return CountOps()


def _extend_ops(batch, heads, kv_rank, rope_dim, cache, table, lens) -> dict[str, float]:
    """Aten ops of one `prefill_attention` call that extends each of `batch` sequences by one token
    through the decode route, given `max_seqlen_q=1` (launches stubbed; the custom op is skipped the
    way an eager call skips it)."""
    import torch

    import m2la.kernels.ops as ops
    from m2la.kernels import prefill_attention

    nope = value = 128
    gen = torch.Generator().manual_seed(0)
    q_nope = torch.randn(batch, heads, nope, generator=gen).to(torch.bfloat16)
    q_rope = torch.randn(batch, heads, rope_dim, generator=gen).to(torch.bfloat16)
    w_uk = torch.randn(heads, kv_rank, nope, generator=gen).to(torch.bfloat16)
    w_uv = torch.randn(heads, kv_rank, value, generator=gen).to(torch.bfloat16)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    tracing_active = ops._tracing_active
    ops._tracing_active = lambda: False  # the counting mode would otherwise route through the custom op
    try:
        with _op_counter() as counter:
            prefill_attention(
                q_nope, q_rope, cache, w_uk, w_uv, cu, lens, 0.07, table, mode="decode", max_seqlen_q=1,
                max_seqlen_k=int(lens.max()), backend="triton",
            )  # fmt: skip
    finally:
        ops._tracing_active = tracing_active
    return {f"{OPS_PREFIX}1-token extend of {batch} sequences (decode route): {label}": counter.counts[kind]
            for kind, label in (("launches", "non-view aten ops"), ("views", "view ops"))}  # fmt: skip


def _decode_step_ops() -> dict[str, float]:
    """Aten ops one decode step of a converted llama issues, per layer and per step (launches stubbed)."""
    import pathlib
    from collections import Counter

    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import tiny_hf  # noqa: I001 (from tests/, after the path insert)

    import m2la
    from m2la.backends import use_backend

    def count(layers: int) -> Counter:
        model = tiny_hf.build("llama", 3, 1, 16, layers=layers)
        m2la.convert(model)
        ids = torch.randint(10, tiny_hf.VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        with torch.no_grad(), use_backend("triton"):
            cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
            with _op_counter() as counter:
                model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
        return counter.counts

    two, four = count(2), count(4)
    rows = {}
    for kind, label in (("launches", "non-view aten ops"), ("views", "view ops")):
        per_layer = (four[kind] - two[kind]) / 2
        rows[f"{OPS_PREFIX}{label} a layer"] = per_layer
        rows[f"{OPS_PREFIX}{label} a step, besides the layers"] = two[kind] - 2 * per_layer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a git revision whose src/ to time as well, in a subprocess")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the subprocess's output
    args = parser.parse_args()
    if args.json:
        import json

        print(json.dumps(measure()))
        return
    columns = {"this tree": _run_in_subprocess(None)}
    if args.against:
        columns[args.against] = _run_in_subprocess(args.against)
    names = list(columns)
    for name in names:
        print(f"<!-- {name}: m2la from {columns[name].pop('source')} -->")
    timed = [row for row in columns["this tree"] if not row.startswith(OPS_PREFIX)]
    counted = [row for row in columns["this tree"] if row.startswith(OPS_PREFIX)]
    print(
        f"Host us per call (median of {REPEATS} loops; kernel launches replaced by no-ops; Python {sys.version.split()[0]})"
    )
    _table(columns, names, timed, "call", ",.1f", args.against)
    print("\nTorch ops per decode step of a converted llama (b=2, left padding; Triton backend)")
    _table(columns, names, counted, "ops", ".0f", args.against)


def _table(columns, names, rows, first, spec, ratio) -> None:
    print(f"\n| {first} | " + " | ".join(names) + (" | ratio |" if ratio else " |"))
    print("|---" * (len(names) + 1 + bool(ratio)) + "|")
    for row in rows:
        values = [columns[name][row] for name in names]
        tail = f" {values[1] / values[0]:.1f}x |" if ratio and values[0] else (" |" if ratio else "")
        print(f"| {row.removeprefix(OPS_PREFIX)} | " + " | ".join(format(v, spec) for v in values) + " |" + tail)


def _run_in_subprocess(revision: str | None) -> dict[str, float]:
    """Time in a fresh interpreter (its own imports and caches), on this tree or `revision`'s src."""
    import json

    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if revision is not None:
            root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
            archive = subprocess.run(
                ["git", "-C", root.stdout.strip(), "archive", revision, "src"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            env["PYTHONPATH"] = os.path.join(tmp, "src") + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
