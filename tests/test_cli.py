"""The `m2la` command on the real SmolLM2 and held-out Wikipedia.

The convert / eval-of-a-checkpoint / info tests run the library's real `m2la.convert`,
`m2la.save_pretrained` and `m2la.from_pretrained`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from m2la.assets import smollm2_dir, wiki_split
from m2la.cli import format_table, main
from m2la.evaluation import perplexity, token_windows

SMALL_EVAL = ["--windows", "2", "--tokens", "64"]


def test_help_lists_the_subcommands_without_importing_transformers():
    code = (
        "import sys, m2la.cli\n"
        "assert 'transformers' not in sys.modules\n"
        "sys.argv = ['m2la', '--help']\n"
        "m2la.cli.main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in ("convert", "eval", "info", "bench"):
        assert command in result.stdout


def test_eval_of_a_transformers_folder_against_a_baseline(tmp_path, capsys, smollm2):
    report = tmp_path / "eval.json"
    code = main(["eval", str(smollm2_dir()), *SMALL_EVAL, "--baseline", "smollm2", "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out Wikipedia, 2 x 64 tokens" in printed
    assert "cache bytes / token   46080     46080" in printed

    result = json.loads(report.read_text())
    model, tokenizer = smollm2
    expected = perplexity(model, token_windows(tokenizer, wiki_split("heldout"), 64, 2))
    assert result["model"]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert result["model"]["cache_bytes_per_token"] == 46_080
    assert result["model"]["m2la"] is False
    assert result["baseline"]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert result["ratio"] == {"perplexity": pytest.approx(1.0), "cache_bytes_per_token": 1.0}


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err
    assert "m2la eval: error: no model at" in error and "Traceback" not in error

    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"\0")
    assert main(["eval", str(not_a_model)]) == 1
    assert "not a .gguf file" in capsys.readouterr().err

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("user data")
    assert main(["convert", str(occupied)]) == 1
    assert "is not an m2la checkpoint; pass --overwrite" in capsys.readouterr().err
    assert (occupied / "keep.txt").read_text() == "user data"

    assert main(["convert", "a", "b", "c"]) == 1
    assert "at most two paths" in capsys.readouterr().err


def test_format_table_aligns_columns():
    table = format_table([["", "model"], ["perplexity", "14.953"], ["cache bytes / token", "46080"]])
    assert table.splitlines() == [
        " " * 22 + "model",
        "perplexity" + " " * 11 + "14.953",
        "cache bytes / token   46080",
    ]


# --- real conversion through the library API -------------------------------------------------


@pytest.fixture(scope="module")
def converted_smollm2(tmp_path_factory):
    """`m2la convert OUT` with the default source (the bundled SmolLM2), lossless."""
    out = tmp_path_factory.mktemp("cli") / "smollm2-m2la"
    assert main(["convert", str(out), "--no-progress"]) == 0
    return out


def test_convert_default_smollm2_writes_an_m2la_checkpoint(converted_smollm2):
    config = json.loads((converted_smollm2 / "config.json").read_text())
    assert "m2la" in config and len(config["m2la"]["layers"]) == 30
    assert (converted_smollm2 / "tokenizer.json").is_file()


def test_convert_replaces_its_own_previous_output(converted_smollm2, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for file in ("config.json", "tokenizer.json"):  # looks like an earlier m2la output
        (out / file).write_text((converted_smollm2 / file).read_text())
    (out / "stale.txt").write_text("from the earlier run")
    assert main(["convert", str(out), "--no-progress"]) == 0
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").stat().st_size > 500_000_000


def test_eval_of_lossless_checkpoint_matches_the_original(converted_smollm2, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code = main(["eval", str(converted_smollm2), *SMALL_EVAL, "--baseline", "smollm2", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(report.read_text())
    assert result["model"]["m2la"] is True
    assert result["model"]["cache_bytes_per_token"] == 46_080  # lossless: same bytes as K/V
    assert result["ratio"]["perplexity"] == pytest.approx(1.0, abs=1e-4)


def test_info_lists_every_layer(converted_smollm2, capsys):
    assert main(["info", str(converted_smollm2)]) == 0
    printed = capsys.readouterr().out
    assert "(30 M²LA layers)" in printed
    assert "model.layers.29.self_attn" in printed
    assert "cache bytes per token, all layers: 46080" in printed


def _record_convert(monkeypatch, error: Exception | None = None) -> list[dict]:
    """Replace m2la.convert (a real compressed conversion takes minutes) with a recorder."""
    import m2la

    calls = []
    lossless_convert = m2la.convert

    def recording_convert(model, **kwargs):
        calls.append(kwargs)
        if error is not None:
            raise error
        return lossless_convert(model)  # so save_pretrained gets a really converted model

    monkeypatch.setattr(m2la, "convert", recording_convert)
    return calls


def test_compression_options_reach_the_library(tmp_path, monkeypatch, smollm2):
    calls = _record_convert(monkeypatch)
    out = tmp_path / "rank64"
    args = ["convert", str(out), "--kv-rank", "64", "--rope-dim", "32", "--method", "transmla"]
    assert main([*args, "--calib-tokens", "600", "--calib-window", "256", "--no-progress"]) == 0
    (kwargs,) = calls
    assert (kwargs["kv_rank"], kwargs["rope_dim"], kwargs["compression"]) == (64, 32, None)
    assert kwargs["method"] == "transmla" and kwargs["progress"] is False
    assert kwargs["tokenizer"].eos_token == "<|im_end|>"
    batches = kwargs["calibration"]  # 600 tokens -> 3 windows of 256 (batches of 4), then 1 held-out window
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(3, 256), (1, 256)]
    _, tokenizer = smollm2
    first_calibration_article = wiki_split("calibration")[0]
    assert tokenizer.decode(batches[0]["input_ids"][0, :20]) == tokenizer.decode(
        tokenizer(first_calibration_article, add_special_tokens=False)["input_ids"][:20]
    )
    assert (out / "config.json").is_file()


def test_wiki_calibration_holds_out_one_window_after_the_fitted_ones(smollm2):
    import torch

    from m2la.integrations.hf import wiki_calibration

    _, tokenizer = smollm2
    batches = wiki_calibration(tokenizer, windows=5, length=64, batch_size=2)
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(2, 64), (2, 64), (1, 64), (1, 64)]
    expected = token_windows(tokenizer, wiki_split("calibration"), 64, 6)
    assert torch.equal(torch.cat([batch["input_ids"] for batch in batches]), expected)
    with pytest.raises(ValueError, match="windows >= 1"):
        wiki_calibration(tokenizer, windows=0)


def test_compression_without_calibration_leaves_the_default_to_the_library(tmp_path, monkeypatch):
    calls = _record_convert(monkeypatch)
    assert main(["convert", str(tmp_path / "x4"), "--compression", "4", "--no-progress"]) == 0
    (kwargs,) = calls
    assert kwargs["compression"] == 4.0 and "calibration" not in kwargs and kwargs["tokenizer"] is not None


def test_lossless_convert_passes_no_compression_arguments(tmp_path, monkeypatch, capsys):
    calls = _record_convert(monkeypatch)
    assert main(["convert", str(tmp_path / "lossless"), "--no-progress"]) == 0
    assert calls == [{"progress": False}]
    assert main(["convert", str(tmp_path / "bad"), "--calib-tokens", "512"]) == 1
    assert "apply to a compressed conversion" in capsys.readouterr().err
    assert len(calls) == 1  # refused before loading or converting anything


def test_library_errors_surface_as_one_line(tmp_path, monkeypatch, capsys):
    _record_convert(monkeypatch, NotImplementedError("method 'care' is not implemented yet"))
    out = tmp_path / "care"
    assert main(["convert", str(out), "--kv-rank", "64", "--method", "care", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == "m2la convert: error: method 'care' is not implemented yet"
    assert "Traceback" not in error
    assert not out.exists()


def test_gguf_sources_are_dequantised_in_the_requested_dtype(tmp_path, monkeypatch):
    import torch

    from m2la import assets, cli

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls = []

    def fake_load_gguf(path, dtype):
        calls.append((path, dtype))
        return torch.nn.Linear(1, 1), "tokenizer"

    monkeypatch.setattr(assets, "load_gguf", fake_load_gguf)
    loaded = cli.load_model(str(gguf_file), "bfloat16")
    assert calls == [(gguf_file, torch.bfloat16)]
    assert (loaded.tokenizer, loaded.is_m2la) == ("tokenizer", False)
    cli.load_model(str(gguf_file))
    assert calls[-1] == (gguf_file, torch.float32)  # GGUF weights dequantise to fp32 by default


def test_eval_with_an_fp8_latent_cache(converted_smollm2, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code = main(["eval", str(converted_smollm2), *SMALL_EVAL, "--cache-dtype", "float8_e4m3fn", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(report.read_text())
    assert result["model"]["cache_dtype"] == "float8_e4m3fn"
    assert result["model"]["cache_bytes_per_token"] == 30 * (384 + 4)  # fp8 rows + one fp32 scale per token
    assert "latent cache in float8_e4m3fn" in capsys.readouterr().out
    assert main(["eval", "smollm2", *SMALL_EVAL, "--cache-dtype", "float8_e4m3fn"]) == 1
    assert "--cache-dtype applies to m2la models" in capsys.readouterr().err
