"""Text encoder wrapper shared by preprocessing and the sampler: prompts -> (embeds [B,T,D], mask [B,T]).

Both sides must produce the same embeddings for the same prompt, so the one thing that differs between the
diffusers pipelines lives here as an explicit flag: CogVideoXPipeline calls the T5 encoder *without* the
attention mask (padding tokens attend to everything), MochiPipeline passes it. `pass_mask=None` picks the
family default so that fine-tuning real checkpoints sees the embeddings they were trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch

# What each diffusers pipeline does when it runs the T5 encoder (see _get_t5_prompt_embeds in each pipeline).
FAMILY_PASSES_MASK = {"cogvideox": False, "mochi": True}


def _component_dir(path: str | Path, subfolder: str) -> Path:
    """Accept either a component folder or a whole diffusers pipeline folder (with tokenizer/, text_encoder/)."""
    path = Path(path)
    if (path / subfolder).is_dir():
        return path / subfolder
    return path


class TextEncoder:
    """A tokenizer + T5-style encoder pair; `encode` pads every prompt to `max_length` so samples stack."""

    def __init__(self, tokenizer, model: torch.nn.Module, pass_mask: bool = True,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.pass_mask = pass_mask
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, family: str | None = None, pass_mask: bool | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load from a folder holding both tokenizer and encoder files, or a pipeline folder.

        pass_mask: None -> the family's pipeline convention (FAMILY_PASSES_MASK), True when family is None.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        tok_dir, enc_dir = _component_dir(path, "tokenizer"), _component_dir(path, "text_encoder")
        if not (enc_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no text encoder config.json under {str(path)!r}; pass a folder saved with save_pretrained "
                f"(e.g. built by fastpost.data.tiny.build_tiny_text_encoder) or a diffusers pipeline folder"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        model = T5EncoderModel.from_pretrained(str(enc_dir))
        if pass_mask is None:
            pass_mask = FAMILY_PASSES_MASK.get(family, True) if family else True
        return cls(tokenizer, model, pass_mask=pass_mask, device=device, dtype=dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (embeds [B, max_length, D] in self.dtype, mask [B, max_length] int64 with 1 = real token)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        ids_BT = tokens["input_ids"].to(self.device)
        mask_BT = tokens["attention_mask"].to(self.device)
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT if self.pass_mask else None)
        return out.last_hidden_state.to(self.dtype), mask_BT.to(torch.int64)
