"""Sweep m2la's score-error weight (``key_weight``) on SmolLM2-135M at given compression ratios.

Each ``RATIO:WEIGHT`` spec converts a fresh copy with the quality benchmark's calibration batches and
prints held-out perplexity (the quality benchmark's 8 x 512 held-out tokens) and validation
perplexity (8 x 512 calibration-split tokens after the 4,096 fitted ones, never fitted on), both
relative to the original model. Defaults are chosen on the validation column.

    python benchmarks/key_weight_sweep.py 2:5 2:8 4:5 8:3 8:5
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import m2la
from m2la.assets import load_smollm2, wiki_split
from m2la.evaluation import token_windows
from quality_smollm2 import perplexity_and_top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="RATIO:KEY_WEIGHT, e.g. 8:3")
    args = parser.parse_args()
    torch.manual_seed(0)
    original, tokenizer = load_smollm2()
    heldout_ids = token_windows(tokenizer, wiki_split("heldout"), 512, 8)
    calibration_text = wiki_split("calibration")
    calibration = token_windows(tokenizer, calibration_text, 256, 16)  # tokens 0-4095: fitted
    validation_ids = token_windows(tokenizer, calibration_text, 512, 16)[8:16]  # tokens 4096-8191
    batches = [calibration[i : i + 4] for i in range(0, 16, 4)] + [calibration[:1, :128]]
    base_heldout, _ = perplexity_and_top1(original, heldout_ids)
    base_validation, _ = perplexity_and_top1(original, validation_ids)
    print(f"original: held-out {base_heldout:.3f}, validation {base_validation:.3f}", flush=True)
    for spec in args.specs:
        ratio, weight = (float(x) for x in spec.split(":"))
        model = copy.deepcopy(original)
        start = time.perf_counter()
        m2la.convert(model, compression=ratio, calibration=batches, key_weight=weight)
        heldout, _ = perplexity_and_top1(model, heldout_ids)
        validation, _ = perplexity_and_top1(model, validation_ids)
        row = dict(
            ratio=ratio,
            key_weight=weight,
            heldout=heldout / base_heldout,
            validation=validation / base_validation,
            seconds=round(time.perf_counter() - start),
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
