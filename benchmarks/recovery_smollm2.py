"""Recovery of a compressed SmolLM2-135M by a short KL distillation from the unconverted model.

    python benchmarks/recovery_smollm2.py [--compression 4] [--steps 400] [--lr 3e-4] [--distill-windows 1600]

Perplexity on held-out Wikipedia (8 x 512 tokens, never used for calibration or training) before and
after training. From the calibration split: the library's default calibration (16 x 512 tokens fitted,
one 512-token window held out for the error report) converts the model; the `--distill-windows` 256-token
windows after it (first 128 tokens of each; 1600 by default, so 400 steps of 4 never repeat one) are the
distillation data.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import m2la
from m2la.assets import load_smollm2, wiki_split
from m2la.evaluation import perplexity, token_windows
from m2la.integrations.hf import wiki_calibration
from m2la.training import DistillConfig, distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--trainable", choices=["attention", "all"], default="attention")
    parser.add_argument(
        "--distill-windows",
        type=int,
        default=1600,
        help="distinct calibration-split windows to distil on (after the calibration windows)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, tokenizer = load_smollm2()
    heldout = token_windows(tokenizer, wiki_split("heldout"), 512, 8)
    calibration = wiki_calibration(tokenizer)  # 17 x 512 tokens: 16 fitted, the last one the report's held-out
    used = sum(batch["input_ids"].numel() for batch in calibration) // 256
    windows = token_windows(tokenizer, wiki_split("calibration"), 256, used + args.distill_windows)
    batches = list(windows[used:, : args.seq_len].split(args.batch))  # the text after the calibration windows

    student = copy.deepcopy(teacher)
    start = time.perf_counter()
    report = m2la.convert(student, compression=args.compression, calibration=calibration)
    convert_s = time.perf_counter() - start
    base = perplexity(teacher, heldout)
    before = perplexity(student, heldout)
    config = DistillConfig(steps=args.steps, lr=args.lr, trainable=args.trainable)
    result = distill(student, teacher, batches, config, progress=True)
    after = perplexity(student, heldout)
    gap_closed = (before - after) / (before - base)
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; compression {report.compression_ratio:.2f}x "
        f"({report.bytes_per_token_before} -> {report.bytes_per_token_after} B/token), converted in {convert_s:.0f} s"
    )
    print("\n| model | held-out perplexity | / original |\n|---|---:|---:|")
    print(f"| original SmolLM2-135M | {base:.3f} | 1.00x |")
    print(f"| m2la {args.compression:g}x, zero-shot | {before:.3f} | {before / base:.2f}x |")
    print(f"| m2la {args.compression:g}x, after {args.steps} distillation steps | {after:.3f} | {after / base:.2f}x |")
    print(
        f"\ngap closed: {gap_closed:.0%}; {result.trainable_parameters:,} trainable parameters ({args.trainable}), "
        f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, lr {args.lr:g}, {result.seconds:.0f} s; "
        f"KL first/last 10 steps: {sum(result.losses[:10]) / 10:.4f} / {sum(result.losses[-10:]) / 10:.4f}"
    )


if __name__ == "__main__":
    main()
