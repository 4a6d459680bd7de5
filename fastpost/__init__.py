"""fastpost: post-training for video diffusion transformers at scale."""

__version__ = "0.1.0"
