"""vLLM's Triton MLA decode as a side-by-side baseline for `gpu_kernels.py` (not part of m2la).

vLLM's `TritonMLAImpl.forward_mqa` decodes over the paged `[kv_c | k_pe]` cache with the pure-Triton
kernel in `vllm/v1/attention/ops/triton_decode_attention.py` (Apache-2.0). The GPU machine cannot
install vLLM (no network, and the wheel is 336 MB), so `extract` copies that one file out of a
locally downloaded wheel into `benchmarks/_third_party/` (git-ignored, never committed; pass it to
the device with `carry`), replacing its two vLLM imports (the ROCm probe and vLLM's triton
re-export) with plain triton. `decode` calls it the way `forward_mqa` does.

    pip download --no-deps vllm==0.33.0 -d /tmp/wheels
    python benchmarks/vllm_triton_mla.py /tmp/wheels/vllm-0.33.0-*.whl
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import zipfile

from m2la.kernels import bench as m2la_bench

SOURCE = "vllm/v1/attention/ops/triton_decode_attention.py"
DEST = pathlib.Path(__file__).with_name("_third_party") / "vllm_triton_decode_attention.py"
IMPORTS = {
    "from vllm.platforms import current_platform\n": "",
    "from vllm.triton_utils import tl, triton\n": "import triton\nimport triton.language as tl\n",
    "current_platform.is_rocm()": "False  # m2la benchmark copy: NVIDIA only",
}


def extract(wheel: str | pathlib.Path) -> pathlib.Path:
    """Write the kernel file from a vLLM wheel to `DEST` (imports rewritten); returns the path."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(SOURCE).decode()
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), "vllm-?.dist-info")
        version = metadata.split("/")[0].removesuffix(".dist-info").split("-")[-1]
    for old, new in IMPORTS.items():
        if old not in source:
            raise ValueError(f"{wheel}: {SOURCE} no longer contains {old.strip()!r}; update IMPORTS")
        source = source.replace(old, new)
    header = f"# Copied from vLLM {version} ({SOURCE}, Apache-2.0) by benchmarks/vllm_triton_mla.py; not m2la code.\n"
    DEST.parent.mkdir(exist_ok=True)
    tmp = DEST.with_suffix(".tmp")
    tmp.write_text(header + source)
    tmp.replace(DEST)
    return DEST


def load():
    """The extracted module, or None when `extract` has not been run here."""
    return m2la_bench.load_vllm_triton_mla(str(DEST)) if DEST.is_file() else None


# The adapter lives in the package (`m2la bench decode` times vLLM's kernel too); these names stay for
# the scripts that import them from here.
num_kv_splits = m2la_bench.vllm_num_kv_splits
decode = m2la_bench.vllm_mla_decode


def main() -> None:
    parser = argparse.ArgumentParser(description="extract vLLM's Triton MLA decode kernel from a wheel")
    parser.add_argument("wheel")
    print(extract(parser.parse_args().wheel), file=sys.stderr)


if __name__ == "__main__":
    main()
