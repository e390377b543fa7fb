"""Decode step time on CPU: converted SmolLM2 (absorbed decode over the latent cache) vs the original
(transformers SDPA over the full K/V cache), side by side in one run.

    python benchmarks/decode_speed_cpu.py [--contexts 1024 8192 32768] [--compression 4] [--concat-baseline]
        [--plain-lossless]

The caches are filled with random rows of the right shapes (a decode step's cost does not depend on
their values), so long contexts need no long prefill. Attention time is measured with hooks around
every layer's ``self_attn`` (the cache append happens inside it); cache bytes are read from the cache
objects. ``--concat-baseline`` also times each m2la model with an M2LACache whose layers append by
torch.cat (transformers' DynamicLayer.update) instead of writing in place. ``--plain-lossless`` also
times the lossless conversion with its grouped path turned off (each layer's ``head_groups`` answering
0): the plain absorbed decode over all ``r + 2p`` columns, as before the grouped path.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import m2la
from m2la.assets import load_smollm2
from m2la.integrations.hf import LatentCacheLayer


class ConcatLatentLayer(LatentCacheLayer):
    """The latent cache layer as it was: every append copies the whole layer (torch.cat)."""

    update = DynamicLayer.update


class AttentionTimer:
    """Sums wall time spent inside every decoder layer's self_attn."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith("self_attn"):
                self.handles.append(module.register_forward_pre_hook(self._pre))
                self.handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._start


def filled_cache(model: torch.nn.Module, context: int, concat: bool = False) -> DynamicCache:
    """A cache of ``context`` random tokens with the model's own cache type and shapes."""
    g = torch.Generator().manual_seed(0)
    layers = [m for m in model.modules() if isinstance(m, m2la.M2LAttention)]
    if layers:
        cache = m2la.M2LACache(len(layers))
        if concat:
            cache.layers = [ConcatLatentLayer() for _ in layers]
        for i, layer in enumerate(layers):
            cache.append_latent(i, torch.randn(1, context, layer.config.cache_width, generator=g))
        return cache
    config = model.config
    cache = DynamicCache(config=config)
    shape = (1, config.num_key_value_heads, context, config.head_dim)
    for i in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), i)
    return cache


def cache_nbytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def time_decode(model, context: int, repeats: int, concat: bool = False) -> dict:
    cache = filled_cache(model, context, concat)
    nbytes = cache_nbytes(cache)
    timer = AttentionTimer(model)
    token = torch.tensor([[42]])
    steps, attention = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            timer.total = 0.0
            start = time.perf_counter()
            model(input_ids=token, position_ids=torch.tensor([[context]]), cache=cache, use_cache=True)
            elapsed = time.perf_counter() - start
            cache.crop(-1)  # drop the token just appended
            if i:  # the first step warms up allocator and kernels
                steps.append(elapsed)
                attention.append(timer.total)
    for handle in timer.handles:
        handle.remove()
    return {
        "step_ms": 1e3 * statistics.median(steps),
        "attention_ms": 1e3 * statistics.median(attention),
        "cache_bytes": nbytes,
        "bytes_per_token": nbytes / context,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--compression", type=float, nargs="*", default=[], help="also time compressed conversions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concat-baseline", action="store_true", help="also time m2la with torch.cat appends")
    parser.add_argument("--plain-lossless", action="store_true", help="also time lossless without the grouped path")
    args = parser.parse_args()
    torch.manual_seed(0)
    original, tokenizer = load_smollm2()
    models = {"original (HF SDPA, K/V cache)": original}
    lossless = copy.deepcopy(original)
    m2la.convert(lossless)
    models["m2la lossless (latent cache)"] = lossless
    if args.plain_lossless:
        plain = copy.deepcopy(lossless)
        for layer in plain.modules():
            if isinstance(layer, m2la.M2LAttention):
                layer.head_groups = lambda: 0  # this instance only: the plain absorbed decode
        models["m2la lossless, plain decode (latent cache)"] = plain
    for ratio in args.compression:
        compressed = copy.deepcopy(original)
        m2la.convert(compressed, compression=ratio, tokenizer=tokenizer)
        models[f"m2la {ratio:g}x (latent cache)"] = compressed
    runs = [(name, model, False) for name, model in models.items()]
    if args.concat_baseline:
        runs += [
            (f"{name}, torch.cat appends", model, True) for name, model in models.items() if name.startswith("m2la")
        ]

    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, batch 1"
    )
    print(
        "\n| context | model | step ms | attention ms | attention share | cache MiB | bytes/token "
        "| attention speed-up | byte ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        base = None
        for name, model, concat in runs:
            r = time_decode(model, context, args.repeats, concat)
            base = base or r
            speedup = base["attention_ms"] / r["attention_ms"]
            ratio = base["cache_bytes"] / r["cache_bytes"]
            print(
                f"| {context} | {name} | {r['step_ms']:.1f} | {r['attention_ms']:.1f} | "
                f"{r['attention_ms'] / r['step_ms']:.0%} | {r['cache_bytes'] / 2**20:.0f} | "
                f"{r['bytes_per_token']:.0f} | {speedup:.2f}x | {ratio:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
