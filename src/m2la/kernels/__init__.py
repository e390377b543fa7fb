"""Fused latent-attention kernels; triton is imported only when a call runs the Triton backend.

- `decode_attention`: paged / contiguous split-KV absorbed decode over the latent cache
  (op folder `latent_decode/`).
- `grouped_decode_attention`: the same decode for grouped layers (lossless conversions of GQA
  attention), each KV group's heads reading only its group's columns (op folder `latent_decode/`).
- `prefill_attention`: causal varlen chunked prefill over the cached prefix + new chunk
  (op folder `latent_prefill/`).
- `grouped_prefill_attention`: the same prefill for grouped layers, GQA's flash attention over the
  cache (op folder `latent_prefill/`).
- `write_latent_cache`: fused latent copy + RoPE rotation + paged scatter (op folder `cache_write/`).
- `check_argument_values`: a context manager (or `M2LA_CHECK_VALUES=1`) under which every eager call
  checks its argument values (lengths, offsets, block tables, slots) on any backend and device.

Each op folder holds `reference.py` (pure torch, the test oracle) and `triton.py` (the kernel).
`ops` registers them as torch custom ops and needs only torch, so importing it here keeps the
package light.
"""

from m2la.kernels.ops import (
    check_argument_values,
    decode_attention,
    grouped_decode_attention,
    grouped_prefill_attention,
    prefill_attention,
    write_latent_cache,
)

__all__ = [
    "check_argument_values",
    "decode_attention",
    "grouped_decode_attention",
    "grouped_prefill_attention",
    "prefill_attention",
    "write_latent_cache",
]
