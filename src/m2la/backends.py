"""Backend selection for the fused kernels in `m2la.kernels`.

Every public op takes `backend="reference" | "triton" | "auto" | None`; `None` means "whatever
`use_backend` set for this thread/task" (default `"auto"`).

- `reference`: pure torch, any device.
- `triton`: the fused Triton kernel. Needs triton importable and CUDA tensors, or CPU tensors with
  `TRITON_INTERPRET=1` (the interpreter, used by the tests). Raises `BackendUnavailableError`
  otherwise: a backend asked for by name never silently falls back.
- `auto`: Triton when every tensor is on CUDA and triton imports, otherwise reference.

Importing this module imports neither triton nor queries CUDA: the decision looks only at the
devices of the tensors handed to a call.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("reference", "triton", "auto")

_selected_backend: contextvars.ContextVar[str] = contextvars.ContextVar("m2la_backend", default="auto")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on these tensors / this install."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown m2la backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend selected for the current thread / asyncio task (default "auto")."""
    return _selected_backend.get()


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Select a backend for the ops called inside the block; nests and restores on exit."""
    token = _selected_backend.set(_check_name(name))
    try:
        yield name
    finally:
        _selected_backend.reset(token)


@functools.cache
def _triton_import_error() -> str:
    """"" when triton imports, else the reason. Called only when triton may be used."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return ""


def _triton_unavailable() -> str:
    if torch.compiler.is_compiling():  # dynamo cannot trace the import machinery; inductor needs triton anyway
        return ""
    return _triton_import_error()


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Turn a requested backend into the one to run: "reference" or "triton"."""
    name = _check_name(get_backend() if backend is None else backend)
    present = [t for t in tensors if t is not None]
    all_cuda = len(present) > 0 and all(t.is_cuda for t in present)  # len(): dynamo cannot trace bool(list)
    if name == "reference":
        return "reference"
    if name == "auto":
        # Look at devices first so CPU calls never import triton.
        return "triton" if all_cuda and not _triton_unavailable() else "reference"
    error = _triton_unavailable()
    if error:
        raise BackendUnavailableError(f"backend='triton' requested but triton cannot be imported ({error})")
    if not all_cuda and not triton_interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise BackendUnavailableError(
            f"backend='triton' needs CUDA tensors (got {devices}); set TRITON_INTERPRET=1 before "
            "importing triton to run the kernels on CPU, or use backend='reference'"
        )
    return "triton"
