"""m2la: retrofit pretrained attention with a compressed latent KV cache (M²LA).

Importing m2la imports neither transformers nor triton; the Hugging Face entry points below load
``m2la.integrations.hf`` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import LatentCache, StaticLatentCache
from .config import M2LAConfig, M2LAConfigError
from .conversion import ConversionError, SourceAttention
from .module import M2LAttention, pin_head_groups

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "ConversionReport",
    "LatentCache",
    "M2LACache",
    "M2LACheckpointError",
    "M2LAConfig",
    "M2LAStaticCache",
    "M2LAConfigError",
    "M2LAttention",
    "SourceAttention",
    "StaticLatentCache",
    "UnsupportedModelError",
    "convert",
    "from_pretrained",
    "pin_head_groups",
    "save_pretrained",
]

_HF_EXPORTS = {"ConversionReport", "M2LACache", "M2LACheckpointError", "M2LAStaticCache", "UnsupportedModelError"}

if TYPE_CHECKING:
    from .integrations.hf import (
        ConversionReport,
        M2LACache,
        M2LACheckpointError,
        M2LAStaticCache,
        UnsupportedModelError,
    )


def convert(model: Any, **kwargs: Any) -> ConversionReport:
    """Convert a transformers model in place to M²LA; see :func:`m2la.integrations.hf.convert`."""
    from .integrations import hf

    return hf.convert(model, **kwargs)


def from_pretrained(path_or_repo_id: Any, **kwargs: Any) -> Any:
    """Load a converted model; see :func:`m2la.integrations.hf.from_pretrained`."""
    from .integrations import hf

    return hf.from_pretrained(path_or_repo_id, **kwargs)


def save_pretrained(model: Any, save_directory: Any, **kwargs: Any) -> Any:
    """Save a converted model atomically; see :func:`m2la.integrations.hf.save_pretrained`."""
    from .integrations import hf

    return hf.save_pretrained(model, save_directory, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _HF_EXPORTS:
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'm2la' has no attribute {name!r}")
