"""Lossless conversion of transformers models: every family, the latent cache, persistence, errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf  # noqa: E402

import m2la  # noqa: E402
import tiny_hf  # noqa: E402
from m2la.integrations import hf  # noqa: E402

FAMILIES = tiny_hf.FAMILIES
TEXT_FAMILIES = FAMILIES[:4]
SHAPES = {  # (query heads, KV heads, head_dim): GQA ratios 1, 3 and 7, odd counts, head_dim 48
    "mha": (3, 3, 16),
    "gqa3": (9, 3, 12),
    "gqa7-d48": (7, 1, 48),
}


def _inputs(model, family, batch=2, length=13):
    return tiny_hf.family_inputs(model, family, batch, length)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_logits(family, shape):
    model = tiny_hf.build(family, *SHAPES[shape])
    inputs = _inputs(model, family)
    with torch.no_grad():
        expected = model(**inputs).logits
    report = m2la.convert(model)
    assert report.lossless and report.compression_ratio == 1.0
    assert (
        sum(isinstance(m, m2la.M2LAttention) for m in model.modules())
        == model.config.get_text_config().num_hidden_layers
    )
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(out.cache, m2la.M2LACache)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_identical_and_cache_is_latent(family):
    model = tiny_hf.build(family)
    inputs = _inputs(model, family, batch=1)
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    m2la.convert(model)
    cache = m2la.M2LACache(model.config.get_text_config().num_hidden_layers)
    got = model.generate(**inputs, max_new_tokens=12, do_sample=False, cache=cache)
    assert torch.equal(got, expected)
    # default generate (no cache passed) also runs on the latent cache and gives the same tokens
    assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), expected)
    text = model.config.get_text_config()
    tokens = got.shape[1] - 1  # the last token is never fed back
    per_layer = [m.config.cache_width for m in model.modules() if isinstance(m, m2la.M2LAttention)]
    for layer, width in zip(cache.layers, per_layer, strict=True):
        assert layer.keys.shape == (1, tokens, width)  # only [latent | rope key] rows
        assert layer.values.numel() == 0
    assert cache.nbytes == tokens * sum(per_layer) * 4
    assert sum(per_layer) == text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_left_padded_batch_generate(family):
    model = tiny_hf.build(family)
    ids, mask = tiny_hf.left_padded_ids()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    m2la.convert(model)
    assert torch.equal(model.generate(**kwargs), expected)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], ref_logits[mask.bool()], rtol=1e-5, atol=1e-5)


def test_reusing_cache_across_calls():
    model = tiny_hf.build("qwen3", 6, 2, 12)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        m2la.convert(model)
        first = model(ids[:, :9], use_cache=True)
        second = model(ids[:, 9:12], cache=first.cache, use_cache=True)
        third = model(ids[:, 12:], cache=second.cache, use_cache=True)
    assert third.cache is first.cache and third.cache.get_seq_length() == 15
    got = torch.cat([first.logits, second.logits, third.logits], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_steps_write_the_cache_in_place_and_crop_rewrites():
    """After one regrowth, decode steps write each layer's row in place (no per-step copy of the
    cache); a crop (assisted decoding's rollback) then appends over the dropped rows, exactly."""
    model = tiny_hf.build("qwen3", 6, 2, 12)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
        m2la.convert(model)
        out = model(ids[:, :9], use_cache=True)
        cache, logits, pointers = out.cache, [out.logits], []
        for step in range(9, 16):
            logits.append(model(ids[:, step : step + 1], cache=cache, use_cache=True).logits)
            pointers.append([layer.keys.data_ptr() for layer in cache.layers])
        torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=1e-5, atol=1e-5)
        assert all(p == pointers[0] for p in pointers)  # steps 10-16 all wrote into one buffer per layer
        assert cache.nbytes < cache.reserved_nbytes
        cache.crop(-4)  # keep 12 of 16
        redo = model(ids[:, 12:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(redo, expected[:, 12:], rtol=1e-5, atol=1e-5)
        assert [layer.keys.data_ptr() for layer in cache.layers] == pointers[0]


def test_reorder_releases_the_buffer_and_the_next_step_regrows():
    layer = hf.LatentCacheLayer()
    with torch.inference_mode():
        for length in (5, 1, 1):
            layer.update(torch.randn(2, length, 4), torch.randn(2, length, 0))
        buffer = layer._keys_buffer
        assert buffer.shape[1] > 7 and layer.keys.data_ptr() == buffer.data_ptr()
        expected = layer.keys.flip(0)
        layer.reorder_cache(torch.tensor([1, 0]))
        assert layer._keys_buffer is None and layer._values_buffer is None  # no stale buffer kept alive
        assert torch.equal(layer.keys, expected)
        step = torch.randn(2, 1, 4)
        keys, _ = layer.update(step, step[..., :0])
        assert torch.equal(keys, torch.cat((expected, step), dim=1)) and layer._keys_buffer.shape[1] > 8
        layer.crop(-2)
        assert layer._keys_buffer is not None and layer.keys.shape[1] == 6  # a crop keeps the buffer


def test_beam_search_matches_original():
    model = tiny_hf.build("llama", 6, 2, 12)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    kwargs = dict(input_ids=ids, max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    expected = model.generate(**kwargs)
    m2la.convert(model)
    assert torch.equal(model.generate(**kwargs), expected)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_standalone_mrope_matches_host_tables(family):
    """The per-pair (inv_freq, axis) kept in the config reproduce the host's M-RoPE cos/sin."""
    model = tiny_hf.build(family, 6, 2, 12)
    decoder = hf._decoder(model)
    positions = torch.randint(0, 40, (3, 2, 11))
    host_cos, host_sin = decoder.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    m2la.convert(model)
    layer = next(m for m in model.modules() if isinstance(m, m2la.M2LAttention))
    cos, sin = layer.rope_cos_sin(positions)
    columns = layer.rope_source_column
    torch.testing.assert_close(cos, host_cos[..., columns], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(sin, host_sin[..., columns], rtol=1e-5, atol=2e-5)
    assert set(layer.rope_axis.tolist()) == {0, 1, 2}


def test_rope_columns_copied_once_per_device():
    """The host's cos/sin columns each pair reads are copied to the host's device once, not once a
    layer a step (a host-to-device copy each), and again only when the table itself changes."""
    model = tiny_hf.build("llama", 3, 1, 16)
    m2la.convert(model)
    attention = next(m for m in model.modules() if isinstance(m, hf.HFM2LAttention))
    ids = torch.randint(10, tiny_hf.VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    other = torch.device("meta")  # a device the table is not on: `.to` makes a new tensor each time
    first = attention._rope_columns_on(other)
    assert first.device == other and attention._rope_columns_on(other) is first
    attention.rope_source_column = attention.rope_source_column.flip(0)
    assert attention._rope_columns_on(other) is not first
    assert torch.equal(attention._rope_columns_on(torch.device("cpu")), attention.rope_source_column)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_5_vl"])
def test_save_load_round_trip(tmp_path, family):
    model = tiny_hf.build(family)
    inputs = _inputs(model, family)
    report = m2la.convert(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    m2la.save_pretrained(model, tmp_path / "ckpt", report=report)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", hf.REPORT_FILE} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert len(saved["m2la"]["layers"]) == model.config.get_text_config().num_hidden_layers
    loaded = m2la.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    # the instance's own save_pretrained is the atomic writer too, and overwrites in place
    loaded.save_pretrained(tmp_path / "ckpt")
    again = m2la.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected, rtol=0, atol=0)


def test_save_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_hf.build("llama")
    m2la.convert(model)
    target = m2la.save_pretrained(model, tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()

    class Exploding:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        m2la.save_pretrained(model, target, tokenizer=Exploding())
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unsupported_architecture_names_supported_ones():
    config = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(m2la.UnsupportedModelError, match="gpt2.*supported: llama, mistral"):
        m2la.convert(tf.GPT2LMHeadModel(config))


def test_already_converted_raises():
    model = tiny_hf.build("llama")
    m2la.convert(model)
    with pytest.raises(m2la.UnsupportedModelError, match="already converted"):
        m2la.convert(model)


def test_compression_options_need_a_compression_target():
    model = tiny_hf.build("llama")
    with pytest.raises(m2la.ConversionError, match="only apply to a compressed conversion"):
        m2la.convert(model, method="transmla")
    assert not any(isinstance(m, m2la.M2LAttention) for m in model.modules())


def test_foreign_filled_cache_is_refused():
    model = tiny_hf.build("llama")
    ids = torch.randint(10, tiny_hf.VOCAB, (1, 5))
    with torch.no_grad():
        dense = model(ids, use_cache=True).cache
    m2la.convert(model)
    with pytest.raises(TypeError, match="decompressed keys/values"), torch.no_grad():
        model(ids, cache=dense)


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    model = tiny_hf.build("llama")
    m2la.convert(model)
    ckpt = m2la.save_pretrained(model, tmp_path / "ok")
    weights = ckpt / "model.safetensors"

    truncated = tmp_path / "truncated"
    m2la.save_pretrained(model, truncated)
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(m2la.M2LACheckpointError, match="corrupt or unreadable safetensors"):
        m2la.from_pretrained(truncated)

    mismatched = tmp_path / "mismatched"
    m2la.save_pretrained(model, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["m2la"]["layers"][0]["kv_rank"] += 8
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(m2la.M2LACheckpointError, match="does not match its m2la config"):
        m2la.from_pretrained(mismatched)

    plain = tmp_path / "plain"
    tiny_hf.build("llama").save_pretrained(plain)
    with pytest.raises(m2la.M2LACheckpointError, match="not an m2la checkpoint"):
        m2la.from_pretrained(plain)

    bad_field = tmp_path / "bad_field"
    m2la.save_pretrained(model, bad_field)
    config = json.loads((bad_field / "config.json").read_text())
    config["m2la"]["layers"][1]["rope_dim"] = 7
    (bad_field / "config.json").write_text(json.dumps(config))
    with pytest.raises(m2la.M2LACheckpointError, match="rope_dim must be even"):
        m2la.from_pretrained(bad_field)

    missing = tmp_path / "missing"
    m2la.save_pretrained(model, missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(m2la.M2LACheckpointError, match="no model.safetensors"):
        m2la.from_pretrained(missing)


def test_report_table_and_json(tmp_path):
    model = tiny_hf.build("qwen3", 9, 3, 12)
    report = m2la.convert(model)
    table = report.to_table()
    assert "lossless" in table and "1.00x" in table
    report.save_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["bytes_per_token_before"] == data["bytes_per_token_after"] == 2 * 2 * 3 * 12 * 4
    assert [layer["kv_rank"] for layer in data["layers"]] == [36, 36]


def test_from_pretrained_resolves_hub_ids_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    model = tiny_hf.build("llama")
    m2la.convert(model)
    folder = m2la.save_pretrained(model, tmp_path / "snapshot")
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = m2la.from_pretrained("some-org/some-m2la-model")
    assert asked == ["some-org/some-m2la-model"]
    ids = torch.randint(10, tiny_hf.VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_latent_cache_generate_and_beam_search(fp8):
    """An fp8 M2LACache holds rows + per-token scales (1 byte + 4 per token row), gives logits close
    to the fp32 cache's, and survives beam search's reorder and generate's bookkeeping."""
    model = tiny_hf.build("qwen3", 6, 2, 12)
    m2la.convert(model)
    ids = torch.randint(10, tiny_hf.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = model(ids, cache=m2la.M2LACache.for_model(model), use_cache=True)
        quantized = model(ids, cache=m2la.M2LACache.for_model(model, fp8), use_cache=True)
    widths = [m.config.cache_width for m in model.modules() if isinstance(m, m2la.M2LAttention)]
    assert quantized.cache.nbytes == 2 * 11 * sum(w + 4 for w in widths)
    assert exact.cache.nbytes == 2 * 11 * sum(4 * w for w in widths)
    difference = (quantized.logits - exact.logits).abs().max().item()
    assert 0 < difference < 0.1 * exact.logits.abs().max().item()
    cache = m2la.M2LACache.for_model(model, fp8)
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, num_beams=3, cache=cache)
    assert out.shape == (2, 16)
    assert all(layer.keys.dtype == fp8 and layer.values.shape[-1] == 1 for layer in cache.layers)


def test_cache_for_model_needs_a_converted_model():
    with pytest.raises(ValueError, match="no m2la attention layers"):
        m2la.M2LACache.for_model(tiny_hf.build("llama"))
    with pytest.raises(ValueError, match="latent cache dtype"):
        m2la.M2LACache(2, dtype=torch.bfloat16)
