"""m2la: retrofit pretrained attention with a compressed latent KV cache (M²LA)."""
__version__ = "0.1.0"
