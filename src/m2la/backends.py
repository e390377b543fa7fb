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

Under `torch.compile` the selection is process-wide: dynamo cannot read a ContextVar (a graph break
in every layer), so traced code reads `use_backend`'s innermost active selection from a module
global, which dynamo guards on (a compiled model recompiles when it changes). Selections that
disagree across threads or asyncio tasks at the same time make traced code raise
`BackendUnavailableError` rather than run one thread's backend for another. A thread with no
`use_backend` block gets, in compiled code, the selection another thread holds ("auto" when none).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import itertools
import os
import threading
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


# What traced code reads instead of the ContextVar: the innermost active `use_backend` selection,
# "auto" when none is active, _CONFLICTING when active selections of several threads/tasks differ.
_CONFLICTING = "<conflicting use_backend selections>"
_traced_selection = "auto"
_active_selections: dict[int, tuple[tuple, str]] = {}  # entry number -> (owner, name), in entry order
_selections_lock = threading.Lock()
_entry_numbers = itertools.count()


def _selection_owner() -> tuple:
    """The thread and asyncio task (if any) a `use_backend` block runs in."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop in this thread
        task = None
    return threading.get_ident(), id(task) if task is not None else None


def _refresh_traced_selection() -> None:
    global _traced_selection
    active = list(_active_selections.values())
    if not active:
        _traced_selection = "auto"
    elif len({owner for owner, _ in active}) > 1 and len({name for _, name in active}) > 1:
        _traced_selection = _CONFLICTING
    else:  # one owner (properly nested blocks: the last entered is the innermost) or one name
        _traced_selection = active[-1][1]


def get_backend() -> str:
    """The backend selected for the current thread / asyncio task (default "auto"); inside
    torch.compile, the process-wide selection (see the module docstring)."""
    if torch.compiler.is_compiling():
        if _traced_selection == _CONFLICTING:
            raise BackendUnavailableError(
                "use_backend selections of several threads or tasks differ while a torch.compile'd m2la model "
                "runs; compiled code has one process-wide backend: select the same one everywhere, or pass "
                "backend= to the ops"
            )
        return _traced_selection
    return _selected_backend.get()


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Select a backend for the ops called inside the block; nests and restores on exit."""
    token = _selected_backend.set(_check_name(name))
    with _selections_lock:
        entry = next(_entry_numbers)
        _active_selections[entry] = (_selection_owner(), name)
        _refresh_traced_selection()
    try:
        yield name
    finally:
        with _selections_lock:
            del _active_selections[entry]
            _refresh_traced_selection()
        _selected_backend.reset(token)


@functools.cache
def _triton_import_error() -> str:
    """ "" when triton imports, else the reason. Called only when triton may be used."""
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
