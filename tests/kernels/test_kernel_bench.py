"""m2la.kernels.bench and `m2la bench`: the row accounting against hand counts, the correctness gate
before timing, side-by-side rows, and the Triton path under the interpreter."""

from __future__ import annotations

import json

import pytest
import torch

import m2la.kernels
from m2la.cli import main
from m2la.kernels import bench

# 3 heads over one GQA KV head of 32; latent 44 + RoPE 12 (no power of two), pages of 16
TINY = bench.BenchShape(heads=3, kv_rank=44, rope_dim=12, nope_dim=20, value_dim=24, kv_heads=1, head_dim=32,
                        block_size=16)  # fmt: skip
TINY_ARGS = ["--heads", "3", "--kv-rank", "44", "--rope-dim", "12", "--nope-dim", "20", "--value-dim", "24",
             "--gqa", "1x32", "--page-size", "16", "--repeats", "1", "--device", "cpu"]  # fmt: skip


def test_the_default_shape_is_the_issue_comparison():
    """Qwen3-VL-8B's GQA cache (8 x 128 keys and values) is twice InternVideo3's 896 + 128 latent."""
    shape = bench.BenchShape()
    assert shape.latent_row_bytes(torch.bfloat16) == 1024 * 2
    assert shape.gqa_row_bytes(torch.bfloat16) == 2 * 8 * 128 * 2
    assert shape.latent_row_bytes(torch.bfloat16, fp8=True) == 1024 + 4
    assert shape.softmax_scale == pytest.approx(256**-0.5)
    # 32 heads x (scores over 1024 + values over 896) x 2 FLOP, per key
    assert bench.latent_decode_flops(1, 1, 896, 128, 32) == 2 * 32 * (1024 + 896)
    assert bench.gqa_decode_flops(3, 5, 128, 32) == 2 * 32 * 15 * 256


@pytest.mark.parametrize("chunk,prefix", [(1, 0), (3, 2), (63, 0), (7, 113)])
def test_causal_pairs_count_the_visible_pairs(chunk, prefix):
    query = torch.arange(chunk)[:, None] + prefix
    visible = torch.arange(prefix + chunk)[None, :] <= query
    assert bench.causal_pairs(chunk, prefix) == int(visible.sum())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_dim=13), "must be even"),
        (dict(heads=12, kv_heads=8), "multiple of kv_heads"),
        (dict(kv_rank=0), "kv_rank must be at least 1"),
        (dict(nope_dim=-1), "nope_dim must be at least 0"),
    ],
)
def test_bad_shapes_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.BenchShape(**kwargs)


