"""`benchmarks/gpu_kernels.py` runs its correctness check, decode and prefill sections end to end on
CPU (interpreter, tiny shapes), so a lent GPU's few minutes are never lost to a broken script."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_kernels.py"


def run_in_interpreter(argv: list[str], timeout: int = 300, **env: str) -> str:
    """`python *argv` under the Triton interpreter (extra environment `env`); its stdout, after
    asserting it exited 0 (stderr's tail in the failure message)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", **env}
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_benchmark_smoke(tmp_path):
    args = [
        "--smoke",
        "--sections",
        "decode,fp8,lossless,lossless_prefill,splits,prefill,extend",
        "--contexts",
        "64",
        "--warm-workers",
        "0",
    ]
    run_in_interpreter([str(SCRIPT), *args], timeout=600, OUT=str(tmp_path))
    report = (tmp_path / "kernels.md").read_text()
    assert "FAILED" not in report
    assert "| decode latent 60+16 (smoke) |" in report  # correctness against the fp32 reference
    assert "| latent 60+16 (smoke) fp8 e4m3 | 2 | 64 |" in report
    assert "Measured device copy bandwidth" in report
    # the host-share table: the same decode through each entry point (one interpreter run among them)
    entries = re.findall(r"\| latent 60\+16 \(smoke\) \| (\S+) [^|]*\| [\d.]+ \| n/a \| (\S+) \|", report)
    assert [e for e, _ in entries] == ["decode_attention", "torch.ops.m2la.latent_decode", "latent_decode_triton"]
    assert all(float(d) < 1e-4 for _, d in entries), entries
    # a lossless conversion's plain and grouped decodes and SDPA over its GQA cache give the same head outputs
    lossless = re.findall(r"\| ([12]) \| 64 \|(?: [\d.]+ \|){7} (\S+) \|\n", report)
    assert [b for b, _ in lossless] == ["1", "2"], report
    assert all(float(d) < 1e-4 for _, d in lossless), lossless
    # ... and the grouped decode's tile sweep, each config agreeing with the default tiles
    grouped_tiles = re.findall(r"^\| 2 \| (default|\{[^|]*\}) \| [\d.]+ \| [\d.]+ \| (\S+) \|$", report, re.M)
    assert len(grouped_tiles) == 5 and all(float(d) < 1e-4 for _, d in grouped_tiles), report
    # a lossless conversion's plain and grouped prefills agree with SDPA with GQA over the source keys and values
    prefills = re.findall(
        r"\| (m2la plain prefill \(before\)|m2la grouped prefill|SDPA, GQA) \| (?:0|64) \| 32 \| [\d.]+ \| [\d.]+ \| (\S+) \|",
        report,
    )
    assert [n for n, _ in prefills] == ["m2la plain prefill (before)", "m2la grouped prefill", "SDPA, GQA"] * 2, report
    assert all(float(d) < 1e-4 for _, d in prefills), prefills
    # ... its flash tiles at every swept config, agreeing with the default tiles
    tiles = re.findall(r"^\| (default|\{[^|]*\}) \| [\d.]+ \| [\d.]+ \| (\S+) \|$", report, re.M)
    assert len(tiles) == 4 and all(float(d) < 1e-4 for _, d in tiles), report
    # ... and its short extends through both grouped modes and the per-token decodes, which agree
    # (9 tokens: two packed query blocks under the interpreter); auto marks one a length
    grouped_ext = re.findall(
        r"^\| ([139]) \| (decode|flash|decode, per token) \| [\d.]+ \| (\S+) \| (auto)? \|", report, re.M
    )
    modes = ("decode", "flash", "decode, per token")
    assert [(t, m) for t, m, _, _ in grouped_ext] == [(t, m) for t in "139" for m in modes], report
    assert all(float(d) < 1e-4 for _, _, d, _ in grouped_ext) and sum(a == "auto" for *_, a in grouped_ext) == 3
    # split placement: by length and by capacity agree on every static-cache and ragged case
    placements = re.findall(r"\| latent 60\+16 \(smoke\), (static cache|ragged paged batch) \|.* \| (\S+) \|\n", report)
    assert [c for c, _ in placements] == ["static cache"] * 2 + ["ragged paged batch"], report
    assert all(float(d) < 1e-4 for _, d in placements), placements
    # prefill: SDPA over the expanded K/V agrees with our expanded output, for every SDPA variant
    diffs = re.findall(
        r"\| latent 60\+16 \(smoke\), SDPA[^|]*\| (?:0|64) \| 32 \| [\d.]+ \| [\d.]+ \| (\S+) \|", report
    )
    assert len(diffs) == 6, report
    assert all(float(d) < 1e-4 for d in diffs), diffs
    # our expanded prefill in parts (the kernel alone: both launch orders and the TMA tile) agrees with the whole call
    parts = re.findall(
        r"\| latent 60\+16 \(smoke\), m2la attention only, [^|]*\| (?:0|64) \| 32 \| [\d.]+ \| [\d.]+ \| (\S+) \|",
        report,
    )
    assert len(parts) == 6 and all(float(d) < 1e-4 for d in parts), report  # 3 variants, 2 prefixes
    assert len(re.findall(r"m2la expansion only \(gather \+ 1 GEMM\)", report)) == 2
    # short extends: every mode at each length, agreeing with the decode route; auto marks one
    extends = re.findall(r"\| latent 60\+16 \(smoke\) \| (\d+) \| (\w+) \| [\d.]+ \| (\S+) \| (auto)? \|", report)
    assert [(t, m) for t, m, _, _ in extends] == [(t, m) for t in "13" for m in ("decode", "absorbed", "expanded")]
    assert all(float(d) < 1e-4 for _, _, d, _ in extends) and sum(a == "auto" for *_, a in extends) == 2
    # the packed decode route of a 16-head layer agrees with one decode a token
    packed = re.findall(r"^\| latent 60\+16 \(smoke\) \| ([23]) \| (packed|one decode a token) \| [\d.]+ \| (\S+) \|$",
                        report, re.M)  # fmt: skip
    assert [(t, r) for t, r, _ in packed] == [(t, r) for t in "23" for r in ("packed", "one decode a token")], report
    assert all(float(d) < 1e-4 for *_, d in packed), packed


def test_register_facts_cover_every_sweep_tile_once():
    """`decode_register_facts.py` compiles each tile the GPU sweeps time (every sweep set, fp8 or
    not), once, and skips entries that only change the data (page order, page size, contiguous,
    split count)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import decode_register_facts
        from gpu_kernels import SWEEP_SETS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    configs = decode_register_facts.tile_configs()
    assert configs[0] == {} and len({tuple(sorted(c.items())) for c in configs}) == len(configs)
    sweeps = [c for sweep in SWEEP_SETS.values() for c in sweep]
    tile_entries = [c for c in sweeps if not decode_register_facts.NOT_TILE_KEYS & c.keys()]
    assert all(c in configs for c in tile_entries) and all(c in tile_entries or c == {} for c in configs)
    assert any(c.get("fp8") for c in configs) and any(c.get("LATENT_PIECES") for c in configs)


def test_launch_order_model_runs_each_program_once_longest_first_in_a_group():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from prefill_launch_order import launch_order
    finally:
        sys.path.remove(str(SCRIPT.parent))
    order = launch_order(num_query_tiles=5, num_head_tiles=7, head_group=3)  # groups of 3, 3, 1
    assert sorted(order) == [(m, h) for m in range(5) for h in range(7)]
    assert order[:3] == [(4, 0), (4, 1), (4, 2)] and order[15:18] == [(4, 3), (4, 4), (4, 5)]
    assert order[30:] == [(4, 6), (3, 6), (2, 6), (1, 6), (0, 6)]


def test_compiled_decode_benchmark_smoke(tmp_path):
    """`benchmarks/compiled_decode.py --smoke`: a tiny converted Llama, eager against inductor (growing
    cache) and against inductor over a static cache, on CPU."""
    script = SCRIPT.with_name("compiled_decode.py")
    args = ["--smoke", "--layers", "2", "--batches", "2", "--prompt", "8", "--steps", "6"]
    run_in_interpreter([str(script), *args], timeout=900, OUT=str(tmp_path))
    number = r"[\d.]+"
    row = re.search(rf"^\| 2 \| {number} \| {number} \| {number} \| {number}x \| {number}x \| (\S+), (\S+) "
                    r"\| (\d)/2, (\d)/2 sequences \| \d+ \|$", (tmp_path / "compiled_decode.md").read_text(), re.M)  # fmt: skip
    assert row, (tmp_path / "compiled_decode.md").read_text()
    # both compiled runs = eager: same logits and tokens
    assert max(map(float, row.group(1, 2))) < 1e-4 and row.group(3, 4) == ("2", "2")


def test_tma_decode_probe_matches_the_reference_in_the_interpreter():
    """`benchmarks/tma_decode_probe.py --run --smoke`: the library default, the library's TMA tile and
    the TMA probe (tensor-descriptor loads) compute the decode the reference computes, so the GPU
    timings compare the same work."""
    script = SCRIPT.with_name("tma_decode_probe.py")
    stdout = run_in_interpreter([str(script), "--run", "--smoke"])
    diffs = re.findall(r"^\| 1 \| 64 \| ([^|]+) \| (\S+) \| n/a \|", stdout, re.M)
    names = [name.split(":")[0] for name, _ in diffs]
    assert names == ["library default (split + combine kernels)", "library TMA tile", "TMA probe", "TMA probe"]
    assert all(float(diff) < 1e-4 for _, diff in diffs), stdout


def _flashmla_baseline():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import flashmla_baseline
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return flashmla_baseline


def test_flashmla_baseline_smoke_agrees_with_the_reference():
    """`flashmla_baseline.py run --smoke`: m2la's Triton decode (interpreter) and the plain-torch
    stand-in for FlashMLA's interface both match the fp32 reference on FlashMLA's paging (64-token
    pages, shuffled tables, ragged lengths), so the GPU run compares the same work."""
    script = SCRIPT.with_name("flashmla_baseline.py")
    stdout = run_in_interpreter([str(script), "run", "--smoke"])
    rows = re.findall(r"^\| (\d+) \| (\d) \| 200 \| ([^|]+) \| (\S+) \| (\S+) \| n/a \|", stdout, re.M)
    kernels = ["FlashMLA", "m2la"] + [f"m2la, 64-head tile, {n} tokens (candidate)" for n in (64, 32)]
    # 70 heads: the candidate's second 64-head tile holds 6 heads
    assert [(h, b, k.strip()) for h, b, k, _, _ in rows] == [("3", "1", k) for k in kernels] + [
        ("70", "3", k) for k in kernels
    ]
    assert all(float(e) < 1e-4 and float(le) < 1e-4 for *_, e, le in rows), stdout


def test_flashmla_adapter_reuses_the_schedule_and_keeps_flashmla_shapes():
    """`decode` hands FlashMLA 4-d tensors, returns m2la's `[b, h, r]` / `[b, h]`, and makes the
    scheduler metadata once per schedule (the graph replays reuse it)."""
    baseline = _flashmla_baseline()
    torch = pytest.importorskip("torch")
    stand_in = baseline.TorchStandIn()
    cache = torch.randn(6, baseline.PAGE_SIZE, 20, dtype=torch.float64)
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    lens = torch.tensor([70, 3], dtype=torch.int32)
    q = torch.randn(2, 5, 20, dtype=torch.float64)
    schedule: dict = {}
    out, lse = baseline.decode(stand_in, q, cache, table, lens, 0.3, schedule, kv_rank=12)
    baseline.decode(stand_in, q, cache, table, lens, 0.3, schedule, kv_rank=12)
    assert stand_in.schedules_made == 1 and set(schedule) == {"metadata", "num_splits"}
    assert out.shape == (2, 5, 12) and lse.shape == (2, 5)
    keys = cache[0, :3]  # row 1: 3 tokens, the first page of its table is page 0
    scores = q[1] @ keys.T * 0.3  # [h, 3]
    torch.testing.assert_close(out[1], scores.softmax(-1) @ keys[:, :12])
    torch.testing.assert_close(lse[1], torch.logsumexp(scores, -1).float())


def test_flashmla_extract_checks_the_wheel(tmp_path, monkeypatch):
    """`extract` writes the extension (and where it came from) or names what the wheel lacks."""
    import zipfile

    baseline = _flashmla_baseline()
    monkeypatch.setattr(baseline, "DEST", tmp_path / "third_party" / "flashmla" / "_flashmla_C.abi3.so")
    wheel = tmp_path / "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    binary = b"\x7fELF" + b"\0" * 16 + baseline.SCHEMA + b"..."
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(baseline.SOURCE, binary)
        archive.writestr("vllm-0.33.0.dist-info/METADATA", "Name: vllm\n")
    assert baseline.extract(wheel).read_bytes() == binary
    assert "vLLM 0.33.0" in baseline.DEST.with_name("SOURCE.txt").read_text()
    for name, content, message in [("other.so", binary, "no vllm/_flashmla_C"),
                                   (baseline.SOURCE, b"\x7fELF renamed op", "has no op dense_decode_fwd")]:  # fmt: skip
        broken = tmp_path / f"broken-{len(content)}.whl"
        with zipfile.ZipFile(broken, "w") as archive:
            archive.writestr(name, content)
        with pytest.raises(ValueError, match=message):
            baseline.extract(broken)
    monkeypatch.setattr(baseline, "DEST", tmp_path / "missing.so")
    assert baseline.load() is None


def test_flashmla_run_reports_a_kernel_error_in_its_row_and_goes_on():
    """A baseline that refuses a shape (FlashMLA raises for head counts it lacks) is reported in its
    row; m2la's rows are still checked, so one refusal does not lose a device call's other figures."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import flashmla_baseline as f
class Refusing(f.TorchStandIn):
    def dense_decode_fwd(self, *args):
        raise RuntimeError("Unsupported h_q: 5\\nmore")
cache = torch.empty(20, 64, 76).uniform_(-1, 1)
print("\\n".join(f.case_rows(Refusing(), 5, 2, 100, 60, 16, torch.device("cpu"), torch.float32, None, cache)))
"""
    stdout = run_in_interpreter(["-c", code, str(SCRIPT.parent)])
    rows = [line.split(" | ")[3:6] for line in stdout.splitlines() if line.startswith("| 5 | 2 | 100 |")]
    assert rows[0] == ["FlashMLA", "RuntimeError: Unsupported h_q: 5", "-"], rows
    assert [name for name, *_ in rows[1:]] == ["m2la"] + [
        f"m2la, 64-head tile, {n} tokens (candidate)" for n in (64, 32)
    ]
    assert all(float(err) < 1e-4 and float(lse_err) < 1e-4 for _, err, lse_err in rows[1:]), rows


def test_softmax_overlap_probe_reports_each_variant():
    """`benchmarks/softmax_overlap_probe.py` compiles its three loops for sm_90 (no GPU, no
    interpreter) and reports, per variant, the facts benchmarks/RESULTS.md quotes."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = SCRIPT.with_name("softmax_overlap_probe.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and any(word in proc.stderr for word in ("ptxas", "No such file", "backend")):
        pytest.skip(f"triton's sm_90 compile path is unavailable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines()[1:])
    assert list(found) == ["plain", "warp_specialized", "scores_ahead"]
    facts = {name: json.loads(text) for name, text in found.items()}
    assert facts["plain"]["fits_sm90"] and facts["plain"]["wgmma"] > 0 and facts["plain"]["wait_group_pending"]
    assert facts["scores_ahead"]["wgmma"] == 2 * facts["plain"]["wgmma"]  # each MMA twice: in the loop and outside it
