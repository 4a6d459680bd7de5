"""Data path: synthetic clips -> preprocessing (VAE + text encoder) -> latent shards -> distributed loader.

Submodules are imported on use (diffusers/transformers are heavy and not every caller needs them).
"""
