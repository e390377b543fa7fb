"""Perplexity, cache size and greedy agreement, measured on the real SmolLM2 and Wikipedia text."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from m2la.assets import wiki_split
from m2la.evaluation import (
    cache_bytes_per_token,
    cache_nbytes,
    greedy_agreement,
    greedy_generate,
    perplexity,
    token_windows,
)

# SmolLM2: 30 layers x (K and V) x 3 KV heads x 64 dims, per token.
SMOLLM2_KV_VALUES_PER_TOKEN = 30 * 2 * 3 * 64


def test_token_windows_cut_the_eos_joined_stream(smollm2):
    _, tokenizer = smollm2
    texts = ["The first article.", "A second, longer article about cats and dogs.", "Third one."] * 4
    windows = token_windows(tokenizer, texts, window=6, n_windows=3)
    assert windows.shape == (3, 6) and windows.dtype == torch.long

    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert windows.flatten().tolist() == stream[:18]
    first_article_length = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert windows.flatten()[first_article_length].item() == tokenizer.eos_token_id


def test_token_windows_refuse_too_little_text(smollm2):
    _, tokenizer = smollm2
    with pytest.raises(ValueError, match="fewer than 4 windows x 64"):
        token_windows(tokenizer, ["Only a few words."], window=64, n_windows=4)
    with pytest.raises(ValueError, match="window >= 2"):
        token_windows(tokenizer, ["text"], window=1, n_windows=1)


def test_heldout_windows_fixture(wiki_heldout_windows, smollm2):
    _, tokenizer = smollm2
    assert wiki_heldout_windows.shape == (8, 512)
    text = tokenizer.decode(wiki_heldout_windows[0, :64])
    assert text.startswith(wiki_split("heldout")[0][:40])
    assert not any(text[:40] in article for article in wiki_split("calibration"))


def test_perplexity_matches_transformers_loss_and_ignores_batching(smollm2, wiki_heldout_windows):
    model, _ = smollm2
    windows = wiki_heldout_windows[:3, :64]  # 3 windows: batch_size=2 leaves a ragged last batch
    with torch.no_grad():
        reference = math.exp(model(windows, labels=windows).loss.item())
    assert perplexity(model, windows, batch_size=1) == pytest.approx(reference, rel=1e-5)
    assert perplexity(model, windows, batch_size=2) == pytest.approx(reference, rel=1e-5)


def test_smollm2_heldout_perplexity(smollm2, wiki_heldout_windows):
    """The headline number: 8 x 512 tokens of held-out Wikipedia (measured: 14.95)."""
    model, _ = smollm2
    model.train()  # perplexity must switch to eval mode (no dropout) and restore the flag
    try:
        value = perplexity(model, wiki_heldout_windows)
        assert model.training
    finally:
        model.eval()
    assert value == pytest.approx(14.95, abs=0.05)


def test_shuffled_tokens_have_far_higher_perplexity(smollm2, wiki_heldout_windows):
    model, _ = smollm2
    windows = wiki_heldout_windows[:1, :128]
    shuffled = windows[:, torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    assert perplexity(model, shuffled) > 20 * perplexity(model, windows)


def test_kv_cache_bytes_per_token_fp32_and_bf16(smollm2, wiki_heldout_windows):
    model, _ = smollm2
    ids = wiki_heldout_windows[:2, :16]
    assert cache_bytes_per_token(model, ids) == SMOLLM2_KV_VALUES_PER_TOKEN * 4 == 46_080
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert cache_bytes_per_token(half, ids[0]) == SMOLLM2_KV_VALUES_PER_TOKEN * 2


class _FixedCacheModel(torch.nn.Module):
    """Returns a given cache object, like a model whose forward hands back a latent cache."""

    def __init__(self, cache):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.cache = cache

    def forward(self, input_ids, use_cache=False, cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5), cache=self.cache)


def test_cache_bytes_prefer_the_cache_nbytes():
    latent_cache = SimpleNamespace(nbytes=12_000, layers=[])  # layers would count 0
    model = _FixedCacheModel(latent_cache)
    assert cache_bytes_per_token(model, torch.zeros(2, 10, dtype=torch.long)) == 600.0


def test_cache_nbytes_of_legacy_tuples_and_unknown_objects():
    legacy = ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4, dtype=torch.float16)),)
    assert cache_nbytes(legacy) == 24 * 4 + 24 * 2
    with pytest.raises(TypeError, match="cannot measure a cache of type object"):
        cache_nbytes(object())


def test_greedy_generate_matches_transformers_generate(smollm2, wiki_heldout_windows):
    model, _ = smollm2
    prompts = wiki_heldout_windows[:2, :24]
    ours = greedy_generate(model, prompts, new_tokens=12)
    theirs = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, min_new_tokens=12, do_sample=False
    )
    assert torch.equal(ours, theirs[:, 24:])


def test_greedy_agreement_with_itself_and_with_a_perturbed_copy(smollm2, wiki_heldout_windows):
    model, _ = smollm2
    prompts = wiki_heldout_windows[:2, :24]
    assert greedy_agreement(model, model, prompts, new_tokens=8) == 1.0

    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in perturbed.model.layers:
            weight = layer.mlp.down_proj.weight
            weight.add_(0.1 * weight.std() * torch.randn(weight.shape, generator=generator))
    expected = (greedy_generate(model, prompts, 8) == greedy_generate(perturbed, prompts, 8)).float().mean()
    agreement = greedy_agreement(model, perturbed, prompts, new_tokens=8)
    assert agreement == pytest.approx(expected.item())
    assert agreement == 0.6875  # 11 of 16 tokens (measured; noise seeded)

    # A list of prompts of different lengths is run prompt by prompt; the counts add up.
    as_list = [prompts[0], prompts[1, :16]]
    by_prompt = [greedy_agreement(model, perturbed, [p], new_tokens=8) for p in as_list]
    assert greedy_agreement(model, perturbed, as_list, new_tokens=8) == pytest.approx(sum(by_prompt) / 2)
