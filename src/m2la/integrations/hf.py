"""Hugging Face transformers integration: convert, cache, save and load.

One generic path for every supported family. A family only differs in how its RoPE frequencies map
to M-RoPE axes (:data:`FAMILIES`); everything else is read off the standard attention module
(``q_proj/k_proj/v_proj/o_proj``, optional ``q_norm/k_norm``). Nothing is patched on any class:
attention modules are replaced on the converted instance, and a forward pre-hook on that instance
hands the model an :class:`M2LACache` whenever it would otherwise build a decompressed K/V cache.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

from .. import rope
from ..cache import (
    advance_length,
    append_rows,
    check_rows_shape,
    copy_rows_at,
    reserve_rows,
    tensor_nbytes,
    views_prefix_of,
    zeroed_static_buffer,
)
from ..config import M2LAConfig, M2LAConfigError
from ..conversion import ConversionError, SourceAttention, lossless_config, lossless_state_dict, source_cache_width
from ..module import M2LAttention
from ..quantization import check_cache_dtype, dequantize_rows, quantize_rows

__all__ = [
    "FAMILIES",
    "ConversionReport",
    "LayerReport",
    "M2LACache",
    "M2LACheckpointError",
    "M2LAStaticCache",
    "HFM2LAttention",
    "UnsupportedModelError",
    "convert",
    "from_pretrained",
    "save_pretrained",
    "wiki_calibration",
]

M2LA_CONFIG_KEY = "m2la"
FORMAT_VERSION = 1
REPORT_FILE = "m2la_report.json"

# model_type -> how RoPE frequencies map to position axes (None: 1-D RoPE)
FAMILIES: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "qwen2_vl": "sectioned",
    "qwen2_5_vl": "sectioned",
    "qwen3_vl": "interleaved",
}

# vision-language families: config attributes naming the placeholder ids that vision features replace
VISION_TOKEN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("image_token_id", "video_token_id"),
    "qwen2_5_vl": ("image_token_id", "video_token_id"),
    "qwen3_vl": ("image_token_id", "video_token_id"),
}


class UnsupportedModelError(ValueError):
    """The model cannot be converted by m2la."""


class M2LACheckpointError(ValueError):
    """An m2la checkpoint is missing, corrupt or does not match its config."""


# --- cache ----------------------------------------------------------------------------------------


def _buffered_rows(name: str) -> property:
    """``keys`` / ``values`` of a LatentCacheLayer. Rows kept in a buffer with growth room are held as
    ``_<name>_buffer [b, capacity, w]`` plus their length ``_<name>_length`` (and, for eager reads, the
    view ``_<name>``); assigning anything that is not a prefix view of that buffer keeps it as is in
    ``_<name>`` and releases the buffer.

    Traced code (torch.compile) reads the rows as a slice of the buffer made inside the graph: AOT
    autograd cannot take inputs that view other inputs with dynamic sizes (a shape-guard error)."""
    rows_attr, buffer_attr, length_attr = f"_{name}", f"_{name}_buffer", f"_{name}_length"

    def get(self) -> torch.Tensor | None:
        buffer = getattr(self, buffer_attr)
        if buffer is not None and torch.compiler.is_compiling():
            return buffer[:, : getattr(self, length_attr)]
        return getattr(self, rows_attr)

    def put(self, rows: torch.Tensor | None) -> None:
        setattr(self, rows_attr, rows)
        if views_prefix_of(rows, getattr(self, buffer_attr)):
            setattr(self, length_attr, rows.shape[1])  # e.g. a crop: the buffer stays
        else:
            setattr(self, buffer_attr, None)

    return property(get, put)


class LatentCacheLayer(DynamicLayer):
    """One layer's latent rows ``[b, s, r + 2p]`` kept in ``keys``; ``values`` is an empty ``[b, s, 0]``
    (fp8 caches: the per-token scales ``[b, s, 1]``).

    Keeping the rows in ``keys`` lets DynamicLayer's crop, beam reorder and batch selection apply as is.
    ``keys`` and ``values`` are prefix views of buffers with growth room (:func:`m2la.cache.append_rows`),
    so a decode step writes one row in place instead of copying the whole layer as torch.cat does.
    Assigning them anything that is not such a view (beam reorder, batch selection, offload, reset)
    releases the buffer at once, so no stale buffer outlives the rows it held.
    """

    _keys = _values = _keys_buffer = _values_buffer = None
    _keys_length = _values_length = 0
    keys = _buffered_rows("keys")
    values = _buffered_rows("values")
    # Invariant: a buffer that is not None holds the rows as its first `_<name>_length` rows (the
    # setters above release it otherwise), so appends pass `prefix_view` rather than compare data
    # pointers: torch.compile traces a forward of a converted model without graph breaks.

    def _store(self, name: str, buffer: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows ``[b, s, w]`` that are the first ``s`` rows of ``buffer`` (append_rows / reserve_rows)."""
        setattr(self, f"_{name}_buffer", buffer)
        setattr(self, f"_{name}_length", rows.shape[1])
        setattr(self, f"_{name}", rows)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._store("keys", *append_rows(self._keys_buffer, self.keys, key_states, self._keys_buffer is not None))
        self._store(
            "values", *append_rows(self._values_buffer, self.values, value_states, self._values_buffer is not None)
        )
        return self.keys, self.values

    def reserve(
        self, key_shape: tuple[int, int, int], key_dtype: torch.dtype, value_width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Room for ``t`` more rows (``key_shape = (b, t, w)``; values ``value_width`` wide, fp32 when
        non-empty): returns ``keys, values`` whose last ``t`` rows the caller writes in place."""
        b, t, _ = key_shape
        value_dtype = torch.float32 if value_width else key_dtype
        if not self.is_initialized:
            self.lazy_initialization(
                torch.empty(0, dtype=key_dtype, device=device), torch.empty(0, dtype=value_dtype, device=device)
            )
        self._store(
            "keys",
            *reserve_rows(self._keys_buffer, self.keys, key_shape, key_dtype, device, self._keys_buffer is not None),
        )
        values_shape = (b, t, value_width)
        self._store(
            "values",
            *reserve_rows(
                self._values_buffer, self.values, values_shape, value_dtype, device, self._values_buffer is not None
            ),
        )
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (the format's cost)."""
        if not self.is_initialized or self.keys is None:
            return 0
        return tensor_nbytes(self.keys) + tensor_nbytes(self.values)

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated, growth room included."""
        if not self.is_initialized or self.keys is None:
            return 0
        key_bytes = tensor_nbytes(self._keys_buffer if self._keys_buffer is not None else self.keys)
        return key_bytes + tensor_nbytes(self._values_buffer if self._values_buffer is not None else self.values)


class StaticLatentLayer(StaticLayer):
    """One layer's latent rows in fixed buffers: ``keys [b, capacity, r + 2p]`` and ``values
    [b, capacity, 0]`` (fp8 caches: the per-token scales ``[b, capacity, 1]``), zero where unfilled,
    and ``cumulative_length``, a 0-d tensor counting the rows held, updated in place.

    Every shape and address stays fixed from step to step, so a compiled decode step is one graph
    that CUDA graphs can replay (``torch.compile(mode="reduce-overhead")``); the kernels read the
    length from the tensor. transformers' mask covers the whole capacity (``get_mask_sizes``).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate from the first rows ``[b, t, w]`` and values ``[b, t, 0 | 1]``."""
        if key_states.dim() != 3 or value_states.dim() != 3:
            raise ValueError(
                f"latent cache layers take rows [b, t, width], got {tuple(key_states.shape)}; "
                "allocate an M2LAStaticCache with M2LAStaticCache.for_model(model, max_cache_len, batch_size)"
            )
        self.allocate(
            key_states.shape[0], key_states.shape[2], key_states.dtype, value_states.shape[2], value_states.dtype,
            key_states.device,
        )  # fmt: skip

    def allocate(
        self, batch: int, width: int, dtype: torch.dtype, value_width: int, value_dtype: torch.dtype,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.device = device
        self.keys = zeroed_static_buffer((batch, self.max_cache_len, width), dtype, device)
        self.values = zeroed_static_buffer((batch, self.max_cache_len, value_width), value_dtype, device)
        self.cumulative_length = zeroed_static_buffer((), torch.int64, device)  # nothing held before allocation
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write rows ``[b, t, w]`` (and values ``[b, t, 0 | 1]``) after those held; return all the buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = advance_length(self.cumulative_length, key_states.shape[1], self.max_cache_len)
        copy_rows_at(self.keys, positions, key_states)
        copy_rows_at(self.values, positions, value_states)
        return self.keys, self.values

    def reserve(
        self, key_shape: tuple[int, int, int], key_dtype: torch.dtype, value_width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Count ``t`` more rows (``key_shape = (b, t, w)``) and return the buffers; the caller writes
        the rows ending at ``cumulative_length`` in place."""
        b, t, width = key_shape
        if not self.is_initialized:
            value_dtype = torch.float32 if value_width else key_dtype
            self.allocate(b, width, key_dtype, value_width, value_dtype, device)
        advance_length(self.cumulative_length, t, self.max_cache_len)
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (the format's cost; reads the length on the host)."""
        if not self.is_initialized:
            return 0
        held = int(self.cumulative_length)
        return held * (self.keys[0, 0].nbytes + self.values[0, 0].nbytes) * self.keys.shape[0]

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated: the whole capacity."""
        return tensor_nbytes(self.keys) + tensor_nbytes(self.values) if self.is_initialized else 0


class _LatentRows:
    """The latent-cache methods :class:`M2LACache` and :class:`M2LAStaticCache` share; their layers
    hold the rows in ``keys`` and fp8 scales in ``values`` and offer ``update`` and ``reserve``."""

    dtype: torch.dtype | None
    layers: list

    def append_latent(self, layer_idx: int, rows: torch.Tensor, dequantize: bool = True) -> torch.Tensor | None:
        """Append ``rows [b, t, r + 2p]`` to layer ``layer_idx``; return ``[b, s, r + 2p]`` in ``rows.dtype``.

        ``dequantize=False``: an fp8 cache returns None instead (for callers that read ``quantized_rows``).
        """
        layer = self.layers[layer_idx]
        check_rows_shape(layer.keys if layer.is_initialized else None, layer_idx, rows.shape[0], rows.shape[2])
        if self.dtype is None:
            keys, _ = layer.update(rows, rows[..., :0])
            return keys
        quantized, scale = quantize_rows(rows, self.dtype)
        keys, scales = layer.update(quantized, scale[..., None])
        if not dequantize:
            return None
        return dequantize_rows(keys, scales[..., 0], rows.dtype)

    def reserve_latent(
        self, layer_idx: int, batch: int, num_tokens: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Make room for ``num_tokens`` rows of ``width`` (rows of ``dtype``, or of the fp8 cache dtype);
        return the layer's rows ``[b, s, width]`` and, for fp8, scales ``[b, s]``, whose last
        ``num_tokens`` entries the caller writes (``m2la.kernels.write_latent_cache``), in place."""
        layer = self.layers[layer_idx]
        check_rows_shape(layer.keys if layer.is_initialized else None, layer_idx, batch, width)
        fp8 = self.dtype is not None
        keys, values = layer.reserve((batch, num_tokens, width), self.dtype or dtype, int(fp8), device)
        return keys, (values[..., 0] if fp8 else None)

    def quantized_rows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp8 caches: the stored ``rows [b, s, r + 2p]`` and ``scales [b, s]`` (what the kernels read); else None."""
        layer = self.layers[layer_idx]
        if self.dtype is None or not layer.is_initialized:
            return None
        return layer.keys, layer.values[..., 0]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} stores latent rows, not decompressed keys and values; "
            "only m2la attention layers (append_latent) can write to it"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held right now (all layers): the format's cost."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated (all layers), growth room included."""
        return sum(layer.reserved_nbytes for layer in self.layers)


class M2LACache(_LatentRows, DynamicCache):
    """transformers cache holding, per layer, only the latent and the rotated shared RoPE key.

    ``dtype=torch.float8_e4m3fn`` (or ``float8_e5m2``) keeps the rows in fp8 with one fp32 scale per
    token (:mod:`m2la.quantization`) in ``values [b, s, 1]``; attention reads them (dequantized by the
    reference path, as fp8 by the Triton kernels), so perplexity measured through this cache includes
    the fp8 error. Layers grow by at most 1/16 or 256 tokens over the rows they hold.
    """

    def __init__(self, num_layers: int, dtype: torch.dtype | None = None) -> None:
        self.dtype = check_cache_dtype(dtype)
        Cache.__init__(self, layers=[LatentCacheLayer() for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: nn.Module, dtype: torch.dtype | None = None) -> M2LACache:
        """An empty cache for a converted model (one layer per m2la attention module); pass it as
        ``cache=`` (``past_key_values=`` before transformers 5) to ``model(...)`` or ``model.generate(...)``."""
        return cls(_checked_num_layers(model), dtype)


class M2LAStaticCache(_LatentRows, Cache):
    """A fixed-capacity :class:`M2LACache`: each layer's rows live in ``[b, max_cache_len, r + 2p]``
    buffers allocated once (:class:`StaticLatentLayer`), the analogue of transformers' StaticCache.

    Shapes and addresses do not change between decode steps, so ``torch.compile`` makes one graph for
    every step and ``mode="reduce-overhead"`` replays it as a CUDA graph, which removes the host cost
    of launching each layer's kernels. ``generate(..., cache=M2LAStaticCache.for_model(model, n))``
    on a GPU compiles the decode step this way by itself (transformers' auto-compile), as does
    ``generate(..., cache_implementation="static")``, whose empty StaticCache a converted model
    swaps for this one. Eager calls sync with the host twice a layer (the capacity check and the
    length) and, with the Triton backend, once a forward (the mask check), so use it compiled;
    compiled calls never sync, and a full cache fails a device-side assert instead of raising.
    """

    def __init__(self, num_layers: int, max_cache_len: int, dtype: torch.dtype | None = None) -> None:
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be positive, got {max_cache_len}")
        self.dtype = check_cache_dtype(dtype)
        Cache.__init__(self, layers=[StaticLatentLayer(max_cache_len) for _ in range(num_layers)])

    @classmethod
    def for_model(
        cls, model: nn.Module, max_cache_len: int, batch_size: int | None = None, dtype: torch.dtype | None = None
    ) -> M2LAStaticCache:  # fmt: skip
        """An empty cache for a converted model. With ``batch_size`` the buffers are allocated now, in the
        model's dtype and on its device (so a compiled first call finds them at fixed addresses);
        otherwise on the first write."""
        cache = cls(_checked_num_layers(model), max_cache_len, dtype)
        if batch_size is not None:
            modules = [m for m in model.modules() if isinstance(m, HFM2LAttention)]
            for layer, module in zip(cache.layers, modules, strict=True):
                weight = module.kv_a_proj.weight
                fp8 = cache.dtype is not None
                layer.allocate(
                    batch_size, module.config.cache_width, cache.dtype or weight.dtype, int(fp8),
                    torch.float32 if fp8 else weight.dtype, weight.device,
                )  # fmt: skip
        return cache

    def static_length(self, layer_idx: int) -> torch.Tensor:
        """Rows layer ``layer_idx`` holds: a 0-d int64 tensor, updated in place (see LatentCacheProtocol)."""
        return self.layers[layer_idx].cumulative_length


def _checked_num_layers(model: nn.Module) -> int:
    num_layers = _num_decoder_layers(model)
    if num_layers == 0:
        raise ValueError(f"{type(model).__name__} has no m2la attention layers; convert it first")
    return num_layers


def _num_decoder_layers(model: nn.Module) -> int:
    return sum(isinstance(m, HFM2LAttention) for m in model.modules())


def _inject_latent_cache(model: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook: give the model an M2LACache where it would build a K/V cache, and an
    M2LAStaticCache of the same capacity for an empty transformers StaticCache
    (``generate(cache_implementation="static")``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, (M2LACache, M2LAStaticCache)):
        return None
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            config = getattr(model, "config", None)
            use_cache = bool(getattr(config.get_text_config(decoder=True), "use_cache", False)) if config else False
        if not use_cache:
            return None
    elif not isinstance(cache, Cache) or cache.get_seq_length() > 0:
        raise TypeError(
            f"an m2la-converted model got a {type(cache).__name__} holding decompressed keys/values; "
            "pass an m2la.M2LACache or M2LAStaticCache (or no cache) instead"
        )
    kwargs.pop("past_key_values", None)
    if isinstance(cache, StaticCache):
        if any(cache.is_sliding):  # its sliding layers hold the window only, not the whole length
            raise ValueError(
                "transformers' static cache for sliding-window layers keeps only the window, and m2la's "
                "static cache keeps every token: pass cache=m2la.M2LAStaticCache.for_model(model, max_cache_len)"
            )
        kwargs["cache"] = M2LAStaticCache(_num_decoder_layers(model), cache.get_max_length())
    else:
        kwargs["cache"] = M2LACache(_num_decoder_layers(model))
    return args, kwargs


# --- attention module -----------------------------------------------------------------------------


class HFM2LAttention(M2LAttention):
    """M2LAttention with the call signature of transformers' attention modules.

    RoPE angles come from the host's ``position_embeddings`` (cos/sin ``[b, t, head_dim]``, rotate-half
    layout, M-RoPE already resolved by the host), so every RoPE flavour the host computes is honoured.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        if position_embeddings is None:
            raise ValueError("m2la attention needs the host model's position_embeddings (cos, sin)")
        if cache is not None and not isinstance(cache, (M2LACache, M2LAStaticCache)):
            raise TypeError(
                f"m2la attention got a {type(cache).__name__}; converted models cache latents in an "
                "M2LACache or M2LAStaticCache"
            )
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"unsupported attention mask type {type(attention_mask).__name__}; "
                "use attn_implementation='sdpa' or 'eager'"
            )
        host_cos, host_sin = position_embeddings
        columns = self._rope_columns_on(host_cos.device)
        cos = host_cos.index_select(-1, columns)  # [b, t, p]
        sin = host_sin.index_select(-1, columns)
        return self.attend(hidden_states, cos, sin, attention_mask, cache), None

    def _rope_columns_on(self, device: torch.device) -> torch.Tensor:
        """`rope_source_column` on `device`, copied once per device (not a host-to-device copy per
        layer per step; it stays a plain CPU tensor like the other RoPE tables). Traced code
        (torch.compile) reads a copy eager calls made but never stores one: dynamo could not trace
        storing a tensor made in the graph into this memo (seen on an H100, fullgraph=True)."""
        if torch.compiler.is_compiling():
            source, columns = getattr(self, "_rope_column_copies", {}).get(device, (None, None))
            return columns if source is self.rope_source_column else self.rope_source_column.to(device)
        copies = self.__dict__.setdefault("_rope_column_copies", {})  # device -> (source, copy)
        source, columns = copies.get(device, (None, None))
        if source is not self.rope_source_column:  # first call on this device, or a new table
            columns = self.rope_source_column.to(device)
            copies[device] = (self.rope_source_column, columns)
        return columns


# --- conversion -----------------------------------------------------------------------------------


@dataclass
class LayerReport:
    layer: int
    kv_rank: int
    rope_dim: int
    qk_nope_dim: int
    bytes_per_token_before: int
    bytes_per_token_after: int
    key_error: float | None = None  # relative errors on held-out calibration tokens (compressed conversions)
    value_error: float | None = None
    output_error: float | None = None
    # the same errors over text / vision tokens only (VLMs; None when the held-out tokens hold no such token)
    key_error_text: float | None = None
    key_error_vision: float | None = None
    value_error_text: float | None = None
    value_error_vision: float | None = None
    output_error_text: float | None = None
    output_error_vision: float | None = None


SPLIT_ERROR_FIELDS = (
    "key_error_text",
    "key_error_vision",
    "value_error_text",
    "value_error_vision",
    "output_error_text",
    "output_error_vision",
)


def _report_errors(errors) -> dict[str, float | None]:
    """`LayerErrors` (key, key_text, ...) -> LayerReport keywords (key_error, key_error_text, ...)."""
    if errors is None:
        return {}
    keywords = {}
    for name, value in errors.as_dict().items():
        kind, _, tokens = name.partition("_")  # "key_text" -> ("key", "text")
        keywords[f"{kind}_error_{tokens}" if tokens else f"{kind}_error"] = value
    return keywords


@dataclass
class ConversionReport:
    model_type: str
    dtype: str
    lossless: bool
    seconds: float
    layers: list[LayerReport] = field(default_factory=list)
    method: str | None = None  # compressed conversions: m2la / mha2mla / transmla / care

    @property
    def bytes_per_token_before(self) -> int:
        return sum(layer.bytes_per_token_before for layer in self.layers)

    @property
    def bytes_per_token_after(self) -> int:
        return sum(layer.bytes_per_token_after for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_per_token_before / max(self.bytes_per_token_after, 1)

    @property
    def has_token_split(self) -> bool:
        """Whether any layer reports errors split into text and vision tokens (VLM conversions)."""
        return any(getattr(layer, name) is not None for layer in self.layers for name in SPLIT_ERROR_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            bytes_per_token_before=self.bytes_per_token_before,
            bytes_per_token_after=self.bytes_per_token_after,
            compression_ratio=self.compression_ratio,
        )
        return data

    def to_table(self) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        split = self.has_token_split
        head = f"{'layer':>5} {'rank':>5} {'rope':>5} {'nope':>5} {'B/tok before':>12} {'B/tok after':>11} {'key err':>8} {'val err':>8} {'out err':>8}"
        if split:
            head += "".join(
                f" {name:>8}" for name in ("key txt", "key vis", "val txt", "val vis", "out txt", "out vis")
            )
        rows = [head, "-" * len(head)]
        for r in self.layers:
            row = (
                f"{r.layer:>5} {r.kv_rank:>5} {r.rope_dim:>5} {r.qk_nope_dim:>5} {r.bytes_per_token_before:>12} "
                f"{r.bytes_per_token_after:>11} {fmt(r.key_error):>8} {fmt(r.value_error):>8} {fmt(r.output_error):>8}"
            )
            if split:
                row += "".join(f" {fmt(getattr(r, name)):>8}" for name in SPLIT_ERROR_FIELDS)
            rows.append(row)
        rows.append("-" * len(head))
        rows.append(
            f"{self.model_type}, {self.dtype}, {'lossless' if self.lossless else f'compressed ({self.method})'}: cache "
            f"{self.bytes_per_token_before} -> {self.bytes_per_token_after} bytes/token "
            f"({self.compression_ratio:.2f}x), converted in {self.seconds:.1f} s"
        )
        if split:
            rows.append("errors: relative, on held-out calibration tokens; txt / vis: over text / vision tokens only")
        return "\n".join(rows)

    def save_json(self, path: str | os.PathLike) -> None:
        _atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))


def _family(model: nn.Module) -> tuple[str, str | None]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"m2la cannot convert model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return model_type, FAMILIES[model_type]


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers and the rotary embedding."""
    for candidate in (model, *model.modules()):
        if isinstance(getattr(candidate, "layers", None), nn.ModuleList) and hasattr(candidate, "rotary_emb"):
            return candidate
    raise UnsupportedModelError(f"could not find decoder layers with a rotary embedding in {type(model).__name__}")


def _rope_axes(model: nn.Module, rotary: nn.Module, mrope: str | None, num_pairs: int) -> torch.Tensor:
    """M-RoPE axis of every host frequency, read from the host's rotary module (as it computes them)."""
    if mrope is None:
        return torch.zeros(num_pairs, dtype=torch.long)
    sections = getattr(rotary, "mrope_section", None)
    if sections is None:
        params = getattr(model.config.get_text_config(decoder=True), "rope_parameters", None) or {}
        sections = params.get("mrope_section")
    if sections is None:
        raise UnsupportedModelError(f"{model.config.model_type}: cannot find the M-RoPE mrope_section")
    axes = rope.mrope_axes_sectioned(sections) if mrope == "sectioned" else rope.mrope_axes_interleaved(sections)
    if axes.numel() != num_pairs:
        raise UnsupportedModelError(f"mrope_section {sections} covers {axes.numel()} frequencies, RoPE has {num_pairs}")
    return axes


def _source_attention(
    attn: nn.Module, text_config: Any, inv_freq: torch.Tensor, axes: torch.Tensor, scaling: float
) -> SourceAttention:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise UnsupportedModelError(f"{type(attn).__name__} has no nn.Linear {name}; not a standard attention")
    head_dim = attn.head_dim
    num_pairs = inv_freq.numel()
    if 2 * num_pairs != head_dim:
        raise UnsupportedModelError(
            f"partial rotary ({2 * num_pairs} of {head_dim} dims) is not supported for HF models yet"
        )
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

    def bias(linear: nn.Linear) -> torch.Tensor | None:
        return None if linear.bias is None else linear.bias.detach()

    return SourceAttention(
        hidden_size=attn.q_proj.in_features,
        num_heads=attn.q_proj.out_features // head_dim,
        num_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
        q_weight=attn.q_proj.weight.detach(),
        k_weight=attn.k_proj.weight.detach(),
        v_weight=attn.v_proj.weight.detach(),
        o_weight=attn.o_proj.weight.detach(),
        q_bias=bias(attn.q_proj),
        k_bias=bias(attn.k_proj),
        v_bias=bias(attn.v_proj),
        o_bias=bias(attn.o_proj),
        softmax_scale=float(attn.scaling),
        rope_inv_freq=inv_freq.detach().double().cpu(),
        rope_axis=axes,
        rope_source_column=torch.arange(num_pairs),
        rope_scaling=float(scaling),
        q_norm_weight=None if q_norm is None else q_norm.weight.detach(),
        k_norm_weight=None if k_norm is None else k_norm.weight.detach(),
        norm_eps=float(getattr(q_norm, "variance_epsilon", getattr(text_config, "rms_norm_eps", 1e-6))),
    )


def _install(model: nn.Module, layer_configs: list[M2LAConfig]) -> list[HFM2LAttention]:
    """Replace every decoder layer's self_attn with an (uninitialised) HFM2LAttention; hook the cache."""
    decoder = _decoder(model)
    if len(layer_configs) != len(decoder.layers):
        raise M2LACheckpointError(f"m2la config has {len(layer_configs)} layers, the model {len(decoder.layers)}")
    modules = [
        _replace_attention(layer, config, idx)
        for idx, (layer, config) in enumerate(zip(decoder.layers, layer_configs, strict=True))
    ]
    _register_converted(model, decoder, layer_configs)
    return modules


def _replace_attention(layer: nn.Module, config: M2LAConfig, idx: int) -> HFM2LAttention:
    old = layer.self_attn
    weight = old.o_proj.weight if hasattr(old, "o_proj") else next(old.parameters())
    new = HFM2LAttention(config, layer_idx=getattr(old, "layer_idx", idx)).to(weight.device, weight.dtype)
    layer.self_attn = new
    return new


def _register_converted(model: nn.Module, decoder: nn.Module, layer_configs: list[M2LAConfig]) -> None:
    """Record the layer configs in the model config, hook the latent cache, make saving atomic."""
    meta = {"format_version": FORMAT_VERSION, "layers": [c.to_dict() for c in layer_configs]}
    setattr(model.config, M2LA_CONFIG_KEY, meta)
    for target in {id(model): model, id(decoder): decoder}.values():
        target.register_forward_pre_hook(_inject_latent_cache, with_kwargs=True)
    # per instance, not per class: model.save_pretrained of a converted model writes atomically
    model.save_pretrained = functools.partial(save_pretrained, model)


def _sources(model: nn.Module) -> tuple[str, nn.Module, list[SourceAttention], float, int]:
    """(model_type, decoder, per-layer sources, RoPE attention scaling, number of rotary pairs)."""
    model_type, mrope = _family(model)
    decoder = _decoder(model)
    rotary = decoder.rotary_emb
    inv_freq = rotary.inv_freq
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    text_config = model.config.get_text_config(decoder=True)
    axes = _rope_axes(model, rotary, mrope, inv_freq.numel())
    sources = [_source_attention(layer.self_attn, text_config, inv_freq, axes, scaling) for layer in decoder.layers]
    return model_type, decoder, sources, scaling, inv_freq.numel()


def convert(
    model: PreTrainedModel,
    *,
    compression: float | None = None,
    kv_rank: int | None = None,
    rope_dim: int | None = None,
    calibration: Iterable[Any] | None = None,
    method: str = "m2la",
    tokenizer: Any = None,
    progress: bool = False,
    **options: Any,
) -> ConversionReport:
    """Replace, in place, every attention layer of ``model`` with an M²LA layer built from its weights.

    With no compression arguments the conversion is lossless (logits equal the original's to
    rounding) and the latent cache holds as many bytes as the original K/V cache.

    Compressed conversion (zero-shot, calibrated):

    - ``compression``: target ratio of original to converted cache bytes per token; the converter
      picks every layer's latent rank and RoPE dims so the total is ``<=`` the budget and as close to
      it as possible (ranks are multiples of 8);
    - ``kv_rank`` / ``rope_dim``: the same rank and RoPE dims for every layer instead;
    - ``calibration``: iterable of model-input dicts (token batches, or multimodal batches); default
      :func:`wiki_calibration`: 16 x 512 tokens of ``m2la.assets.wiki_split("calibration")`` plus one
      held-out window, which needs ``tokenizer=`` (or a tokenizer loadable from ``model.name_or_path``).
      The last batch is held out for the error report
      (its first sequence; for VLMs the errors are also split into text and vision tokens, vision being
      the config's ``image_token_id`` / ``video_token_id`` placeholders);
    - ``method``: ``"m2la"`` (default) or the baselines ``"mha2mla"``, ``"transmla"``, ``"care"``;
    - ``options``: fields of :class:`m2la.compression.CompressionOptions` (``key_weight``,
      ``uniform_mix``, ``sequential``, ``pair_grid_points``, ``refit_memory_gib``: the most refit
      statistics held at once; larger models gather them a few layers at a time, same result).
    """
    compressed = compression is not None or kv_rank is not None or rope_dim is not None
    if not compressed and (calibration is not None or options or method != "m2la" or tokenizer is not None):
        raise ConversionError(
            "calibration=, method=, tokenizer= and compression options only apply to a compressed conversion; "
            "also pass compression= (or kv_rank=)"
        )
    if any(isinstance(m, M2LAttention) for m in model.modules()):
        raise UnsupportedModelError("this model is already converted to M²LA (it contains M2LAttention layers)")
    start = time.perf_counter()
    model_type, decoder, sources, scaling, num_pairs = _sources(model)
    dtype = sources[0].q_weight.dtype
    element = torch.empty((), dtype=dtype).element_size()
    if compressed:
        return _convert_compressed(
            model,
            model_type,
            decoder,
            sources,
            scaling,
            num_pairs,
            start,
            compression=compression,
            kv_rank=kv_rank,
            rope_dim=rope_dim,
            calibration=calibration,
            method=method,
            tokenizer=tokenizer,
            progress=progress,
            options=options,
        )
    configs = [lossless_config(src) for src in sources]
    with torch.no_grad():
        for module, src, config in zip(_install(model, configs), sources, configs, strict=True):
            module.load_state_dict(lossless_state_dict(src, config), strict=True)
    report = ConversionReport(
        model_type=model_type,
        dtype=str(dtype).removeprefix("torch."),
        lossless=True,
        seconds=time.perf_counter() - start,
        layers=[
            LayerReport(
                layer=i,
                kv_rank=c.kv_rank,
                rope_dim=c.rope_dim,
                qk_nope_dim=c.qk_nope_dim,
                bytes_per_token_before=source_cache_width(s) * element,
                bytes_per_token_after=c.cache_bytes_per_token(element),
                key_error=0.0,
                value_error=0.0,
                output_error=0.0,
            )
            for i, (s, c) in enumerate(zip(sources, configs, strict=True))
        ],
    )
    return report


def wiki_calibration(
    tokenizer: Any, windows: int = 16, length: int = 512, batch_size: int = 4
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from the bundled Wikipedia (calibration split): ``windows`` x ``length`` tokens
    fitted, in batches of ``batch_size``, then one further window of ``length`` tokens as the last batch,
    which the converter holds out for its error report (it is never fitted on).

    Window length matters more than the token count: on SmolLM2-135M at 2x, 16 x 256 tokens gave 1.256x
    the original perplexity (on 512-token windows), 64 x 256 gave 1.206x, 16 x 512 gave 1.208x
    (benchmarks/RESULTS.md). The statistics cost grows with ``length`` squared.
    """
    from ..assets import wiki_split
    from ..evaluation import token_windows

    if windows < 1 or length < 2 or batch_size < 1:
        raise ValueError(f"need windows >= 1, length >= 2, batch_size >= 1; got {windows}, {length}, {batch_size}")
    ids = token_windows(tokenizer, wiki_split("calibration"), length, windows + 1)
    batches = [{"input_ids": ids[i : min(i + batch_size, windows)]} for i in range(0, windows, batch_size)]
    return batches + [{"input_ids": ids[windows:]}]


def _default_calibration(model: nn.Module, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """:func:`wiki_calibration` with its defaults, loading the model's tokenizer when none is given."""
    if tokenizer is None:
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as error:  # any loader failure means: no tokenizer available
            raise ConversionError(
                f"compressed conversion needs calibration data: pass calibration= (model-input batches) or "
                f"tokenizer= (to use the default Wikipedia calibration); no tokenizer loads from {name!r} ({error})"
            ) from error
    return wiki_calibration(tokenizer)


def _vision_token_ids(model: nn.Module, model_type: str) -> list[int]:
    """Input ids of vision placeholder tokens (image, video) of a VLM; empty for text-only families."""
    config = model.config
    ids = []
    for name in VISION_TOKEN_ATTRIBUTES.get(model_type, ()):
        value = getattr(config, name, None)
        if value is None:
            value = getattr(config.get_text_config(decoder=True), name, None)
        if isinstance(value, int):
            ids.append(value)
    return ids


def _convert_compressed(
    model,
    model_type,
    decoder,
    sources,
    scaling,
    num_pairs,
    start,
    *,
    compression,
    kv_rank,
    rope_dim,
    calibration,
    method,
    tokenizer,
    progress,
    options,
) -> ConversionReport:
    from ..compression import AttentionCall, CompressionOptions, compress_layers

    try:
        opts = CompressionOptions(method=method, **options)
    except TypeError as error:
        raise ConversionError(f"unknown compression option: {error}") from error
    batches = list(calibration) if calibration is not None else _default_calibration(model, tokenizer)
    device = next(model.parameters()).device

    def to_device(batch: Any) -> dict[str, Any]:
        if isinstance(batch, torch.Tensor):  # a bare [b, t] tensor of token ids
            batch = {"input_ids": batch}
        if not isinstance(batch, dict):
            raise ConversionError(
                f"calibration batches must be dicts of model inputs (or [b, t] token ids), got {type(batch).__name__}"
            )
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward(batch: Any) -> None:
        model(**to_device(batch), use_cache=False)

    def extract(module: nn.Module, args: tuple, kwargs: dict) -> AttentionCall:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        embeddings = kwargs.get("position_embeddings")
        if hidden is None or embeddings is None:
            raise UnsupportedModelError(f"{type(module).__name__} was called without hidden_states/position_embeddings")
        cos, sin = embeddings
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise UnsupportedModelError(
                f"unsupported attention mask type {type(mask).__name__}; use attn_implementation='sdpa' or 'eager'"
            )
        return AttentionCall(hidden, cos[..., :num_pairs] / scaling, sin[..., :num_pairs] / scaling, mask)

    def token_weight(batch: Any) -> torch.Tensor | None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    vision_ids = _vision_token_ids(model, model_type)

    def vision_mask(batch: Any) -> torch.Tensor | None:
        """VLMs: True where the input id is an image/video placeholder (their features replace it)."""
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if not vision_ids or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        return torch.isin(ids, torch.tensor(vision_ids, device=ids.device))

    def replace(idx: int, config: M2LAConfig, state: dict[str, torch.Tensor]) -> HFM2LAttention:
        new = _replace_attention(decoder.layers[idx], config, idx)
        with torch.no_grad():
            new.load_state_dict(state, strict=True)
        return new.eval()

    say = None
    if progress:

        def say(message: str) -> None:
            print(f"[m2la] {message}", flush=True)

    modules = [layer.self_attn for layer in decoder.layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = compress_layers(
                forward,
                batches,
                modules,
                sources,
                extract,
                replace,
                opts,
                compression=compression,
                kv_rank=kv_rank,
                rope_dim=rope_dim,
                token_weight=token_weight,
                progress=say,
                vision_mask=vision_mask,
            )
    except BaseException:
        for layer, original in zip(decoder.layers, modules, strict=True):  # leave the model as it was
            layer.self_attn = original
        raise
    finally:
        model.train(was_training)
    configs = [r.config for r in results]
    _register_converted(model, decoder, configs)
    dtype = sources[0].q_weight.dtype
    element = torch.empty((), dtype=dtype).element_size()
    return ConversionReport(
        model_type=model_type,
        dtype=str(dtype).removeprefix("torch."),
        lossless=False,
        seconds=time.perf_counter() - start,
        method=method,
        layers=[
            LayerReport(
                layer=r.index,
                kv_rank=r.config.kv_rank,
                rope_dim=r.config.rope_dim,
                qk_nope_dim=r.config.qk_nope_dim,
                bytes_per_token_before=source_cache_width(src) * element,
                bytes_per_token_after=r.config.cache_bytes_per_token(element),
                **_report_errors(r.errors),
            )
            for r, src in zip(results, sources, strict=True)
        ],
    )


# --- persistence ----------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    report: ConversionReport | None = None,
    **kwargs: Any,
) -> Path:
    """Write a converted model (safetensors + config.json with the M²LA layer configs) atomically.

    Everything is written into a temporary sibling folder that replaces ``save_directory`` in one
    rename, so a crash leaves either the old folder or the new one, never a mix.
    """
    if getattr(model.config, M2LA_CONFIG_KEY, None) is None:
        raise M2LACheckpointError("model is not m2la-converted; call m2la.convert(model) first")
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        # module names as in memory (no legacy key renaming), so from_pretrained can load them strictly
        kwargs.setdefault("save_original_format", False)
        type(model).save_pretrained(model, staging, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            report.save_json(staging / REPORT_FILE)
        if target.exists():
            retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise M2LACheckpointError(f"{index}: corrupt shard index ({error})") from error
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if not single.exists():
        raise M2LACheckpointError(f"{folder} has no model.safetensors (or shard index)")
    return [single]


def _load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error types for bad headers/truncation
            raise M2LACheckpointError(f"{file}: corrupt or unreadable safetensors file ({error})") from error
    return tensors


def _resolve(path_or_repo_id: str | os.PathLike) -> Path:
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo_id)))


def from_pretrained(
    path_or_repo_id: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> PreTrainedModel:
    """Rebuild a model saved by :func:`save_pretrained` (local folder or Hub repo id)."""
    import transformers

    folder = _resolve(path_or_repo_id)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise M2LACheckpointError(f"{folder}: unreadable config.json ({error})") from error
    meta = getattr(config, M2LA_CONFIG_KEY, None)
    if not isinstance(meta, dict) or "layers" not in meta:
        raise M2LACheckpointError(
            f"{folder} is not an m2la checkpoint (config.json has no '{M2LA_CONFIG_KEY}' entry); "
            "convert it with m2la.convert(model) and save it first"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise M2LACheckpointError(
            f"m2la checkpoint format {meta.get('format_version')!r}; this m2la reads {FORMAT_VERSION}"
        )
    try:
        layer_configs = [M2LAConfig.from_dict(c) for c in meta["layers"]]
    except (M2LAConfigError, TypeError) as error:
        raise M2LACheckpointError(f"{folder}: invalid m2la layer config ({error})") from error
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise M2LACheckpointError(f"{folder}: config.json names no known transformers architecture ({architectures})")
    delattr(config, M2LA_CONFIG_KEY)
    tensors = _load_tensors(_checkpoint_files(folder))
    if dtype is None:
        dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    model = model_class._from_config(config, dtype=dtype)
    _install(model, layer_configs)
    expected = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    unexpected = sorted(set(tensors) - set(expected))
    if mismatched or unexpected:
        raise M2LACheckpointError(
            f"{folder}: checkpoint does not match its m2la config: "
            + "; ".join(mismatched[:5] + [f"unexpected {k}" for k in unexpected[:5]])
        )
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    # a parameter may be absent from the file only if a weight tied to it (same tensor) was loaded
    names_by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(param), []).append(name)
    missing = sorted(n for names in names_by_tensor.values() if not set(names) & set(tensors) for n in names)
    if missing:
        raise M2LACheckpointError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    model.eval()
    return model.to(device) if device is not None else model
