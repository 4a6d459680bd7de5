"""Tiny random components for tests and the demo: a code-trained tokenizer + T5 encoder, and tiny video VAEs.

No downloads: everything is built from config dicts with seeded init and saved with save_pretrained, so
the rest of the library loads them exactly like real checkpoints (from_pretrained on a folder).
Sizes follow the measured CPU configs (cpu_facts §6): CogVideoX VAE 65k params, Mochi VAE ~600k.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastpost.data.synthetic import CAPTION_WORDS

# Mochi's GroupNorm is hard-coded to 32 groups, so its channels must be multiples of 32 (cpu_facts §6), and
# MochiPipeline reshapes latents_mean/std to 12 channels, so latent_channels stays 12.
TINY_VAE_CONFIGS = {
    "cogvideox": dict(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        sample_height=64, sample_width=64,
    ),
    "mochi": dict(
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
        latent_channels=12, layers_per_block=(1, 1, 1, 1, 1), add_attention_block=(False,) * 5,
    ),
}

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5 convention: pad=0, eos=1, unk=2


def build_tiny_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """A word-level tokenizer trained in code on the synthetic caption vocabulary, T5-style (appends </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted(set(CAPTION_WORDS) | {w.lower() for w in extra_words})
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right",
    )


def build_tiny_text_encoder(out_dir: str | Path, d_model: int = 16, num_layers: int = 2, num_heads: int = 2,
                            seed: int = 0) -> Path:
    """Save a tokenizer and a random T5EncoderModel (d_model = text embed dim) into out_dir; returns out_dir.

    Both live in the same folder, which TextEncoder.from_pretrained (and AutoTokenizer / T5EncoderModel)
    accept directly.
    """
    from transformers import T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_vae(out_dir: str | Path, family: str = "cogvideox", seed: int = 0, **overrides) -> Path:
    """Save a tiny random AutoencoderKLCogVideoX / AutoencoderKLMochi into out_dir; returns out_dir."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLMochi

    classes = {"cogvideox": AutoencoderKLCogVideoX, "mochi": AutoencoderKLMochi}
    if family not in classes:
        raise ValueError(f"unknown VAE family {family!r}; choose from {sorted(classes)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = classes[family](**{**TINY_VAE_CONFIGS[family], **overrides}).eval()
    vae.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_pipeline(out_dir: str | Path, family: str = "cogvideox", flavor: str = "debug", seed: int = 0) -> Path:
    """A complete diffusers pipeline folder (transformer, VAE, T5 + tokenizer, scheduler) with tiny random
    weights: the stand-in for e.g. THUDM/CogVideoX-2b that the demo and tests pass to every fastpost command."""
    import diffusers

    from fastpost.models import get_family

    fam = get_family(family)
    out_dir = Path(out_dir)
    text_dir = build_tiny_text_encoder(out_dir / "_build" / "text", d_model=fam.config(flavor)["text_embed_dim"],
                                       seed=seed)
    vae_dir = build_tiny_vae(out_dir / "_build" / "vae", family=family, seed=seed)
    from transformers import AutoTokenizer, T5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = fam.load(None, flavor)
    vae_cls = getattr(diffusers, fam.notes["vae_class"])
    pipe = getattr(diffusers, fam.pipeline_class)(
        tokenizer=AutoTokenizer.from_pretrained(text_dir), text_encoder=T5EncoderModel.from_pretrained(text_dir),
        vae=vae_cls.from_pretrained(vae_dir), transformer=transformer, scheduler=fam.make_scheduler(flavor),
    )
    pipe.save_pretrained(out_dir)
    import shutil

    shutil.rmtree(out_dir / "_build")
    return out_dir
