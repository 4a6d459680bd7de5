"""A whole tiny diffusers pipeline folder for the demo and tests: the stand-in for e.g. THUDM/CogVideoX-2b.

Above both data (the tiny tokenizer + T5) and models (the family's transformer, VAE spec and scheduler), so it
lives at the top level.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae
from fastpost.models import get_family


def build_tiny_pipeline(out_dir: str | Path, family: str = "cogvideox", flavor: str = "debug", seed: int = 0) -> Path:
    """A complete diffusers pipeline folder (transformer, VAE, T5 + tokenizer, scheduler) with tiny random
    weights, which every fastpost command accepts as `pretrained`."""
    import diffusers
    import transformers

    fam = get_family(family)
    if not (fam.pipeline_class and fam.vae and fam.text):
        raise ValueError(f"model family {family!r} has no diffusers pipeline (with a VAE and text encoder) to build")
    out_dir = Path(out_dir)
    config = fam.config(flavor)
    text_dim = config.get("text_embed_dim") or config["text_dim"]  # Wan's transformer calls it text_dim
    text_dir = build_tiny_text_encoder(out_dir / "_build" / "text", d_model=text_dim, seed=seed,
                                       encoder_class=fam.text.encoder_class)
    vae_dir = build_tiny_vae(out_dir / "_build" / "vae", fam, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = fam.load(None, flavor)
    pipe = getattr(diffusers, fam.pipeline_class)(
        tokenizer=getattr(transformers, fam.text.tokenizer_class).from_pretrained(text_dir),
        text_encoder=getattr(transformers, fam.text.encoder_class).from_pretrained(text_dir),
        vae=getattr(diffusers, fam.vae.class_name).from_pretrained(vae_dir), transformer=transformer,
        scheduler=fam.make_scheduler(flavor),
    )
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_build")
    return out_dir
