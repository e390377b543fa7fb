"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at conftest
import time (conftests load before test modules). `auto` still picks the reference on CPU; only
an explicit `backend="triton"` reaches the interpreter.

`benchmarks/gpu_check.sh` sets M2LA_TRITON_NATIVE=1 to run the `gpu` tests with the real compiler
(under the interpreter bf16 `tl.dot` is wrong, so those tests skip when it is on).
"""

import os

import pytest

if os.environ.get("M2LA_TRITON_NATIVE") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Import triton now, while the setting holds: triton reads it when its own @jit functions are
# defined, and a test that sets TRITON_INTERPRET=0 for a moment (to check the error a CPU call
# without the interpreter gets) must not be the first to import it.
try:
    import triton  # noqa: F401
except ImportError:  # the kernel tests skip without triton
    pass


@pytest.fixture
def poisoned_partials(monkeypatch):
    """The split kernel's partial buffers, filled with NaN before each launch and kept for the test."""
    from m2la.kernels.latent_decode import triton as decode

    kept = []
    real = decode._split_partials

    def poisoned(*args):
        part_out, part_lse = real(*args)
        part_out.fill_(float("nan"))
        part_lse.fill_(float("nan"))
        kept.append((part_out, part_lse))
        return part_out, part_lse

    monkeypatch.setattr(decode, "_split_partials", poisoned)
    return kept
