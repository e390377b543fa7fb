"""Tiny random transformers models of every supported family, with awkward sizes."""

from __future__ import annotations

import torch

IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 5, 4, 7, 6
VOCAB = 97
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _text(heads: int, kv_heads: int, head_dim: int, layers: int = 2, **extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=56,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **extra,
    )


def build(family: str, heads: int = 6, kv_heads: int = 2, head_dim: int = 12, seed: int = 0, layers: int = 2):
    """Returns an eval-mode fp32 model with random weights (biases and norms randomised too).

    ``layers`` applies to the text families; the VL models always have 2 decoder layers.
    """
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_text(heads, kv_heads, head_dim, layers, attention_bias=True)))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_text(heads, kv_heads, head_dim, layers, sliding_window=5)))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_text(heads, kv_heads, head_dim, layers)))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_text(heads, kv_heads, head_dim, layers)))
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        model = _build_vl(family, heads, kv_heads, head_dim)
    else:
        raise ValueError(family)
    with torch.no_grad():  # random biases and norm gains, so the conversion must carry them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _build_vl(family, heads, kv_heads, head_dim):  # noqa: C901
    import transformers as tf

    tokens = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    pairs = head_dim // 2
    if family == "qwen3_vl":
        sections = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
        text = _text(
            heads,
            kv_heads,
            head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": sections,
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            patch_size=4,
            out_hidden_size=heads * head_dim,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            temporal_patch_size=2,
        )
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        return tf.Qwen3VLForConditionalGeneration(config)
    sections = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    text = _text(
        heads,
        kv_heads,
        head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=1, embed_dim=32, hidden_size=heads * head_dim, num_heads=2, patch_size=4, temporal_patch_size=2
        )
        return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=4,
        out_hidden_size=heads * head_dim,
        temporal_patch_size=2,
        fullatt_block_indexes=[0],
        window_size=16,
    )
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))


def image_inputs(model, batch: int = 1, grid_h: int = 4, grid_w: int = 6, text_before: int = 3, text_after: int = 4):
    """input_ids with one image (grid in patches, merged 2x2) plus pixel values for a VL model."""
    vision = model.config.vision_config
    patch, temporal = vision.patch_size, vision.temporal_patch_size
    n_patches = grid_h * grid_w
    n_tokens = n_patches // 4
    g = torch.Generator().manual_seed(3)
    ids = []
    for _ in range(batch):
        before = torch.randint(10, VOCAB, (text_before,), generator=g)
        after = torch.randint(10, VOCAB, (text_after,), generator=g)
        ids.append(
            torch.cat(
                [
                    before,
                    torch.tensor([VISION_START]),
                    torch.full((n_tokens,), IMAGE_TOKEN),
                    torch.tensor([VISION_END]),
                    after,
                ]
            )
        )
    input_ids = torch.stack(ids)
    pixel_values = torch.randn(batch * n_patches, 3 * temporal * patch * patch, generator=g)
    grid = torch.tensor([[1, grid_h, grid_w]] * batch)
    inputs = dict(
        input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, attention_mask=torch.ones_like(input_ids)
    )
    inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    return inputs


def family_inputs(model, family: str, batch: int, length: int) -> dict:
    """Model inputs for `family`: image + text for the VL families, else `[batch, length]` random ids."""
    if family.endswith("_vl"):
        return image_inputs(model, batch=batch)
    return dict(input_ids=torch.randint(10, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7)))


def left_padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """3 sequences of 9 ids padded (id 0) on the left by 4, 1 and 0 tokens -> (ids, attention mask)."""
    ids = torch.randint(10, VOCAB, (3, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask
