"""Zero-shot quality of compressed conversions of SmolLM2-135M: m2la vs TransMLA / MHA2MLA / CARE.

Every method gets the same calibration batches (Wikipedia calibration split) and the same cache budget
(bytes per token, all layers); quality is measured on the held-out split, never used for calibration:

- perplexity on ``--ppl-windows`` x 512 tokens (ratio to the unconverted model's);
- teacher-forced top-1 agreement on the same windows: share of positions whose most likely next token
  equals the unconverted model's, both reading the same true prefix (so one miss costs one token);
- greedy agreement: share of ``--new-tokens`` greedy tokens equal to the unconverted model's, over
  ``--prompts`` held-out prompts of 32 tokens (free-running, so the first divergence usually costs the rest).

Usage::

    python benchmarks/quality_smollm2.py                         # 2x 4x 8x, all methods
    python benchmarks/quality_smollm2.py --ratios 4 --methods m2la transmla --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F

import m2la
from m2la.assets import load_smollm2, wiki_split
from m2la.evaluation import greedy_generate, token_windows

METHODS = ("m2la", "transmla", "mha2mla", "care")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--calib-length", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--ppl-windows", type=int, default=8, help="held-out windows of 512 tokens")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    parser.add_argument("--json", default=None, help="write raw results as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    original, tokenizer = load_smollm2()
    heldout = wiki_split("heldout")
    ppl_ids = token_windows(tokenizer, heldout, 512, args.ppl_windows)
    skip = args.ppl_windows * 512 // 32  # prompts come from held-out text after the perplexity windows
    prompts = token_windows(tokenizer, heldout, 32, skip + args.prompts)[skip:]
    calibration = token_windows(tokenizer, wiki_split("calibration"), args.calib_length, args.calib_windows + 1)
    # the last batch (one window after the fitted ones) is held out by the converter for its error report
    batches = [calibration[i : min(i + 4, args.calib_windows)] for i in range(0, args.calib_windows, 4)]
    batches.append(calibration[args.calib_windows :])

    start = time.perf_counter()
    base_ppl, base_top1 = perplexity_and_top1(original, ppl_ids)
    base_tokens = greedy_generate(original, prompts, args.new_tokens)
    print(f"original: perplexity {base_ppl:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            report = m2la.convert(model, compression=ratio, calibration=batches, method=method)
            seconds = time.perf_counter() - t0
            ppl, top1 = perplexity_and_top1(model, ppl_ids)
            top1_agreement = (top1 == base_top1).float().mean().item()
            tokens = greedy_generate(model, prompts, args.new_tokens)
            agreement = (tokens == base_tokens).float().mean().item()
            errors = [layer.output_error for layer in report.layers if layer.output_error is not None]
            row = dict(
                ratio=ratio,
                method=method,
                achieved=report.compression_ratio,
                bytes_before=report.bytes_per_token_before,
                bytes_after=report.bytes_per_token_after,
                perplexity=ppl,
                relative_perplexity=ppl / base_ppl,
                top1_agreement=top1_agreement,
                greedy_agreement=agreement,
                mean_layer_output_error=sum(errors) / max(len(errors), 1),
                convert_seconds=seconds,
                ranks=[layer.kv_rank for layer in report.layers],
                rope_dims=[layer.rope_dim for layer in report.layers],
            )
            rows.append(row)
            print(
                f"{ratio:g}x {method:9s} ppl {ppl:9.3f} ({ppl / base_ppl:6.2f}x)  top-1 {top1_agreement:.3f}  greedy {agreement:.3f}  "
                f"converted in {seconds:.0f} s",
                flush=True,
            )
            del model

    table = _table(rows, base_ppl)
    command = "python benchmarks/quality_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = "\n".join(
        [
            f"## Compressed conversion quality, SmolLM2-135M, zero-shot ({datetime.date.today().isoformat()})",
            "",
            f"Machine: 2-core CPU, no GPU ({platform.processor() or platform.machine()}, torch {torch.__version__}). "
            f"Command: `{command.strip()}` ({time.perf_counter() - start:.0f} s in total).",
            "",
            f"Calibration: {args.calib_windows} x {args.calib_length} tokens of the Wikipedia calibration split (the same batches for "
            f"every method). Perplexity: {args.ppl_windows} x 512 held-out tokens; original {base_ppl:.3f}. Top-1 "
            "agreement: teacher-forced, over the same tokens (the most likely next token equals the original's). Greedy "
            f"agreement (free-running): {args.prompts} held-out prompts x {args.new_tokens} new tokens vs the original model. "
            "Every method gets the same cache budget (bytes per token, all layers).",
            "",
            table,
            "",
        ]
    )
    print(section)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as handle:
            handle.write("\n" + section)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(dict(base_perplexity=base_ppl, rows=rows), handle, indent=2)
    return 0


@torch.no_grad()
def perplexity_and_top1(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, torch.Tensor]:
    """exp(mean next-token NLL) over every predicted token (as ``m2la.evaluation.perplexity``) and the
    teacher-forced most likely next token at every position ``[n, window - 1]``, from one forward pass."""
    total_nll, total_tokens, top1 = 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total_nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            total_tokens += ids[:, 1:].numel()
            top1.append(logits.argmax(-1))
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens), torch.cat(top1)


def _table(rows: list[dict], base_ppl: float) -> str:
    lines = [
        "| target | method | achieved | cache B/token | perplexity | vs original | top-1 agreement | greedy agreement "
        "| mean layer out err | convert s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ratio']:g}x | {r['method']} | {r['achieved']:.2f}x | {r['bytes_before']} -> {r['bytes_after']} | "
            f"{r['perplexity']:.2f} | {r['relative_perplexity']:.2f}x | {r['top1_agreement']:.3f} | {r['greedy_agreement']:.3f} | "
            f"{r['mean_layer_output_error']:.3f} | {r['convert_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
