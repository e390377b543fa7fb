"""Importing m2la needs neither transformers nor triton, and the core runs without them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_AND_RUN = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("transformers", "triton"):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import m2la
    from m2la.cache import LatentCache

    config = m2la.M2LAConfig(
        hidden_size=16, num_heads=3, kv_rank=8, rope_dim=4, qk_nope_dim=2, v_head_dim=5, softmax_scale=0.3,
        rope_inv_freq=[1.0, 0.1], rope_axis=[0, 0], rope_source_column=[0, 1],
    )
    layer = m2la.M2LAttention(config)
    cache = LatentCache(1)
    out = layer(torch.randn(2, 7, 16), torch.arange(7).expand(2, 7), cache=cache)
    assert out.shape == (2, 7, 16) and cache.nbytes == 2 * 7 * 12 * 4
    assert not any(m.split(".")[0] in ("transformers", "triton") for m in sys.modules)
    try:
        m2la.convert(torch.nn.Linear(1, 1))
    except ImportError as error:
        assert "blocked" in str(error)
    else:
        raise AssertionError("convert needs transformers and should say so")
    print("ok")
    """
)


def test_core_works_without_transformers_and_triton():
    result = subprocess.run([sys.executable, "-c", BLOCK_AND_RUN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_plain_import_loads_neither():
    code = "import sys, m2la; print(sorted(m for m in ('transformers', 'triton') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
