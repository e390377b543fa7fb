"""Launching a Triton kernel whose default tiles may not fit the GPU's shared memory."""

from __future__ import annotations

import contextvars
from collections.abc import Callable


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
