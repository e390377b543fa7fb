"""Integer helpers for the kernel launchers' host code.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions since triton 3.5: about 3 us a
call on the host (argument unwrapping), against nanoseconds for the arithmetic. The launchers run
on every decode step, and the split-count search calls them in a loop, so host code uses these.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers (`triton.cdiv`)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n for n >= 1, and 0 for n = 0 (`triton.next_power_of_2`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
