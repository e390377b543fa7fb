"""Launching a Triton kernel whose default tiles may not fit the GPU's shared memory."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable

# Triton's fp8 e4m3 type (`tl.float8e4nv`) compiles for compute capability 8.9 and up (Ada, Hopper)
# only; e5m2 from 8.0 (Ampere). Checked by compile on CPU (tests/kernels/compile_sm90.py, triton 3.9).
E4M3_MIN_CAPABILITY = (8, 9)


def fp8_cache_problem(cache_dtype, capability: tuple[int, int]) -> str | None:
    """Why the Triton kernels cannot read a `cache_dtype` cache on a GPU of `capability`, naming
    the remedies; None when they can (every non-fp8 dtype, e5m2, e4m3 from 8.9)."""
    import torch

    if cache_dtype != torch.float8_e4m3fn or tuple(capability) >= E4M3_MIN_CAPABILITY:
        return None
    return (
        f"the Triton kernels read fp8 e4m3 caches on GPUs of compute capability "
        f"{E4M3_MIN_CAPABILITY[0]}.{E4M3_MIN_CAPABILITY[1]} or newer (Ada, Hopper); this GPU is "
        f"{capability[0]}.{capability[1]}. Use an e5m2 cache (torch.float8_e5m2), which they read from 8.0, "
        f"or backend='reference'"
    )


@functools.lru_cache(maxsize=16)
def _cuda_capability(device) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(device)


def _device_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None elsewhere (the interpreter reads any fp8 type)."""
    return _cuda_capability(device) if device.type == "cuda" else None


def check_fp8_cache_readable(kv_cache) -> None:
    """Raise ValueError (`fp8_cache_problem`) when this Triton launch cannot read `kv_cache`'s fp8
    type on its GPU, before triton fails to compile with an error that names neither."""
    if kv_cache.element_size() != 1:
        return
    capability = _device_capability(kv_cache.device)
    problem = None if capability is None else fp8_cache_problem(kv_cache.dtype, capability)
    if problem:
        raise ValueError(problem)


def launch_shrinking(
    launch: Callable[[dict], None], tiles: dict, smaller: Callable[[dict], dict | None], fitted: dict, key,
    may_shrink: bool,
) -> None:  # fmt: skip
    """`launch(tiles)`. When it raises triton's OutOfResources and `may_shrink`, retry with the
    entries `smaller(tiles)` gives (None: nothing smaller) and remember the last ones tried in
    `fitted[key]`, where later launches of that shape start. Tiles a caller set explicitly
    (`may_shrink=False`) are never changed."""
    from triton.runtime.errors import OutOfResources

    if may_shrink and key in fitted:
        tiles = {**tiles, **fitted[key]}
    while True:
        try:
            launch(tiles)
            return
        except OutOfResources:
            next_tiles = smaller(tiles) if may_shrink else None
            if next_tiles is None:
                raise
            fitted[key] = next_tiles
            tiles = {**tiles, **next_tiles}


def with_scratch_allocator(device, launch: Callable, *args) -> None:
    """Run `launch(*args)` with triton's global-scratch allocator (device-side tensor descriptors
    live there) set to torch's, inside a copied context: the caller's own setting is untouched."""
    import torch
    import triton

    def allocate(size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)

    def run() -> None:
        triton.set_allocator(allocate)
        launch(*args)

    contextvars.copy_context().run(run)


def tma_misalignment(name: str, tensor) -> str | None:
    """Why TMA cannot address `tensor` (a base not 16-byte aligned, a stride other than the last not
    a multiple of 16 bytes, or a last stride other than 1), naming it; None when it can."""
    itemsize = tensor.element_size()
    strides = tuple(stride * itemsize for stride in tensor.stride()[:-1])
    if tensor.stride(-1) != 1 or tensor.data_ptr() % 16 or any(stride % 16 for stride in strides):
        return (
            f"TMA needs {name} 16-byte aligned with 16-byte multiple strides and a unit last stride; got "
            f"address % 16 = {tensor.data_ptr() % 16}, strides of {strides} bytes, last stride {tensor.stride(-1)}"
        )
    return None