def test_lossless_shape():
    assert bench.lossless_shape(bench.BenchShape()) == bench.BenchShape(kv_rank=1024, rope_dim=1024, nope_dim=0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        bench.lossless_shape(bench.BenchShape(heads=3, kv_heads=1, head_dim=45))


def test_decode_rows_side_by_side():
    """Each (batch, context) gets our row and the SDPA row; bytes are the cache rows plus the
    queries and outputs, and the ratio is the baseline's time over ours."""
    report = bench.decode_benchmark(TINY, batches=(1, 2), contexts=(63, 17), dtype=torch.float32, device="cpu",
                                    backend="reference", repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    ours = [r for r in report.rows if r.kernel.startswith("m2la")]
    sdpa = [r for r in report.rows if r.kernel == "SDPA over the GQA cache"]
    assert [(r.batch, r.context) for r in ours] == [(1, 63), (2, 63), (1, 17), (2, 17)]
    assert [(r.batch, r.context) for r in sdpa] == [(r.batch, r.context) for r in ours]
    for row, base in zip(ours, sdpa, strict=True):
        b, s = row.batch, row.context
        assert row.nbytes == b * s * 56 * 4 + b * 3 * (56 + 44) * 4
        assert base.nbytes == b * s * 2 * 32 * 4 + 2 * b * 3 * 32 * 4
        assert row.flops == 2 * 3 * b * s * (2 * 44 + 12)
        assert row.ms > 0 and row.timing == "wall"
        assert report.speedup(row) == pytest.approx(base.ms / row.ms)
        assert report.speedup(base) is None
    assert report.checks and "m2la decode (reference)" in report.checks[0]
    table = report.to_markdown()
    assert table.count("| m2la latent decode (reference) |") == 4 and "x vs SDPA over the GQA cache" in table
    assert report.notes == [bench.REFERENCE_NOTE] and bench.REFERENCE_NOTE in table  # not a speed claim
    assert json.loads(json.dumps(report.to_json()))["rows"][0]["speedup"] == pytest.approx(report.speedup(ours[0]))


def test_prefill_rows_side_by_side():
    report = bench.prefill_benchmark(TINY, chunk=13, prefixes=(0, 20), dtype=torch.float32, device="cpu",
                                     backend="reference", repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    kernels = [r.kernel for r in report.rows]
    assert kernels == ["m2la latent prefill (reference)", "SDPA over expanded K/V", "SDPA over the GQA cache"] * 2
    ours, expanded = report.rows[3], report.rows[4]
    pairs = 13 * 20 + 13 * 14 // 2
    assert (
        ours.context == 20 and ours.new_tokens == 13 and ours.flops == expanded.flops == 2 * 3 * pairs * (20 + 12 + 24)
    )
    assert expanded.nbytes == 3 * 33 * (20 + 12 + 24) * 4 + 13 * 3 * (20 + 12 + 24) * 4  # K and V; q and out
    assert report.speedup(ours) == pytest.approx(expanded.ms / ours.ms)


def test_rows_against_the_measured_gemm_roof():
    """The compute side of the roofline: a dense GEMM timed in the report's dtype (CUDA only; on CPU
    the reference rows measure no kernel speed), each row's TFLOPS as a share of it."""
    assert bench.gemm_tflops(torch.device("cpu"), torch.float32, size=96) > 0
    report = bench.prefill_benchmark(TINY, chunk=13, prefixes=(20,), dtype=torch.float32, device="cpu",
                                     backend="reference", repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    assert report.gemm_tflops is None and report.gemm_share(report.rows[0]) is None  # not measured off CUDA
    report.gemm_tflops = 2 * report.rows[0].tflops
    assert report.gemm_share(report.rows[0]) == pytest.approx(50.0)
    table = report.to_markdown()
    assert f"dense GEMM {report.gemm_tflops:.0f} TFLOPS" in table and "| TFLOPS | % of GEMM |" in table
    assert json.loads(json.dumps(report.to_json()))["rows"][0]["gemm_percent"] == pytest.approx(50.0)


def _first_call_off_by_a_percent(real):
    """`decode_attention` whose first call (the benchmark's kernel under check) is 1% off."""
    calls = []

    def decode_attention(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        calls.append(None)
        return (out * 1.01, lse) if len(calls) == 1 else (out, lse)

    return decode_attention


def test_a_kernel_over_its_error_budget_is_never_timed(monkeypatch, capsys):
    """The gate: an fp16 kernel 1% off fails against 2x the error of torch's fp16 run, and the CLI
    reports it instead of a table."""
    real = m2la.kernels.decode_attention
    monkeypatch.setattr(m2la.kernels, "decode_attention", _first_call_off_by_a_percent(real))
    with pytest.raises(AssertionError, match=r"m2la decode \(reference\): max error .* over the budget"):
        bench.decode_benchmark(TINY, batches=(1,), contexts=(5,), dtype=torch.float16, device="cpu",
                               backend="reference", repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    monkeypatch.setattr(m2la.kernels, "decode_attention", _first_call_off_by_a_percent(real))
    assert main(["bench", "decode", *TINY_ARGS, "--dtype", "float16", "--context", "5", "--batch", "1"]) == 1
    captured = capsys.readouterr()
    assert "correctness check failed" in captured.err and "| kernel |" not in captured.out


def test_error_budget_refuses_nan():
    fp32 = torch.ones(4)
    with pytest.raises(AssertionError, match="budget"):
        bench.check_within_budget("k", torch.tensor([1.0, float("nan"), 1.0, 1.0]), fp32, fp32)


def test_bench_cli_writes_the_report(tmp_path, capsys):
    path = tmp_path / "out" / "decode.json"
    assert main(["bench", "decode", *TINY_ARGS, "--batch", "1,2", "--context", "63", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and printed.count("| SDPA over the GQA cache |") == 2
    report = json.loads(path.read_text())
    assert report["kind"] == "decode" and report["shape"]["kv_rank"] == 44 and len(report["rows"]) == 4
    assert [p.name for p in path.parent.iterdir()] == ["decode.json"]  # no temporary file left behind


def test_bench_cli_errors(monkeypatch, capsys):
    assert main(["bench", "prefill", *TINY_ARGS, "--vllm-kernel", "x.py"]) == 1
    assert "--vllm-kernel is a decode option" in capsys.readouterr().err
    assert main(["bench", "decode", *TINY_ARGS, "--context", "0"]) == 1
    assert "contexts must be at least 1, got [0]" in capsys.readouterr().err
    for option, name in (("--batch", "batches"), ("--chunk", "chunk")):
        assert main(["bench", "prefill", *TINY_ARGS, option, "0"]) == 1
        assert f"{name} must be at least 1, got [0]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"prefixes must be at least 0, got \[\]"):
        bench.prefill_benchmark(TINY, prefixes=(), device="cpu")
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--gqa", "8by128"])
    assert "KV_HEADSxHEAD_DIM" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--batch", "1,x"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton by name on CPU, no interpreter: refused
    assert main(["bench", "decode", *TINY_ARGS, "--backend", "triton", "--context", "5"]) == 1
    assert "needs CUDA tensors" in capsys.readouterr().err


def test_triton_rows_under_the_interpreter():
    """The Triton kernels pass the gate and are timed (fp16 decode with an fp8 cache; fp32 prefill of
    two sequences)."""
    decode = bench.decode_benchmark(TINY, batches=(2,), contexts=(63,), dtype=torch.float16, device="cpu",
                                    backend="triton", fp8=True, repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    assert "m2la decode (triton)" in decode.checks[0] and "interpreter" in decode.notes[0]
    assert decode.rows[0].kernel == "m2la latent decode (triton, fp8 e4m3 cache)"
    assert decode.rows[0].nbytes == 2 * 63 * (56 + 4) + 2 * 3 * 100 * 2
    prefill = bench.prefill_benchmark(TINY, chunk=9, prefixes=(21,), batches=(2,), dtype=torch.float32,
                                      device="cpu", backend="triton", repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    assert "m2la prefill (triton)" in prefill.checks[0] and prefill.rows[0].ms > 0


class VllmStandIn:
    """vLLM's `decode_attention_fwd` contract in plain torch (`is_mla=True`): `q [b, h, d]`, key
    cache `[blocks, page, 1, d]` with V its first columns, results written into `out [b, h, r]`
    and `lse [b, h]`; `scale_out` scales the output (1: right, else a broken kernel)."""

    def __init__(self, scale_out=1.0):
        self.scale_out, self.calls = scale_out, 0

    def decode_attention_fwd(self, q, k_buffer, v_buffer, out, lse, block_table, seqlens, logits, splits, scale,
                             page_size, is_mla):  # fmt: skip
        assert is_mla and k_buffer.dim() == 4 and k_buffer.shape[2] == 1 and logits.shape[2] == splits
        self.calls += 1
        for row, length in enumerate(seqlens.tolist()):
            keys = k_buffer[block_table[row].long(), :, 0].flatten(0, 1)[:length].float()  # [s, d]
            scores = torch.einsum("hd,sd->hs", q[row].float(), keys) * scale
            out[row] = (scores.softmax(-1) @ keys[:, : v_buffer.shape[-1]] * self.scale_out).to(out.dtype)
            lse[row] = torch.logsumexp(scores, -1).to(lse.dtype)


def test_vllm_decode_is_timed_beside_ours_once_it_passes_the_gate():
    """Given vLLM's kernel, its rows sit beside ours on the same cache; one over the error budget
    or an fp8 cache (which it does not read) gets a note instead of rows."""
    run = dict(batches=(2,), contexts=(40,), dtype=torch.float16, device="cpu", backend="reference", repeats=1,
               bandwidth_gbs=10.0)  # fmt: skip
    standin = VllmStandIn()
    report = bench.decode_benchmark(TINY, vllm_module=standin, **run)
    assert report.checks[1].startswith("vLLM Triton MLA decode: max error")
    kernels = [row.kernel for row in report.rows]
    assert kernels == ["m2la latent decode (reference)", "vLLM Triton MLA decode (same latent cache)",
                       "SDPA over the GQA cache"]  # fmt: skip
    theirs = report.rows[1]
    assert theirs.nbytes == report.rows[0].nbytes and theirs.baseline == "SDPA over the GQA cache"
    assert standin.calls >= 2  # the check, then the timed calls
    broken = bench.decode_benchmark(TINY, vllm_module=VllmStandIn(scale_out=1.01), **run)
    assert "not timed (AssertionError" in broken.checks[1] and len(broken.rows) == 2
    fp8 = bench.decode_benchmark(TINY, vllm_module=VllmStandIn(), fp8=True, **run)
    assert "not timed (it reads no fp8 cache)" in fp8.checks[1] and len(fp8.rows) == 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rope_only_layout_decodes_rope_only_queries(backend):
    """A plain layout with no no-RoPE part (`nope_dim` 0: a lossless conversion fine-tuned out of its
    grouped form) decodes `[b, h, 2p]` queries as its layers do, counting 2p + r FLOPs a head and
    key, not 2r + 2p; vLLM's kernel gets the zero-padded full query and passes the same gate."""
    from dataclasses import replace

    shape = replace(TINY, nope_dim=0)
    standin = VllmStandIn()
    report = bench.decode_benchmark(shape, batches=(2,), contexts=(40,), dtype=torch.float16, device="cpu",
                                    backend=backend, repeats=1, bandwidth_gbs=10.0, vllm_module=standin)  # fmt: skip
    assert f"m2la decode ({backend})" in report.checks[0] and report.checks[1].startswith("vLLM Triton MLA decode:")
    ours, theirs, _ = report.rows
    assert ours.flops == 2 * 3 * 2 * 40 * (12 + 44) and theirs.flops == ours.flops
    assert ours.nbytes == 2 * 40 * 56 * 2 + 2 * 3 * (12 + 44) * 2  # the cache, RoPE queries in, latent out
    assert main(["bench", "decode", *TINY_ARGS[:6], "--nope-dim", "0", *TINY_ARGS[8:], "--backend", backend]) == 0


def test_gate_cases_are_the_same_on_every_run():
    """A seeded generator fixes the gate case's values and page order, whatever the global RNG holds."""
    made = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        made.append(bench.paged_latent_cache(TINY, 2, 40, torch.float16, torch.device("cpu"),
                                             generator=torch.Generator().manual_seed(7)))  # fmt: skip
    (cache_a, _, table_a, _), (cache_b, _, table_b, _) = made
    assert torch.equal(cache_a, cache_b) and torch.equal(table_a, table_b)
    assert cache_a.abs().max() <= 1 and cache_a.std() > 0.5  # uniform over [-1, 1]
    other = bench.paged_latent_cache(TINY, 2, 40, torch.float16, torch.device("cpu"),
                                     generator=torch.Generator().manual_seed(8))  # fmt: skip
    assert not torch.equal(other[0], cache_a)


def test_vllm_kernel_loading(tmp_path, monkeypatch):
    copy = tmp_path / "triton_decode_attention.py"
    copy.write_text("def decode_attention_fwd(*args, **kwargs):\n    raise NotImplementedError\n")
    assert callable(bench.load_vllm_triton_mla(str(copy)).decode_attention_fwd)
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    with pytest.raises(ImportError, match="broken.py"):
        bench.load_vllm_triton_mla(str(broken))
    assert main(["bench", "decode", *TINY_ARGS, "--vllm-kernel", str(tmp_path / "missing.py")]) == 1
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no vLLM installed: no baseline
    assert bench.load_vllm_triton_mla() is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lossless_layout_moves_the_original_bytes(backend):
    """`lossless`: the grouped decode of `convert(model)`'s layout, 2 KV heads x 32 under 6 query
    heads: cache rows as wide as the GQA cache's, GQA's FLOPs, gated against fp32 like the rest."""
    shape = bench.BenchShape(heads=6, kv_heads=2, head_dim=32, block_size=16)
    report = bench.decode_benchmark(shape, batches=(2,), contexts=(45,), dtype=torch.float16, device="cpu",
                                    backend=backend, lossless=True, repeats=1, bandwidth_gbs=10.0,
                                    vllm_module=VllmStandIn())  # fmt: skip
    assert report.shape.kv_rank == report.shape.rope_dim == 64 and report.shape.nope_dim == 0
    assert f"m2la lossless grouped decode ({backend})" in report.checks[0]
    assert "not timed (it has no grouped decode)" in report.checks[1]
    ours, sdpa = report.rows
    assert ours.kernel == f"m2la lossless grouped decode ({backend})" and sdpa.kernel == "SDPA over the GQA cache"
    assert ours.flops == sdpa.flops and ours.nbytes == sdpa.nbytes  # the same cache, query and output bytes


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lossless_prefill_against_the_original_cache(backend, capsys):
    """The grouped prefill of the lossless layout (`m2la bench prefill --lossless`), gated and
    compared with SDPA over the GQA cache: same FLOPs (GQA's work), same cache bytes."""
    args = ["--heads", "6", "--gqa", "2x32", "--page-size", "16", "--chunk", "21", "--prefix", "0,40", "--repeats",
            "1", "--device", "cpu", "--backend", backend, "--dtype", "float16"]  # fmt: skip
    assert main(["bench", "prefill", "--lossless", *args]) == 0
    table = capsys.readouterr().out
    assert f"m2la lossless grouped prefill ({backend}): max error" in table
    report = bench.prefill_benchmark(bench.BenchShape(heads=6, kv_heads=2, head_dim=32, block_size=16), chunk=21,
                                     prefixes=(0, 40), dtype=torch.float16, device="cpu", backend=backend, repeats=1,
                                     bandwidth_gbs=10.0, lossless=True)  # fmt: skip
    assert [row.kernel for row in report.rows] == [
        f"m2la lossless grouped prefill ({backend})",
        "SDPA over the GQA cache",
    ] * 2
    ours, sdpa = report.rows[2:]
    assert ours.flops == sdpa.flops == 2 * 6 * (21 * 40 + 21 * 22 // 2) * 64 and ours.nbytes == sdpa.nbytes
    assert report.speedup(ours) == pytest.approx(sdpa.ms / ours.ms) and sdpa.baseline == ""


def test_prefill_batches_of_short_extends():
    """`batches`: several sequences' chunks at once (a speculative step's short extends): rows per
    batch, bytes and pairs over the whole batch, the gate on the first case."""
    report = bench.prefill_benchmark(TINY, chunk=3, prefixes=(50,), batches=(1, 4), dtype=torch.float32,
                                     device="cpu", backend="reference", repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    assert len(report.checks) == 1 and [row.batch for row in report.rows] == [1, 1, 1, 4, 4, 4]
    one, four = report.rows[0], report.rows[3]
    assert four.flops == 4 * one.flops == 4 * 2 * 3 * (3 * 50 + 6) * (20 + 12 + 24)
    assert four.nbytes == 4 * one.nbytes
    assert report.rows[5].nbytes == 4 * report.rows[2].nbytes  # the GQA row too


def _layer(heads, kv_rank, rope_dim, nope, value):
    return dict(num_heads=heads, kv_rank=kv_rank, rope_dim=rope_dim, qk_nope_dim=nope, v_head_dim=value)


def test_model_layouts_of_a_saved_checkpoint(tmp_path, capsys):
    """`--model`: an m2la checkpoint's converted layouts as `m2la.save_pretrained` writes them (a
    lossless Llama and a Qwen3-VL, whose attention shape sits in text_config), timed per layout."""
    pytest.importorskip("transformers")
    import tiny_hf

    for family, layers in (("llama", 3), ("qwen3_vl", 2)):
        model = tiny_hf.build(family, heads=6, kv_heads=2, head_dim=12, layers=layers)
        m2la.convert(model)
        m2la.save_pretrained(model, tmp_path / family)
        config = json.loads((tmp_path / family / "config.json").read_text())
        layout = bench.BenchShape(heads=6, kv_rank=24, rope_dim=24, nope_dim=0, value_dim=12, kv_heads=2, head_dim=12)
        assert bench.model_layouts(config) == [bench.ModelLayout(layout, True, tuple(range(layers)))]
    args = ["bench", "decode", "--model", str(tmp_path / "llama"), "--device", "cpu", "--context", "20", "--batch",
            "1", "--repeats", "1", "--page-size", "16", "--json", str(tmp_path / "bench.json")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"## {tmp_path / 'llama'}: layers 0-2 (3 layers) (lossless, grouped kernels)" in printed
    assert "m2la lossless grouped decode (reference)" in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["layouts"][0]["layers"] == [0, 1, 2] and saved["layouts"][0]["report"]["shape"]["kv_rank"] == 24


def test_model_layouts_group_layers_by_layout(tmp_path, capsys):
    """Compressed checkpoints have per-layer ranks: one layout per distinct shape, its layers in
    order; an unconverted model gives its GQA attention under the latent the options set."""
    config = {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 72,
              "m2la": {"layers": [_layer(6, 20, 8, 12, 12), _layer(6, 20, 8, 12, 12), _layer(6, 24, 24, 0, 12),
                                  _layer(6, 20, 8, 12, 12)]}}  # fmt: skip
    layouts = bench.model_layouts(config, block_size=16)
    assert [(lay.shape.kv_rank, lay.lossless, lay.layers) for lay in layouts] == [(20, False, (0, 1, 3)),
                                                                                   (24, True, (2,))]  # fmt: skip
    assert layouts[0].shape == bench.BenchShape(heads=6, kv_rank=20, rope_dim=8, nope_dim=12, value_dim=12,
                                                kv_heads=2, head_dim=12, block_size=16)  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    args = ["bench", "prefill", "--model", str(tmp_path), "--device", "cpu", "--chunk", "5", "--prefix", "3",
            "--repeats", "1", "--page-size", "16"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layers 0-1, 3 (3 layers)" in printed and "layers 2 (1 layer) (lossless, grouped kernels)" in printed
    assert main([*args, "--kv-rank", "8"]) == 1
    assert "--model sets --kv-rank from its config.json; drop them" in capsys.readouterr().err
    del config["m2la"]  # unconverted: GQA from the config, latent from the options
    path.write_text(json.dumps(config))
    assert bench.model_layouts(config) == [
        bench.ModelLayout(bench.BenchShape(heads=6, kv_heads=2, head_dim=12), False, ())
    ]
    assert main([*args, "--kv-rank", "16", "--rope-dim", "8", "--nope-dim", "4", "--value-dim", "12"]) == 0
    assert "latent 16 + RoPE 8" in capsys.readouterr().out
    assert main([*args, "--gqa", "2x12"]) == 1
    assert "--model sets --gqa" in capsys.readouterr().err
    assert main(["bench", "decode", "--model", str(tmp_path / "missing")]) == 1
    assert "no config.json there" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no attention shape"):
        bench.model_layouts({"m2la": {}})


@pytest.mark.parametrize("backend,dtype,fp8", [("reference", torch.float32, False), ("triton", torch.float16, False),
                                               ("triton", torch.float16, True)])  # fmt: skip
def test_cache_write_rows(backend, dtype, fp8):
    """`write_benchmark`: the fused write gated against the fp32 reference (one slot skipped), then
    timed beside the unfused torch write; bytes count inputs read and rows written."""
    report = bench.write_benchmark(TINY, tokens=(1, 63), dtype=dtype, device="cpu", backend=backend, fp8=fp8,
                                   repeats=1, bandwidth_gbs=10.0)  # fmt: skip
    assert f"m2la cache write ({backend}): max error" in report.checks[0]
    ours = [row for row in report.rows if row.kernel.startswith("m2la fused cache write")]
    assert [row.batch for row in ours] == [1, 63] and all(report.speedup(row) is not None for row in ours)
    row_bytes = 56 + 4 if fp8 else 56 * dtype.itemsize
    assert ours[1].nbytes == 63 * (56 * dtype.itemsize + 12 * 4 + 8 + row_bytes)


def test_a_cache_write_over_budget_is_never_timed(monkeypatch):
    real, calls = m2la.kernels.write_latent_cache, []

    def off_by_a_percent(cache, latent, *args, **kwargs):  # the first call: the kernel under check
        calls.append(None)
        real(cache, latent * 1.01 if len(calls) == 1 else latent, *args, **kwargs)

    monkeypatch.setattr(m2la.kernels, "write_latent_cache", off_by_a_percent)
    with pytest.raises(AssertionError, match=r"m2la cache write \(reference\): max error"):
        bench.write_benchmark(TINY, tokens=(5,), dtype=torch.float16, device="cpu", backend="reference", repeats=1,
                              bandwidth_gbs=10.0)  # fmt: skip


def test_bench_write_cli(capsys):
    assert main(["bench", "write", *TINY_ARGS, "--tokens", "3,17", "--fp8"]) == 0
    assert capsys.readouterr().out.count("| m2la fused cache write (reference, fp8 e4m3 cache) |") == 2
    assert main(["bench", "write", *TINY_ARGS, "--lossless"]) == 1
    assert "are decode and prefill options" in capsys.readouterr().err


@pytest.mark.parametrize("lossless", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_over_an_fp8_cache(backend, lossless):
    """`fp8`: the prefill reads e4m3 rows and their scales (a byte an element plus 4 a token), gated
    against fp32 over the dequantized rows; the baselines read them dequantized."""
    shape = bench.BenchShape(heads=6, kv_heads=2, head_dim=32, block_size=16) if lossless else TINY
    report = bench.prefill_benchmark(shape, chunk=7, prefixes=(20,), dtype=torch.float16, device="cpu",
                                     backend=backend, repeats=1, bandwidth_gbs=10.0, lossless=lossless, fp8=True)  # fmt: skip
    name = "lossless grouped prefill" if lossless else "prefill"
    assert f"m2la {name} ({backend}, fp8 e4m3 cache): max error" in report.checks[0]
    ours = report.rows[0]
    assert ours.kernel.endswith(f"({backend}, fp8 e4m3 cache)")
    width = report.shape.latent_width
    queries_and_outputs = 7 * (2 * 6 * 32 * 2 if lossless else 3 * (20 + 12 + 24) * 2)
    assert ours.nbytes == 27 * (width + 4) + queries_and_outputs
