"""See reference.py (pure torch oracle) and triton.py (fused kernel; the only module importing triton)."""
