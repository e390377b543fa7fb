"""Model-quality and cache-size measurements for any Hugging Face causal LM, converted or not."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def token_windows(tokenizer, texts: Iterable[str], window: int, n_windows: int) -> torch.LongTensor:
    """`[n_windows, window]` token ids: the texts joined by EOS tokens, cut into non-overlapping windows.

    Texts are tokenized one at a time and only as many as needed, so passing all of Wikipedia is cheap.
    """
    if window < 2 or n_windows < 1:
        raise ValueError(f"need window >= 2 and n_windows >= 1, got window={window}, n_windows={n_windows}")
    separator = tokenizer.eos_token_id
    if separator is None:
        raise ValueError("the tokenizer has no eos_token_id to separate texts with")
    needed = window * n_windows
    stream: list[int] = []
    for text in texts:
        if stream:
            stream.append(separator)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than {n_windows} windows x {window} = {needed}")
    return torch.tensor(stream[:needed], dtype=torch.long).view(n_windows, window)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _returned_cache(out):
    """The cache object a forward returned: `out.cache` in transformers 5, `past_key_values` before."""
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def _cache_keyword(model) -> str:
    """Name of the forward argument that takes a cache (`cache` in transformers 5)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _EvalMode:
    """Put a model in eval mode for a block, then restore its previous training flag."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _cache_kwargs(model, make_cache: Callable[[], Any] | None) -> dict[str, Any]:
    """Forward kwargs: no cache, or a fresh one from `make_cache` (attention then reads cache rows)."""
    if make_cache is None:
        return {"use_cache": False}
    return {"use_cache": True, _cache_keyword(model): make_cache()}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, make_cache: Callable[[], Any] | None = None) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (`[n, window]` ids).

    `make_cache`: a zero-argument factory of a cache for each batch (e.g. an fp8
    `m2la.M2LACache.for_model(model, torch.float8_e4m3fn)`); every query then attends to the rows
    as stored in that cache, so its storage error is in the score.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, window >= 2] token ids, got shape {tuple(windows.shape)}")
    device = _device_of(model)
    total_nll = 0.0
    total_tokens = 0
    with _EvalMode(model):
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = _logits(model(input_ids=ids, **_cache_kwargs(model, make_cache)))
            # logits[:, i] predicts ids[:, i + 1]; fp32 so bf16 models are scored exactly.
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: its `nbytes` (m2la's latent cache), else its layers' keys and values."""
    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return int(nbytes() if callable(nbytes) else nbytes)
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56 Cache: one object per layer
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    if isinstance(cache, (tuple, list)):  # legacy ((k, v), ...) tuples
        for layer in cache:
            for tensor in layer:
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    raise TypeError(f"cannot measure a cache of type {type(cache).__name__}")


@torch.no_grad()
def cache_bytes_per_token(model, input_ids: torch.Tensor, make_cache: Callable[[], Any] | None = None) -> float:
    """Cache bytes per cached token after one forward over `input_ids` (`[b, t]`) with use_cache=True
    (into a cache from `make_cache` when given)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    kwargs = _cache_kwargs(model, make_cache) if make_cache is not None else {"use_cache": True}
    with _EvalMode(model):
        out = model(input_ids=input_ids.to(_device_of(model)), **kwargs)
    cache = _returned_cache(out)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no cache for use_cache=True")
    return cache_nbytes(cache) / input_ids.numel()


@torch.no_grad()
def greedy_generate(model, prompt_ids: torch.Tensor, new_tokens: int) -> torch.LongTensor:
    """`[b, new_tokens]` greedy continuation of equal-length prompts `[b, t]`, decoding through the cache.

    Never stops at EOS, so two models are always compared over the same number of positions.
    """
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    cache_keyword = _cache_keyword(model)
    generated = []
    with _EvalMode(model):
        out = model(input_ids=prompt_ids.to(_device_of(model)), use_cache=True)
        for step in range(new_tokens):
            next_token = _logits(out)[:, -1].argmax(dim=-1, keepdim=True)  # [b, 1]
            generated.append(next_token)
            if step + 1 < new_tokens:
                out = model(input_ids=next_token, use_cache=True, **{cache_keyword: _returned_cache(out)})
    return torch.cat(generated, dim=1).cpu()


def greedy_agreement(model_a, model_b, prompts_ids: torch.Tensor | Sequence[torch.Tensor], new_tokens: int) -> float:
    """Share of positions where the two models' own greedy continuations pick the same token.

    Each model generates freely from each prompt (no teacher forcing); all `new_tokens` positions of
    every prompt are compared, so after a first divergence later positions usually differ too.
    `prompts_ids` is `[n, t]` (equal-length prompts, run as one batch) or a list of 1-D prompts.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    batches = [prompts_ids] if isinstance(prompts_ids, torch.Tensor) else list(prompts_ids)
    matches = 0
    total = 0
    for prompt in batches:
        tokens_a = greedy_generate(model_a, prompt, new_tokens)
        tokens_b = greedy_generate(model_b, prompt, new_tokens)
        matches += (tokens_a == tokens_b).sum().item()
        total += tokens_a.numel()
    if total == 0:
        raise ValueError("no prompts given")
    return matches / total
