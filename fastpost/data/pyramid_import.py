"""Import what Pyramid Flow's own extraction tools wrote into fastpost latent shards (family pyramid_flux).

Upstream's `tools/extract_video_vae_latents.py` saves raw (un-normalised) VAE latents per video, `[1, 16, T, h, w]`
in a `.pt`; `tools/extract_text_features.py` saves per caption a `.pt` dict with `prompt_embed` [1, 128, 4096] (T5,
run with its mask), `prompt_attention_mask` [1, 128] and `pooled_prompt_embed` [1, 768] (CLIP-L pooler). Their
annotation file is a jsonl of {"video", "text", "latent", "text_fea"}. The importer reads that file and writes
shards whose latents are normalised per frame as upstream's training does (frame 0 like an image, later frames
with the video statistics), records that normalisation in the header, and stores the encoding of "" (which the
user extracts with the same tool: a one-line jsonl {"text": "", "text_fea": "empty.pt"}) for caption dropout and
guidance.

    fastpost import-pyramid --anno annotation/video_text.jsonl --empty-text empty.pt --out shards

`.pt` files are read with torch.load(weights_only=True): tensors and containers only, no code. This module is
data-layer: the normalisation and text length come from the caller (main() reads them from the family).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fastpost.data import shards

log = logging.getLogger("fastpost.pyramid_import")
TEXT_KEYS = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")


def _load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: the annotation names it; run upstream's "
                                f"extraction for it or drop the row")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_text_features(path: Path) -> dict[str, torch.Tensor]:
    """prompt_embeds [T, D], prompt_attention_mask [T] (bool), pooled_prompt_embeds [D] from an upstream `.pt`."""
    raw = _load(path, "text feature file")
    missing = [k for k in TEXT_KEYS if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a text feature file of Pyramid Flow's "
                         f"tools/extract_text_features.py (keys {list(TEXT_KEYS)})")
    squeeze = lambda t: t[0] if t.dim() and t.shape[0] == 1 else t  # noqa: E731  (saved with a batch dim of 1)
    return {"prompt_embeds": squeeze(raw["prompt_embed"]),
            "prompt_attention_mask": squeeze(raw["prompt_attention_mask"]).bool(),
            "pooled_prompt_embeds": squeeze(raw["pooled_prompt_embed"])}


def normalize_per_frame(latents_CFHW: torch.Tensor, norm: dict) -> torch.Tensor:
    """Upstream's get_vae_latent: frame 0 as an image, (x - shift) * scale with the first-frame statistics, the
    later frames with the video ones."""
    first, other = norm["first_frame"], norm["other_frames"]
    x = latents_CFHW.float().clone()
    x[:, :1] = (x[:, :1] - first["shift"]) * first["scale"]
    x[:, 1:] = (x[:, 1:] - other["shift"]) * other["scale"]
    return x


def import_upstream(anno: str | Path, out: str | Path, empty_text: str | Path, norm: dict, family: str,
                    root: str | Path | None = None, max_frames: int | None = None, samples_per_shard: int = 16,
                    dtype: str = "bfloat16") -> dict[str, Any]:
    """Write shards from an upstream annotation jsonl; returns a report. Paths in the annotation are relative to
    `root` (default: the annotation file's folder). Re-running into a finished folder refuses (nothing is
    overwritten); an interrupted run leaves only complete shards, which a rerun into a new folder repeats."""
    anno, out = Path(anno), Path(out)
    base = Path(root) if root is not None else anno.parent
    cast = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if (out / shards.MANIFEST).exists():
        raise FileExistsError(f"{out} already holds shards ({shards.MANIFEST}); import into a new folder")
    rows = [json.loads(line) for line in anno.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in ("latent", "text_fea") if k not in row]
        if missing:
            raise ValueError(f"{anno} line {i + 1} lacks {missing}: expected upstream's annotation rows "
                             f"{{'video', 'text', 'latent', 'text_fea'}}")
    empty = read_text_features(Path(empty_text))
    header = {"vae": {"family": family, "class": "CausalVideoVAE (Pyramid Flow)", "normalization":
                      {"per_frame": norm}, "frame_multiple": 8, "latent_frame_multiple": 1},
              "text_encoder": {"path": "T5-XXL + CLIP-L (Pyramid Flow's extract_text_features.py)",
                               "hidden_size": int(empty["prompt_embeds"].shape[-1]),
                               "max_length": int(empty["prompt_embeds"].shape[0]), "pass_mask": True,
                               "pooled": "CLIP-L pooler_output", "empty_prompt": shards.EMPTY_PROMPT},
              "latents": "upstream sampled VAE latents, normalised per frame (fastpost.data.pyramid_import)",
              "source": {"annotation": str(anno), "max_frames": max_frames}}
    shards.create_manifest(out, header)
    shards.write_empty_prompt(out, empty["prompt_embeds"].to(cast), empty["prompt_attention_mask"],
                              empty["pooled_prompt_embeds"].to(cast))
    written, batch, index = 0, [], 0
    for row in rows:
        latents = _load(base / row["latent"], "latent file")
        latents = latents[0] if latents.dim() == 5 else latents  # [1, C, T, h, w] -> [C, T, h, w]
        if max_frames is not None:
            latents = latents[:, :max_frames]
        text = read_text_features(base / row["text_fea"])
        if text["prompt_embeds"].shape != empty["prompt_embeds"].shape:
            raise ValueError(f"{row['text_fea']} holds prompts of shape {list(text['prompt_embeds'].shape)} but the "
                             f"empty prompt has {list(empty['prompt_embeds'].shape)}: extract both with the same tool")
        batch.append({"latents": normalize_per_frame(latents, norm).to(cast),
                      "prompt_embeds": text["prompt_embeds"].to(cast),
                      "prompt_attention_mask": text["prompt_attention_mask"],
                      "pooled_prompt_embeds": text["pooled_prompt_embeds"].to(cast),
                      "caption": row.get("text", ""), "source": row.get("video", row["latent"]),
                      "bucket": "x".join(str(n) for n in latents.shape)})
        if len(batch) == samples_per_shard:
            shards.append_manifest(out, shards.write_shard(out, index, batch))
            written, batch, index = written + len(batch), [], index + 1
    if batch:
        shards.append_manifest(out, shards.write_shard(out, index, batch))
        written += len(batch)
    report = {"samples": written, "shards": index + (1 if batch else 0), "output_dir": str(out)}
    log.info("imported %d samples into %s", written, out)
    return report


def main(argv: list[str] | None, get_family) -> int:
    """`fastpost import-pyramid ...`: the CLI (the composition root) passes get_family, so the family's facts (the
    per-frame normalisation) reach the data layer without it importing models."""
    p = argparse.ArgumentParser(prog="fastpost import-pyramid", description=__doc__.split("\n\n")[0])
    p.add_argument("--anno", required=True, help="upstream annotation jsonl ({'text', 'latent', 'text_fea'} rows)")
    p.add_argument("--empty-text", required=True, help="upstream text feature .pt of the empty prompt \"\"")
    p.add_argument("--out", required=True, help="new shard folder")
    p.add_argument("--root", default=None, help="folder the annotation's paths are relative to (default: its own)")
    p.add_argument("--max-frames", type=int, default=None, help="keep the first N latent frames (e.g. 16 at 384p)")
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    family = get_family("pyramid_flux")
    report = import_upstream(args.anno, args.out, args.empty_text, family.notes["latent_norm"], family.name,
                             args.root, args.max_frames, args.samples_per_shard, args.dtype)
    print(json.dumps(report))
    return 0
