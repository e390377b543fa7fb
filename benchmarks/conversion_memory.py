"""Peak memory of a compressed conversion of SmolLM2-135M, and how it scales with the calibration set.

    python benchmarks/conversion_memory.py                      # 8, 16 and 32 windows of 256 tokens
    python benchmarks/conversion_memory.py --windows 8 32 --compression 4.0
    python benchmarks/conversion_memory.py --windows 16 --refit-memory-gib 100   # all refit sums at once

Every measurement runs in a fresh Python process, so allocations made earlier cannot hide (or be
reused by) the one measured. In that process: load SmolLM2-135M (fp32) and tokenize the calibration
windows, reset the kernel's peak-RSS counter (``5`` written to ``/proc/self/clear_refs`` resets
``VmHWM`` to the current RSS), run one step, and read ``VmHWM`` from ``/proc/self/status``. Steps:

- ``m2la.convert(model, compression=..., calibration=batches)``, once per calibration size;
- for scale, one plain forward over one calibration batch (``use_cache=False``, logits included),
  which is what every calibration batch costs inside the conversion too.

"Added" is that peak minus the RSS just before the step. The statistics are streamed (per-layer sums,
one batch at a time), so the added peak should not grow with the number of calibration windows.
If the counter cannot be reset, the rows say so and fall back to ``ru_maxrss`` (a lower bound on the
added peak when loading peaked higher). The header line prints ``MALLOC_MMAP_THRESHOLD_`` when set:
glibc's default raises its mmap threshold as large blocks are freed, so later blocks come from the
heap and may stay resident after they are freed; a fixed threshold makes RSS follow live memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); True if the reset took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


def _measure(step, reset: bool) -> dict:
    gc.collect()
    before_kib = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    did_reset = _reset_peak() if reset else False
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM") if did_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_kib = before_kib if did_reset else maxrss_before
    return dict(
        rss_before_mib=before_kib / 1024,
        peak_mib=peak_kib / 1024,
        added_mib=(peak_kib - base_kib) / 1024,
        rss_after_mib=_status_kib("VmRSS") / 1024,
        seconds=seconds,
        peak_reset=did_reset,
        result=result,
    )


def child(args: argparse.Namespace) -> dict:
    import torch

    import m2la
    from m2la.assets import load_smollm2, wiki_split
    from m2la.evaluation import token_windows

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    ids = token_windows(tokenizer, wiki_split("calibration"), args.length, args.child)
    batches = [{"input_ids": ids[i : i + args.batch]} for i in range(0, args.child, args.batch)]
    loaded_hwm = _status_kib("VmHWM") / 1024

    def forward():
        with torch.no_grad():
            model(**batches[0], use_cache=False)

    def convert():
        report = m2la.convert(
            model, compression=args.compression, calibration=batches, refit_memory_gib=args.refit_memory_gib
        )
        return dict(
            ratio=report.compression_ratio,
            bytes_after=report.bytes_per_token_after,
            bytes_before=report.bytes_per_token_before,
        )

    measured = _measure(forward if args.step == "forward" else convert, reset=True)
    return dict(
        windows=args.child,
        length=args.length,
        batch=args.batch,
        batches=len(batches),
        refit_memory_gib=args.refit_memory_gib,
        compression=args.compression,
        loaded_peak_mib=loaded_hwm,
        step=args.step,
        measured=measured,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def _run_child(args: argparse.Namespace, windows: int, step: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(windows),
        "--step",
        step,
        "--length",
        str(args.length),
        "--batch",
        str(args.batch),
        "--compression",
        str(args.compression),
        "--refit-memory-gib",
        str(args.refit_memory_gib),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"child run ({step}, {windows} windows) failed (exit {done.returncode})")
    row = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"[{step}, {windows} windows: {row['measured']['seconds']:.0f} s]", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32], help="calibration windows per run")
    parser.add_argument("--length", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch", type=int, default=4, help="windows per calibration batch")
    parser.add_argument("--compression", type=float, default=4.0)
    parser.add_argument(
        "--refit-memory-gib",
        type=float,
        default=0.25,
        help="CompressionOptions.refit_memory_gib (refit sums held at once; 100 = all layers)",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=("convert", "forward"), default="convert", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    forward = _run_child(args, args.batch, "forward")
    rows = [_run_child(args, windows, "convert") for windows in args.windows]

    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    print(
        f"date {time.strftime('%Y-%m-%d')}, machine {platform.machine()}, {forward['threads']} threads, "
        f"torch {forward['torch']}; SmolLM2-135M fp32, compression {args.compression}, windows of {args.length} "
        f"tokens in batches of {args.batch}, refit_memory_gib {args.refit_memory_gib}; one fresh process per row"
        + (f"; MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "; glibc malloc defaults")
    )
    print("\n| step | RSS before | peak during | added (peak - before) | RSS after | seconds | peak from |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in [forward, *rows]:
        m = r["measured"]
        if r["step"] == "forward":
            name = f"one forward, 1 batch ({r['batch']} x {r['length']} tokens)"
        else:
            name = (
                f"convert, {r['windows']} x {r['length']} calibration tokens ({r['batches']} batches), "
                f"{m['result']['ratio']:.2f}x"
            )
        print(
            f"| {name} | {m['rss_before_mib']:,.0f} MiB | {m['peak_mib']:,.0f} MiB | {m['added_mib']:,.0f} MiB | "
            f"{m['rss_after_mib']:,.0f} MiB | {m['seconds']:.0f} | {'VmHWM reset' if m['peak_reset'] else 'ru_maxrss'} |"
        )
    print(
        "\nloading peak (VmHWM after load + tokenize, before the reset): "
        + ", ".join(f"{r['loaded_peak_mib']:,.0f} MiB" for r in [forward, *rows])
    )


if __name__ == "__main__":
    main()
