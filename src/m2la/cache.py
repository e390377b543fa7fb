"""A pure-torch latent KV cache: per layer, rows ``[latent r | rotated k_rope 2p]`` and nothing else."""

from __future__ import annotations

import torch

from .quantization import check_cache_dtype, dequantize_rows, quantize_rows

__all__ = [
    "LatentCache",
    "StaticLatentCache",
    "advance_length",
    "append_rows",
    "copy_rows_at",
    "reserve_rows",
    "views_prefix_of",
]

# Growth of a full buffer: room for max(GROWTH_MIN_TOKENS, length / GROWTH_FRACTION) more tokens, so
# memory over the live rows stays <= 1/16 (or 256 tokens) and decode copies amortize to <= 16 rows a step.
GROWTH_MIN_TOKENS = 256
GROWTH_FRACTION = 16


def views_prefix_of(held: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
    """Whether ``held [b, s, w]`` is the first ``s`` rows of ``buffer [b, capacity, w]`` (same memory)."""
    return (
        held is not None
        and buffer is not None
        and held.dim() == 3
        and held.data_ptr() == buffer.data_ptr()
        and held.stride()[:2] == buffer.stride()[:2]
        and (held.shape[0], held.shape[2]) == (buffer.shape[0], buffer.shape[2])
        and held.shape[1] <= buffer.shape[1]
        and held.dtype == buffer.dtype
    )


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records ops on these tensors (then cache rows must not be written in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def reserve_rows(
    buffer: torch.Tensor | None, held: torch.Tensor | None, new_shape: tuple[int, int, int], dtype: torch.dtype,
    device: torch.device, prefix_view: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Room for ``t`` rows after ``held [b, s, w]`` (``new_shape = (b, t, w)``) -> (``buffer [b, capacity, w]``,
    rows ``[b, s + t, w]``) whose last ``t`` rows are unwritten: the caller fills them (a fused cache-write kernel).

    When ``held`` is a prefix view of ``buffer`` (as returned here, or cropped) with room left, nothing
    moves. Anything else (a full buffer, a reordered or offloaded copy) moves into a new buffer:
    exactly ``s + t`` long for a first write, with growth room (GROWTH_*) when it replaces a full one.
    The rows always live in memory this function allocated, never in the caller's tensors.

    ``prefix_view``: whether the caller knows ``held`` to be such a view (it tracks the rows it was
    handed); None compares data pointers (:func:`views_prefix_of`), which torch.compile cannot trace.
    """
    b, t, width = new_shape
    s = held.shape[1] if held is not None and held.dim() == 3 else 0
    if prefix_view is None:
        prefix_view = views_prefix_of(held, buffer)
    if s and prefix_view and s + t <= buffer.shape[1]:
        return buffer, buffer[:, : s + t]
    room = max(GROWTH_MIN_TOKENS, (s + t) // GROWTH_FRACTION) if s else 0
    grown = torch.empty((b, s + t + room, width), dtype=dtype, device=device)
    if s:
        grown[:, :s] = held
    return grown, grown[:, : s + t]


def append_rows(
    buffer: torch.Tensor | None, held: torch.Tensor | None, new: torch.Tensor, prefix_view: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``new [b, t, w]`` after ``held [b, s, w]`` -> (``buffer [b, capacity, w]``, rows ``[b, s + t, w]``).

    :func:`reserve_rows` (``prefix_view`` as there), then ``new`` written into the reserved rows: a
    decode step costs O(t) instead of torch.cat's O(s). While autograd records, rows are
    concatenated instead: in-place writes would invalidate tensors saved for backward.
    """
    s = held.shape[1] if held is not None and held.dim() == 3 else 0
    if s and records_grad(new, held):
        rows = torch.cat((held, new), dim=1)
        return rows, rows
    buffer, rows = reserve_rows(buffer, held, tuple(new.shape), new.dtype, new.device, prefix_view)
    rows[:, s:] = new
    return buffer, rows


def check_rows_shape(held: torch.Tensor | None, layer_idx: int, batch: int, width: int) -> None:
    """Rows for a layer that holds ``held [b, s, w]`` must match its batch and width."""
    if held is not None and held.dim() == 3 and (held.shape[0] != batch or held.shape[2] != width):
        raise ValueError(
            f"layer {layer_idx} caches [b={held.shape[0]}, width={held.shape[2]}] rows, got [b={batch}, width={width}]"
        )


def tensor_nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class LatentCache:
    """Growable per-layer store of ``[b, s, r + 2p]`` rows (for use without transformers).

    ``dtype=torch.float8_e4m3fn`` (or ``float8_e5m2``) stores each row in fp8 with one fp32 scale per
    token (:mod:`m2la.quantization`); attention then reads the dequantized rows, so the quality cost
    of the fp8 cache is part of every result.

    ``rows`` and ``scales`` are views of buffers with growth room. Code traced by torch.compile reads
    the buffers and the lengths the cache stored, not those lists: assigning ``rows[i]`` by hand
    between compiled calls is seen by eager calls (which then copy the rows into a new buffer) but
    not by compiled ones.
    """

    def __init__(self, num_layers: int, dtype: torch.dtype | None = None) -> None:
        self.dtype = check_cache_dtype(dtype)
        self.rows: list[torch.Tensor | None] = [None] * num_layers  # [b, s, r + 2p] views of the buffers
        self.scales: list[torch.Tensor | None] = [None] * num_layers  # [b, s] fp32, fp8 caches only
        self._row_buffers: list[torch.Tensor | None] = [None] * num_layers  # [b, capacity, r + 2p]
        self._scale_buffers: list[torch.Tensor | None] = [None] * num_layers  # [b, capacity, 1]
        # the (rows, scales) objects last stored per layer: still there = still prefix views of the
        # buffers (an identity test, which torch.compile traces; data pointers it cannot)
        self._stored: list[tuple | None] = [None] * num_layers
        self._lengths: list[int] = [0] * num_layers  # rows of the buffers those views hold

    def _held(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """Layer ``i``'s rows ``[b, s, w]`` and, for fp8, scales ``[b, s, 1]`` as an append reads them,
        and whether they are the first ``s`` rows of the buffers. Traced code (torch.compile) slices
        the buffers: AOT autograd rejects inputs that view other inputs with dynamic sizes."""
        stored = self._stored[i]
        if stored is not None and torch.compiler.is_compiling():  # see the class docstring
            n, scale_buffer = self._lengths[i], self._scale_buffers[i]
            return self._row_buffers[i][:, :n], None if scale_buffer is None else scale_buffer[:, :n], True
        held_scales = None if self.scales[i] is None else self.scales[i][..., None]  # [b, s, 1]
        stored = stored is not None and stored[0] is self.rows[i] and stored[1] is self.scales[i]
        return self.rows[i], held_scales, stored

    def _store(self, i: int, rows: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Rows ``[b, s, w]`` (and scales ``[b, s, 1]``) that are the first ``s`` rows of the buffers."""
        self.rows[i] = rows
        self.scales[i] = None if scales is None else scales[..., 0]
        self._stored[i] = (self.rows[i], self.scales[i])
        self._lengths[i] = rows.shape[1]

    def append_latent(self, layer_idx: int, rows: torch.Tensor, dequantize: bool = True) -> torch.Tensor | None:
        """Append ``rows [b, t, r + 2p]``; return the layer's rows so far ``[b, s, r + 2p]`` in ``rows.dtype``.

        ``dequantize=False``: an fp8 cache returns None instead (for callers that read ``quantized_rows``).
        """
        i = layer_idx
        held, held_scales, stored = self._held(i)
        check_rows_shape(held, i, rows.shape[0], rows.shape[2])
        if self.dtype is None:
            self._row_buffers[i], new_rows = append_rows(self._row_buffers[i], held, rows, stored)
            self._store(i, new_rows, None)
            return new_rows
        quantized, scale = quantize_rows(rows, self.dtype)
        self._row_buffers[i], new_rows = append_rows(self._row_buffers[i], held, quantized, stored)
        self._scale_buffers[i], scales = append_rows(self._scale_buffers[i], held_scales, scale[..., None], stored)
        self._store(i, new_rows, scales)
        if not dequantize:
            return None
        return dequantize_rows(new_rows, self.scales[i], rows.dtype)

    def reserve_latent(
        self, layer_idx: int, batch: int, num_tokens: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Make room for ``num_tokens`` rows of ``width`` (rows of ``dtype``, or of the fp8 cache dtype);
        return the layer's rows ``[b, s, width]`` and, for fp8, scales ``[b, s]``, whose last
        ``num_tokens`` entries the caller writes (``m2la.kernels.write_latent_cache``), in place."""
        i = layer_idx
        held, held_scales, stored = self._held(i)
        check_rows_shape(held, i, batch, width)
        shape = (batch, num_tokens, width)
        self._row_buffers[i], new_rows = reserve_rows(
            self._row_buffers[i], held, shape, self.dtype or dtype, device, stored
        )
        if self.dtype is None:
            self._store(i, new_rows, None)
            return new_rows, None
        self._scale_buffers[i], scales = reserve_rows(
            self._scale_buffers[i], held_scales, (batch, num_tokens, 1), torch.float32, device, stored
        )
        self._store(i, new_rows, scales)
        return new_rows, self.scales[i]

    def quantized_rows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp8 caches: the stored ``rows [b, s, r + 2p]`` and ``scales [b, s]`` (what the kernels read); else None."""
        if self.dtype is None or self.rows[layer_idx] is None:
            return None
        return self.rows[layer_idx], self.scales[layer_idx]

    def seq_length(self, layer_idx: int = 0) -> int:
        held = self.rows[layer_idx]
        return 0 if held is None else held.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held right now (and, for fp8, their scales): the format's cost."""
        return sum(map(tensor_nbytes, (*self.rows, *self.scales)))

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated, growth room included (at most 1/16 or 256 tokens a layer over `nbytes`)."""
        return sum(map(tensor_nbytes, (*self._row_buffers, *self._scale_buffers)))


# --- fixed capacity (torch.compile / CUDA graphs) ------------------------------------------------


def advance_length(length: torch.Tensor, num_tokens: int, capacity: int) -> torch.Tensor:
    """Count ``num_tokens`` more rows in ``length`` (0-d int64, in place, so its address stays fixed);
    return their positions ``[t]``. Eager calls read the length on the host and raise when the rows
    would pass ``capacity``; traced calls (torch.compile) assert on the device instead."""
    if torch.compiler.is_compiling():
        torch._assert_async(length + num_tokens <= capacity, "static latent cache is full")
    else:
        held = int(length)
        if held + num_tokens > capacity:
            raise ValueError(
                f"static latent cache holds {held} of {capacity} tokens and cannot take {num_tokens} more; "
                "allocate it with a larger max_cache_len"
            )
    positions = length + torch.arange(num_tokens, device=length.device)
    length.add_(num_tokens)
    return positions


def copy_rows_at(buffer: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
    """``buffer[:, positions] = rows`` for ``buffer [b, capacity, w]``, ``rows [b, t, w]``, in place.
    fp8 rows are copied as bytes: CPU torch has no fp8 index_copy_."""
    rows = rows.to(buffer.dtype)
    if buffer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        buffer, rows = buffer.view(torch.uint8), rows.view(torch.uint8)
    buffer.index_copy_(1, positions, rows)


def zeroed_static_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed buffer marked as a fixed address for torch.compile (CUDA graphs then read it in place)."""
    buffer = torch.zeros(shape, dtype=dtype, device=device)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(buffer)
    return buffer


class StaticLatentCache:
    """Fixed-capacity per-layer store of ``[b, max_cache_len, r + 2p]`` rows (for use without transformers;
    the transformers one is ``m2la.M2LAStaticCache``).

    Buffers are zeroed and allocated on a layer's first write (or by :meth:`allocate`), and each
    layer counts its rows in a 0-d device tensor, so shapes and addresses never change: a compiled
    decode step is one graph, replayable as a CUDA graph. Implements the static part of
    ``m2la.module.LatentCacheProtocol`` (``static_length``). fp8 ``dtype`` as in :class:`LatentCache`.
    """

    def __init__(self, num_layers: int, max_cache_len: int, dtype: torch.dtype | None = None) -> None:
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be positive, got {max_cache_len}")
        self.dtype = check_cache_dtype(dtype)
        self.max_cache_len = max_cache_len
        self.rows: list[torch.Tensor | None] = [None] * num_layers  # [b, capacity, w]
        self.scales: list[torch.Tensor | None] = [None] * num_layers  # [b, capacity, 1] fp32, fp8 only
        self.lengths: list[torch.Tensor | None] = [None] * num_layers  # [] int64: rows held

    def allocate(self, layer_idx: int, batch: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate layer ``layer_idx`` for ``batch`` sequences of rows ``width`` wide (in ``dtype``, or the fp8 dtype)."""
        i, capacity = layer_idx, self.max_cache_len
        self.rows[i] = zeroed_static_buffer((batch, capacity, width), self.dtype or dtype, device)
        if self.dtype is not None:
            self.scales[i] = zeroed_static_buffer((batch, capacity, 1), torch.float32, device)
        self.lengths[i] = zeroed_static_buffer((), torch.int64, device)

    def _ready(self, i: int, batch: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.rows[i] is None:
            self.allocate(i, batch, width, dtype, device)
        check_rows_shape(self.rows[i], i, batch, width)

    def append_latent(self, layer_idx: int, rows: torch.Tensor, dequantize: bool = True) -> torch.Tensor | None:
        """Write ``rows [b, t, r + 2p]`` after those held; return every row ``[b, capacity, r + 2p]`` in
        ``rows.dtype`` (zero past the rows held). ``dequantize=False``: an fp8 cache returns None."""
        i = layer_idx
        self._ready(i, rows.shape[0], rows.shape[2], rows.dtype, rows.device)
        positions = advance_length(self.lengths[i], rows.shape[1], self.max_cache_len)
        if self.dtype is None:
            copy_rows_at(self.rows[i], positions, rows)
            return self.rows[i]
        quantized, scale = quantize_rows(rows, self.dtype)
        copy_rows_at(self.rows[i], positions, quantized)
        copy_rows_at(self.scales[i], positions, scale[..., None])
        return dequantize_rows(self.rows[i], self.scales[i][..., 0], rows.dtype) if dequantize else None

    def reserve_latent(
        self, layer_idx: int, batch: int, num_tokens: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Count ``num_tokens`` more rows; return every row ``[b, capacity, width]`` (and fp8 scales
        ``[b, capacity]``): the caller writes the ``num_tokens`` ending at ``static_length``, in place."""
        i = layer_idx
        self._ready(i, batch, width, dtype, device)
        advance_length(self.lengths[i], num_tokens, self.max_cache_len)
        return self.rows[i], None if self.scales[i] is None else self.scales[i][..., 0]

    def quantized_rows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp8 caches: every stored row ``[b, capacity, r + 2p]`` and scale ``[b, capacity]``; else None."""
        if self.dtype is None or self.rows[layer_idx] is None:
            return None
        return self.rows[layer_idx], self.scales[layer_idx][..., 0]

    def static_length(self, layer_idx: int) -> torch.Tensor:
        """Rows layer ``layer_idx`` holds: a 0-d int64 tensor, updated in place."""
        return self.lengths[layer_idx]

    def seq_length(self, layer_idx: int = 0) -> int:
        """Rows layer ``layer_idx`` holds (a host read)."""
        length = self.lengths[layer_idx]
        return 0 if length is None else int(length)

    def reset(self) -> None:
        """Forget every row, keeping the buffers (and their addresses)."""
        for tensors in (self.rows, self.scales, self.lengths):
            for tensor in tensors:
                if tensor is not None:
                    tensor.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (and, for fp8, their scales): the format's cost (reads lengths on the host)."""
        total = 0
        for i, rows in enumerate(self.rows):
            if rows is not None:
                per_token = rows[:, 0].nbytes + (0 if self.scales[i] is None else self.scales[i][:, 0].nbytes)
                total += self.seq_length(i) * per_token
        return total

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated: the whole capacity."""
        return sum(map(tensor_nbytes, (*self.rows, *self.scales)))
