"""Launching a Triton kernel whose default tiles may not fit the GPU's shared memory."""

from __future__ import annotations

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
