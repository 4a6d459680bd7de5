"""Tiny random components for tests and the demo: a code-trained tokenizer + T5 encoder, and tiny video VAEs
(each family's VaeSpec holds its tiny config). A whole tiny pipeline is fastpost.tiny.build_tiny_pipeline.

No downloads: everything is built from config dicts with seeded init and saved with save_pretrained, so
the rest of the library loads them exactly like real checkpoints (from_pretrained on a folder).
Sizes follow the measured CPU configs (cpu_facts §6): CogVideoX VAE 65k params, Mochi VAE ~600k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastpost.data.synthetic import CAPTION_WORDS

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
                            seed: int = 0, encoder_class: str = "T5EncoderModel") -> Path:
    """Save a tokenizer and a random T5EncoderModel (or UMT5EncoderModel: Wan) (d_model = text embed dim) into
    out_dir; returns out_dir.

    Both live in the same folder, which TextEncoder.from_pretrained (and AutoTokenizer / T5EncoderModel)
    accept directly.
    """
    import transformers

    if encoder_class not in ("T5EncoderModel", "UMT5EncoderModel"):
        raise ValueError(f"tiny text encoders are T5EncoderModel or UMT5EncoderModel, not {encoder_class!r}")
    config_cls = transformers.UMT5Config if encoder_class == "UMT5EncoderModel" else transformers.T5Config
    T5EncoderModel = getattr(transformers, encoder_class)

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = config_cls(
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


def build_tiny_vae(out_dir: str | Path, family: Any, seed: int = 0, **overrides) -> Path:
    """Save a tiny random VAE of a model family (or a VaeSpec: its class and debug_config) into out_dir."""
    spec = getattr(family, "vae", family)
    if not hasattr(spec, "build_tiny"):
        raise TypeError(f"pass a model family with a VAE (fastpost.models.get_family(name)) or its VaeSpec, "
                        f"not {family!r}")
    return spec.build_tiny(out_dir, seed=seed, **overrides)
