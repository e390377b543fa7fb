"""Decode step time of a converted transformers model: eager against torch.compile (GPU).

A randomly initialised Llama (bf16; 16 query heads, 4 KV heads of 128, 4 layers unless told
otherwise) is converted losslessly with `m2la.convert`, prefilled with `--prompt` tokens, then
decoded greedily with the Triton backend. Three runs of the same steps, side by side:
- eager, through an `M2LACache`;
- compiled: `torch.compile(model, fullgraph=True)` (inductor's default mode), `M2LACache`; the cache
  grows a row a step, so decode shapes are dynamic;
- static: an `M2LAStaticCache` (fixed capacity: prompt + steps) and
  `torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead")`, so every decode step
  is one graph that CUDA graphs replay.
The first compiled steps (prefill, the first decodes) compile and are not timed. Also reported: each
compiled run's largest prefill-logit difference from eager and how many sequences kept eager's tokens.

Usage (GPU): python benchmarks/compiled_decode.py [--layers 4] [--batches 1 8] [--steps 20]
-> markdown on stdout and in $OUT/compiled_decode.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import torch

VOCAB = 32000


def build_model(layers: int, device: torch.device, tiny: bool = False):
    import transformers as tf

    import m2la

    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    if not tiny:
        width = dict(
            hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4, head_dim=128
        )
    config = tf.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=8192, **width)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(torch.float32 if tiny else torch.bfloat16).eval()
    m2la.convert(model)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(
    model, prompt: torch.Tensor, steps: int, timed_from: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    """Greedy decode after a prefill -> (prefill's last logits, the tokens chosen `[b, steps]`, ms a
    step from step `timed_from` on). `capacity`: decode through an M2LAStaticCache that large
    (allocated up front), marking each step for CUDA graph trees."""
    from m2la.integrations.hf import M2LACache, M2LAStaticCache

    if capacity is None:
        cache = M2LACache.for_model(model)
    else:
        cache = M2LAStaticCache.for_model(model, capacity, batch_size=prompt.shape[0])
    ids, tokens, start, first = prompt, [], None, None
    for step in range(steps):
        if step == timed_from:
            synchronize(prompt.device)
            start = time.perf_counter()
        if capacity is not None:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
        out = model(input_ids=ids, cache=cache, use_cache=True)
        if step == 0:
            first = out.logits[:, -1].float()
        ids = out.logits[:, -1:].argmax(-1)
        tokens.append(ids)
    synchronize(prompt.device)
    return first, torch.cat(tokens, dim=1), (time.perf_counter() - start) * 1e3 / (steps - timed_from)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24, help="forward calls a run: 1 prefill + decode steps")
    parser.add_argument("--seconds", type=float, default=240, help="skip later batches past this")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (run with TRITON_INTERPRET=1)")
    args = parser.parse_args()

    from m2la.backends import use_backend

    device = torch.device("cpu" if args.smoke else "cuda")
    device_name = "CPU" if args.smoke else torch.cuda.get_device_name(device)
    began = time.time()
    model = build_model(args.layers, device, tiny=args.smoke)
    compiled = torch.compile(model, fullgraph=True)
    graphed = torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead")
    capacity = args.prompt + args.steps
    lines = [f"# Decode step, converted Llama ({args.layers} layers, 16 x 128 heads, bf16), "
             f"{device_name}, torch {torch.__version__}", "",
             f"Prompt {args.prompt} tokens; ms a decode step averaged over steps 4-{args.steps - 1}; Triton backend. "
             f"compiled: M2LACache, inductor default mode; static: M2LAStaticCache ({capacity} tokens), "
             "mode=reduce-overhead (CUDA graphs).", "",
             "| batch | eager ms | compiled ms | static ms | eager / compiled | eager / static "
             "| prefill logit max diff (compiled, static) | same tokens (compiled, static) | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    out = pathlib.Path(os.environ.get("OUT", "/tmp/m2la-out"))
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), use_backend("triton"):
        for batch in args.batches:
            if time.time() - began > args.seconds:
                lines.append(f"| {batch} | skipped (time) | | | | | | | |")
                continue
            generator = torch.Generator(device).manual_seed(batch)
            prompt = torch.randint(10, VOCAB, (batch, args.prompt), device=device, generator=generator)
            decode(model, prompt, 4, 1)  # warm the eager kernels
            eager_first, eager_tokens, eager_ms = decode(model, prompt, args.steps, 4)
            compile_start = time.time()
            decode(compiled, prompt, 4, 1)  # prefill, static decode, dynamic decode graphs
            decode(graphed, prompt, 4, 1, capacity)  # prefill and decode graphs, CUDA graph recording
            compile_s = time.time() - compile_start
            compiled_first, compiled_tokens, compiled_ms = decode(compiled, prompt, args.steps, 4)
            static_first, static_tokens, static_ms = decode(graphed, prompt, args.steps, 4, capacity)
            diffs = [(eager_first - first).abs().max().item() for first in (compiled_first, static_first)]
            same = [(eager_tokens == tokens).all(dim=1).sum().item() for tokens in (compiled_tokens, static_tokens)]
            lines.append(f"| {batch} | {eager_ms:.2f} | {compiled_ms:.2f} | {static_ms:.2f} | {eager_ms / compiled_ms:.2f}x "
                         f"| {eager_ms / static_ms:.2f}x | {diffs[0]:.2e}, {diffs[1]:.2e} "
                         f"| {same[0]}/{batch}, {same[1]}/{batch} sequences | {compile_s:.0f} |")  # fmt: skip
            print(lines[-1], flush=True)
            (out / "compiled_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (out / "compiled_decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
