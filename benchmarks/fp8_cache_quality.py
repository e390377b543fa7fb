"""Quality and size of an fp8 latent cache on the real SmolLM2-135M (CPU).

    python benchmarks/fp8_cache_quality.py [--ratios 1 4] [--windows 8]

For each conversion (ratio 1 = lossless; otherwise `compression=ratio` with the library's default
16 x 512-token calibration), held-out Wikipedia perplexity (8 x 512 tokens) scored through an
`M2LACache` that keeps its rows as they come (fp32) or in fp8 with one fp32 scale per token. Every
query attends to the rows as the cache stores them, its own chunk included, so the fp8 error is in
every token's score (a serving engine that attends to a fresh chunk unquantized errs less).
Cache bytes per token are read from the cache object after a forward.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import m2la
from m2la.assets import load_smollm2, wiki_split
from m2la.evaluation import cache_bytes_per_token, perplexity, token_windows
from m2la.integrations.hf import wiki_calibration

CACHE_DTYPES = {"as computed (fp32)": None, "fp8 e4m3": torch.float8_e4m3fn, "fp8 e5m2": torch.float8_e5m2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    original, tokenizer = load_smollm2()
    heldout = token_windows(tokenizer, wiki_split("heldout"), 512, args.windows)
    base = perplexity(original, heldout)
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; original perplexity {base:.3f} ({args.windows} x 512 held-out tokens)",
        "",
        "| conversion | latent cache | bytes / token | perplexity | / original | / same model, fp32 cache |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for ratio in args.ratios:
        model = copy.deepcopy(original)
        if ratio == 1:
            m2la.convert(model)
            name = "lossless"
        else:
            m2la.convert(model, compression=ratio, calibration=wiki_calibration(tokenizer), progress=False)
            name = f"{ratio:g}x"
        reference = None
        for label, dtype in CACHE_DTYPES.items():

            def make_cache(model=model, dtype=dtype):
                return m2la.M2LACache.for_model(model, dtype)

            ppl = perplexity(model, heldout, make_cache=make_cache)
            reference = ppl if reference is None else reference
            nbytes = cache_bytes_per_token(model, heldout[:1], make_cache=make_cache)
            lines.append(f"| {name} | {label} | {nbytes:.0f} | {ppl:.3f} | {ppl / base:.4f} | {ppl / reference:.4f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
