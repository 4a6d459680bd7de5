"""Text encoder wrapper shared by preprocessing and the sampler: prompts -> (embeds [B,T,D], mask [B,T]).

Both sides must produce the same embeddings for the same prompt, so what differs between the diffusers pipelines
comes from the family's TextSpec (fastpost.components): the encoder class, whether the encoder sees the attention
mask (CogVideoXPipeline: no, padding tokens attend to everything; MochiPipeline: yes) and whether padding
embeddings are zeroed. Fine-tuning real checkpoints then sees the embeddings they were trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastpost.components import TextSpec


def with_id_token(prompt: str, id_token: str | None) -> str:
    """`prompt` with the LoRA's identifier token in front, joined as diffusers' CogVideoX LoRA script joins them
    (`id_token + prompt`: put the separator in the token, e.g. "BW_STYLE, "). Preprocessing applies it to every
    caption; validation and sampling prompts of that LoRA need it as well (the train job's `id_token`)."""
    return f"{id_token}{prompt}" if id_token else prompt


def text_spec(family_or_spec: Any) -> TextSpec | None:
    """A TextSpec from a TextSpec, a model family (its `.text`) or None. Family *names* are not looked up here
    (data does not import the model registry): pass fastpost.models.get_family(name)."""
    if family_or_spec is None or isinstance(family_or_spec, TextSpec):
        return family_or_spec
    if isinstance(family_or_spec, str):
        raise TypeError(f"pass the model family object (fastpost.models.get_family({family_or_spec!r})) or its "
                        f".text spec, not the name {family_or_spec!r}")
    spec = getattr(family_or_spec, "text", None)
    if spec is None:
        raise ValueError(f"model family {getattr(family_or_spec, 'name', family_or_spec)!r} has no text encoder")
    return spec


def _component_dir(path: str | Path, subfolder: str) -> Path:
    """Accept either a component folder or a whole diffusers pipeline folder (with tokenizer/, text_encoder/)."""
    path = Path(path)
    if (path / subfolder).is_dir():
        return path / subfolder
    return path


class TextEncoder:
    """A tokenizer + T5-style encoder pair; `encode` pads every prompt to `max_length` so samples stack."""

    def __init__(self, tokenizer, model: torch.nn.Module, pass_mask: bool = True,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 zero_padding: bool = False, prompt_clean: Any = None) -> None:
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.pass_mask = pass_mask
        self.zero_padding = zero_padding
        self.prompt_clean = prompt_clean  # the pipeline's cleaning of prompt text (TextSpec.prompt_clean)
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, family: Any = None, pass_mask: bool | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        allow_pickle: bool = False) -> "TextEncoder":
        """Load from a folder holding both tokenizer and encoder files, or a pipeline folder.

        family: a model family or its TextSpec (encoder/tokenizer classes, conventions); None: T5, mask passed.
        pass_mask: None -> the spec's pipeline convention.
        """
        import transformers

        spec = text_spec(family) or TextSpec()

        tok_dir, enc_dir = _component_dir(path, "tokenizer"), _component_dir(path, "text_encoder")
        if not (enc_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no text encoder config.json under {str(path)!r}; pass a folder saved with save_pretrained "
                f"(e.g. built by fastpost.data.tiny.build_tiny_text_encoder) or a diffusers pipeline folder"
            )
        tokenizer = getattr(transformers, spec.tokenizer_class).from_pretrained(str(tok_dir))
        from fastpost.safe_load import pretrained_kwargs  # safetensors only, unless the job opts in to pickles

        model = getattr(transformers, spec.encoder_class).from_pretrained(
            str(enc_dir), **pretrained_kwargs(enc_dir, allow_pickle))
        pass_mask = spec.pass_mask if pass_mask is None else pass_mask
        return cls(tokenizer, model, pass_mask=pass_mask, device=device, dtype=dtype, zero_padding=spec.zero_padding,
                   prompt_clean=spec.prompt_clean)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (embeds [B, max_length, D] in self.dtype, mask [B, max_length] int64 with 1 = real token)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.prompt_clean is not None:
            prompts = [self.prompt_clean(p) for p in prompts]
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        ids_BT = tokens["input_ids"].to(self.device)
        mask_BT = tokens["attention_mask"].to(self.device)
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT if self.pass_mask else None)
        embeds = out.last_hidden_state
        if self.zero_padding:  # the pipeline trims each prompt to its tokens and pads with zeros (Wan)
            embeds = embeds * mask_BT[..., None].to(embeds.dtype)
        return embeds.to(self.dtype), mask_BT.to(torch.int64)
