"""Preprocessing for pyramid_flux from raw videos: the release's text conventions (T5 at 128 tokens run with its
mask, plus CLIP-L's pooler output) and a VAE given by import path (`vae_class`), e.g. the CausalVideoVAE of the
user's own Pyramid Flow install. fastpost ships no code of that VAE: it needs only

    vae = cls.from_pretrained(vae_path)   (or cls() without a path)
    vae.encode(video_BCFHW in [-1, 1])    -> an object with .latent_dist (.mean used) or a tensor [B, C, f, h, w]
    vae.decode(latents_BCFHW)             -> an object with .sample or a tensor (sampling decodes with it)

Latents are normalised per frame as the release trains (fastpost.data.pyramid_import.normalize_per_frame).
Text encoders come from one folder in the release's layout: tokenizer/ + text_encoder/ (CLIP-L), tokenizer_2/ +
text_encoder_2/ (T5). Upstream extraction samples the VAE posterior; fastpost stores its mean (deterministic).

    fastpost preprocess-pyramid --data metadata.jsonl --out shards --vae-class pyramid_flow.video_vae:CausalVideoVAE \\
        --vae-path <miniflux>/causal_video_vae --text-encoders <miniflux> --resolution 384 640 --max-frames 121
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from fastpost.data import shards
from fastpost.data.preprocess import PreprocessConfig, load_pixels, read_metadata
from fastpost.data.pyramid_import import normalize_per_frame


def import_class(path: str) -> type:
    """'package.module:Class' (or 'package.module.Class') -> the class."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ValueError(f"vae_class {path!r} is not an import path: write 'package.module:ClassName'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"vae_class {path!r} cannot be imported ({e}): install the package that defines it "
                         f"(e.g. your Pyramid Flow checkout on PYTHONPATH)") from e


def load_vae_class(path: str, weights: str | None = None, device: str = "cpu", dtype=torch.float32):
    cls = import_class(path)
    for method in ("encode", "decode"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"vae_class {path} has no {method}() method: it needs encode(video) and decode(latents)")
    vae = cls.from_pretrained(weights) if weights is not None else cls()
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def vae_encode(vae, pixels_BCFHW: torch.Tensor) -> torch.Tensor:
    out = vae.encode(pixels_BCFHW)
    dist = getattr(out, "latent_dist", None)
    return (dist.mean if dist is not None else out).float()


@torch.no_grad()
def vae_decode(vae, latents_BCFHW: torch.Tensor) -> torch.Tensor:
    out = vae.decode(latents_BCFHW)
    return getattr(out, "sample", out).float()


def denormalize_per_frame(latents_CFHW: torch.Tensor, norm: dict) -> torch.Tensor:
    """The inverse of normalize_per_frame (what the VAE decodes)."""
    first, other = norm["first_frame"], norm["other_frames"]
    x = latents_CFHW.float().clone()
    x[:, :1] = x[:, :1] / first["scale"] + first["shift"]
    x[:, 1:] = x[:, 1:] / other["scale"] + other["shift"]
    return x


class FluxText:
    """The release's text encoders: T5 (max_length, run with its mask) + CLIP-L pooled (77 tokens, no mask)."""

    def __init__(self, folder: str | Path, max_length: int = 128, device: str = "cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        folder = Path(folder)
        for sub in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"{folder} has no {sub}/: pass the release's folder (tokenizer/, text_encoder/ "
                                        f"= CLIP-L, tokenizer_2/, text_encoder_2/ = T5)")
        self.clip_tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        self.clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).to(device, dtype).eval()
        self.t5_tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer_2"))
        self.t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2")).to(device, dtype).eval()
        self.max_length, self.device = max_length, device
        self.clip_length = min(77, int(getattr(self.clip_tok, "model_max_length", 77) or 77))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        t5 = self.t5_tok(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt")
        mask = t5.attention_mask.to(self.device)
        embeds = self.t5(t5.input_ids.to(self.device), attention_mask=mask)[0]
        clip = self.clip_tok(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                             return_tensors="pt")
        pooled = self.clip(clip.input_ids.to(self.device)).pooler_output
        return {"prompt_embeds": embeds.float(), "prompt_attention_mask": mask.bool(),
                "pooled_prompt_embeds": pooled.float()}


def preprocess_pyramid(data: str, out: str, vae_class: str, text_encoders: str, norm: dict, family: str,
                       vae_path: str | None = None, resolutions=((384, 640),), max_frames: int = 121,
                       samples_per_shard: int = 8, dtype: str = "bfloat16", device: str = "cpu") -> dict[str, Any]:
    """Videos + captions (any fastpost reader format) -> pyramid_flux shards; returns a report."""
    root = Path(out)
    if (root / shards.MANIFEST).exists():
        raise FileExistsError(f"{root} already holds shards ({shards.MANIFEST}); preprocess into a new folder")
    cast = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    pcfg = PreprocessConfig(data=data, output_dir=out, vae=vae_path or vae_class, text_encoder=text_encoders,
                            resolutions=[tuple(r) for r in resolutions], max_frames=max_frames, num_workers=0)
    base, rows, skipped = read_metadata(data)
    vae = load_vae_class(vae_class, vae_path, device)
    text = FluxText(text_encoders, device=device)
    empty = text.encode([""])
    header = {"vae": {"family": family, "class": vae_class, "normalization": {"per_frame": norm},
                      "frame_multiple": 8, "latent_frame_multiple": 1},
              "text_encoder": {"path": str(text_encoders), "hidden_size": int(empty["prompt_embeds"].shape[-1]),
                               "max_length": text.max_length, "pass_mask": True, "pooled": "CLIP pooler_output",
                               "empty_prompt": shards.EMPTY_PROMPT},
              "latents": "VAE posterior mean, normalised per frame (fastpost.data.pyramid_preprocess)"}
    shards.create_manifest(root, header)
    shards.write_empty_prompt(root, empty["prompt_embeds"][0].to(cast), empty["prompt_attention_mask"][0],
                              empty["pooled_prompt_embeds"][0].to(cast))
    batch, index, written = [], 0, 0
    for row in rows:
        source = base / row["path"]
        pixels, bucket = load_pixels(source, pcfg, 8)
        latents = normalize_per_frame(vae_encode(vae, pixels[None].to(device))[0], norm)
        t = text.encode([row["caption"]])
        batch.append({"latents": latents.to(cast), "prompt_embeds": t["prompt_embeds"][0].to(cast),
                      "prompt_attention_mask": t["prompt_attention_mask"][0],
                      "pooled_prompt_embeds": t["pooled_prompt_embeds"][0].to(cast),
                      "caption": row["caption"], "source": str(source), "bucket": bucket})
        if len(batch) == samples_per_shard:
            shards.append_manifest(root, shards.write_shard(root, index, batch))
            written, batch, index = written + len(batch), [], index + 1
    if batch:
        shards.append_manifest(root, shards.write_shard(root, index, batch))
        written, index = written + len(batch), index + 1
    return {"samples": written, "shards": index, "skipped": len(skipped), "output_dir": str(root)}


def main(argv: list[str] | None, get_family) -> int:
    """`fastpost preprocess-pyramid ...` (the CLI passes get_family: data never imports models)."""
    p = argparse.ArgumentParser(prog="fastpost preprocess-pyramid", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="metadata.jsonl (or any fastpost reader format) of videos + captions")
    p.add_argument("--out", required=True)
    p.add_argument("--vae-class", required=True, help="import path of the VAE class, 'package.module:Class'")
    p.add_argument("--vae-path", default=None, help="its weights folder (cls.from_pretrained(path))")
    p.add_argument("--text-encoders", required=True, help="folder with tokenizer/ text_encoder/ tokenizer_2/ "
                                                           "text_encoder_2/ (the release's)")
    p.add_argument("--resolution", type=int, nargs=2, action="append", default=None, help="height width (repeat)")
    p.add_argument("--max-frames", type=int, default=121)
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    family = get_family("pyramid_flux")
    report = preprocess_pyramid(args.data, args.out, args.vae_class, args.text_encoders, family.notes["latent_norm"],
                                family.name, args.vae_path, args.resolution or [(384, 640)], args.max_frames,
                                args.samples_per_shard, args.dtype, args.device)
    print(json.dumps(report))
    return 0
