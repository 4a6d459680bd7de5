"""Preprocessing: captioned videos/images -> normalised VAE latents + text embeddings in safetensors shards.

    python -m fastpost.data.preprocess data=<inputs> output_dir=<dir> vae=<dir> text_encoder=<dir>
    torchrun --nproc_per_node=N -m fastpost.data.preprocess ...     (rank r takes shards r, r+N, ...)

`data` is any format fastpost.data.readers reads (metadata.jsonl, FastVideo JSON, CSV, diffusers txt pairs,
webdataset .tar). DataLoader worker processes decode and resize; the main process runs the VAE and text encoder.
Inputs are grouped into shards of `samples_per_shard` consecutive metadata rows, so shard i always holds the
same inputs and a rerun can skip every shard that already has a manifest line (resumable after a kill).
An unreadable input is logged, listed in the shard's manifest entry and in preprocess_report.json, and
skipped. Latents are the posterior *mean* (deterministic, so shards are reproducible bit for bit), stored in
the normalisation the diffusers pipelines feed the DiT (see normalize_latents).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastpost.components import denormalize_latents, latent_norm, load_vae, normalize_latents
from fastpost.config import ConfigError, apply_overrides, from_dict, load_yaml
from fastpost.data import readers, shards
from fastpost.data.text import TextEncoder, with_id_token
from fastpost.distributed.fsdp import DTYPES

log = logging.getLogger("fastpost.data.preprocess")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPORT = "preprocess_report.json"


@dataclass
class PreprocessConfig:
    data: str  # inputs in any fastpost.data.readers format (metadata.jsonl, FastVideo .json, .csv, prompts.txt +
    #            videos.txt, webdataset .tar), or the folder holding them
    output_dir: str
    vae: str  # a VAE folder (save_pretrained) or a diffusers pipeline folder with vae/
    text_encoder: str  # a folder with tokenizer + T5 encoder, or a pipeline folder with tokenizer/ text_encoder/
    family: str | None = None  # the model family (its VAE and text conventions); None: the one whose VAE class
    #                            the `vae` folder holds (resolved by `main`)
    resolutions: list[tuple[int, int]] = field(default_factory=lambda: [(64, 64)])  # (height, width) buckets
    max_frames: int = 25  # upper bound; the count used is the largest VAE-valid one (4k+1 / 6k+1) that fits
    frame_stride: int = 1  # take every n-th source frame
    # resample to this frame rate (nearest earlier source frame); "family": the fps the model was trained at
    # (CogVideoX 8, CogVideoX 1.5 16 (from the transformer config), Mochi 30); None: keep every (strided) frame
    target_fps: float | Literal["family"] | None = None
    # the reader of `data` (fastpost.data.readers); "auto": from the file's extension or the folder's contents
    data_format: Literal["auto", "jsonl", "fastvideo_json", "txt_pairs", "csv", "webdataset"] = "auto"
    # DataLoader processes that decode + resize (0: in the main process). "auto": on CUDA, this rank's share of
    # the CPU cores less one, at most 8; on CPU 0, since the VAE already uses every core there (measured on 2
    # cores: 2 workers made the whole job 1.5x slower, docs/performance.md)
    num_workers: int | Literal["auto"] = "auto"
    # prompt length in tokens; None: the transformer config's (family.text.max_length: CogVideoX 226, Mochi 256),
    # which the pipelines pad to and `fastpost train` checks the shards against
    max_text_length: int | None = None
    transformer: str | None = None  # transformer config source (a pipeline or transformer folder) for the text
    #                                 length and latent frame padding; None: the `vae` folder when it is a pipeline
    samples_per_shard: int = 8
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of latents and embeddings
    device: str = "auto"
    # VAE + text encoder weights and compute; "auto": bfloat16 on CUDA (halves an fp32 T5-XXL's 19 GB), float32
    # on CPU (exact). Outputs are normalised in fp32, then cast to `dtype` for storage.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # diffusers' tiled (+ sliced) VAE encode; "auto": on for CUDA, where real-size clips run (Mochi's VAE
    # otherwise encodes a whole clip at once), off on CPU so the tiny test VAEs encode exactly
    vae_tiling: bool | Literal["auto"] = "auto"
    text_encoder_pass_mask: bool | None = None  # None: what the family's diffusers pipeline does
    # image-to-video models with an image encoder (Wan 2.1 I2V's CLIP): a pipeline folder with image_encoder/ and
    # image_processor/; None: the `vae` folder
    image_encoder: str | None = None
    allow_pickle: bool = False  # accept pickled .bin weights for the VAE / text encoder (they can run code)
    limit: int | None = None  # only the first N input rows (smoke runs)
    # a LoRA's identifier token, prepended to every caption (fastpost.data.text.with_id_token, as diffusers'
    # CogVideoX LoRA script's --id_token); recorded in the manifest, where the train job's `id_token` must match it
    id_token: str | None = None

    def __post_init__(self) -> None:
        if not self.resolutions:
            raise ConfigError("PreprocessConfig.resolutions needs at least one (height, width) bucket")
        for name in ("max_frames", "frame_stride", "max_text_length", "samples_per_shard"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"PreprocessConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ConfigError(f"PreprocessConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.target_fps is not None:
            if self.target_fps != "family" and not self.target_fps > 0:
                raise ConfigError(f"PreprocessConfig.target_fps must be > 0, 'family' or null, got {self.target_fps}")
            if self.frame_stride != 1:
                raise ConfigError("PreprocessConfig: set target_fps or frame_stride, not both (target_fps already "
                                  "picks which source frames to keep)")


# ---- VAE + latent normalisation (the helpers live in fastpost.components; re-exported for callers of this module)
__all__ = ["PreprocessConfig", "preprocess", "main", "load_vae", "latent_norm", "normalize_latents",
           "denormalize_latents", "valid_frame_count", "encode_video", "load_pixels"]


def valid_frame_count(available: int, multiple: int, max_frames: int) -> int:
    """Largest k * multiple + 1 <= min(available, max_frames) (1 for images or too-short clips)."""
    limit = min(available, max_frames)
    if limit < 1:
        raise ValueError(f"no frames to use (available={available}, max_frames={max_frames})")
    return (limit - 1) // multiple * multiple + 1


# ---- decoding + geometry -------------------------------------------------------------------------
def read_frames(path: str | Path, max_frames: int | None = None, stride: int = 1,
                target_fps: float | None = None) -> np.ndarray:
    """uint8 [F, H, W, 3]; images give one frame. Stops decoding once enough frames are read.

    target_fps: output frame j shows source frame floor(j * source_fps / target_fps), the one on screen at time
    j / target_fps (dropping frames to slow down a 30 fps clip to 8, repeating them when the target is faster)."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTS:
        img = np.asarray(imageio.imread(path))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return img[None, ..., :3]
    need = None if max_frames is None else (max_frames - 1) * stride + 1
    frames = []
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        if target_fps is not None:
            src_fps = float(reader.get_meta_data().get("fps") or 0)
            if not src_fps > 0:
                raise ValueError(f"{path} reports no frame rate, so it cannot be resampled to {target_fps} fps")
            step, j = src_fps / target_fps, 0
            for i, frame in enumerate(reader):
                # 1e-9: j * step is exact in decimal (e.g. 3 * 2.5) but may land a hair below in binary
                while (max_frames is None or j < max_frames) and math.floor(j * step + 1e-9) == i:
                    frames.append(np.asarray(frame)[..., :3])
                    j += 1
                if max_frames is not None and j >= max_frames:
                    break
        else:
            for i, frame in enumerate(reader):
                if need is not None and i >= need:
                    break
                if i % stride == 0:
                    frames.append(np.asarray(frame)[..., :3])
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"no frames could be decoded from {path}")
    return np.stack(frames)


def choose_bucket(height: int, width: int, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(resolutions, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - aspect), -hw[0] * hw[1]))


def resize_center_crop(frames_FHWC: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F,H,W,3] -> float32 [3,F,height,width] in [-1, 1]: scale to cover the bucket, then centre-crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames_FHWC)).permute(0, 3, 1, 2).float()  # F,3,H,W
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def load_pixels(path: str | Path, cfg: PreprocessConfig, multiple: int,
                target_fps: float | None = None) -> tuple[torch.Tensor, str]:
    """Decode + choose bucket + valid frame count + resize/crop: ([3,F,H,W] in [-1,1], bucket 'FxHxW').
    target_fps: the resolved frame rate (default: cfg.target_fps when it is a number)."""
    if target_fps is None and isinstance(cfg.target_fps, (int, float)):
        target_fps = float(cfg.target_fps)
    frames = read_frames(path, cfg.max_frames, cfg.frame_stride, target_fps)
    n = valid_frame_count(len(frames), multiple, cfg.max_frames)
    h, w = choose_bucket(frames.shape[1], frames.shape[2], cfg.resolutions)
    return resize_center_crop(frames[:n], h, w), f"{n}x{h}x{w}"


@torch.no_grad()
def encode_video(vae: Any, pixels_CFHW: torch.Tensor) -> torch.Tensor:
    """One clip -> normalised latents [C, f, h, w] (posterior mean: deterministic, no sampling noise)."""
    p = next(vae.parameters())
    x = pixels_CFHW[None].to(device=p.device, dtype=p.dtype)
    mean = vae.encode(x).latent_dist.mean
    return normalize_latents(vae, mean.float())[0]  # fp32 normalisation whatever the VAE's compute dtype


@contextmanager
def _input_file(base: Path, row: dict[str, Any]) -> Iterator[Path]:
    """The input as a file path: the file itself, or a webdataset member copied out of its .tar (ffmpeg reads
    files; the copy lives only while it is decoded)."""
    if not row.get("member"):
        yield base / str(row["path"])
        return
    if row.get("member_offset") is not None:  # an uncompressed tar: read the member's bytes in place
        with open(base / str(row["path"]), "rb") as f:
            f.seek(int(row["member_offset"]))
            data = f.read(int(row["member_size"]))
    else:
        with tarfile.open(base / str(row["path"])) as tar:
            f = tar.extractfile(row["member"])
            if f is None:
                raise ValueError(f"{row['member']} in {row['path']} is not a regular file")
            data = f.read()
    fd, tmp = tempfile.mkstemp(suffix=Path(row["member"]).suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def _error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class _DecodeDataset(torch.utils.data.Dataset):
    """(shard index, row) -> decoded, resized pixels, run in DataLoader workers so that ffmpeg and the resize
    overlap the VAE encode in the main process. A failure is returned (not raised) so the input is skipped."""

    def __init__(self, base: Path, items: list[tuple[int, dict[str, Any]]], cfg: PreprocessConfig, multiple: int,
                 target_fps: float | None) -> None:
        self.base, self.items, self.cfg, self.multiple, self.target_fps = base, items, cfg, multiple, target_fps

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, row = self.items[i]
        worker = torch.utils.data.get_worker_info()
        out: dict[str, Any] = {"index": index, "row": row, "worker": None if worker is None else worker.id}
        try:
            with _input_file(self.base, row) as path:
                out["pixels"], out["bucket"] = load_pixels(path, self.cfg, self.multiple, self.target_fps)
        except Exception as e:  # any decode problem is a data problem: the caller logs, counts, moves on
            out["error"] = _error_line(e)
        return out


def _as_is(item: Any) -> Any:  # DataLoader collate_fn: items pass through (a module function, so it pickles)
    return item


def decoded_inputs(base: Path, items: list[tuple[int, dict[str, Any]]], cfg: PreprocessConfig, multiple: int,
                   target_fps: float | None = None, num_workers: int | None = None) -> Iterator[dict[str, Any]]:
    """The decoded items in order: {"index", "row", "pixels", "bucket"} or {"index", "row", "error"}.
    num_workers: the resolved count (default: cfg.num_workers, "auto" resolved for this process's device)."""
    if num_workers is None:
        num_workers = _resolve_workers(cfg.num_workers, _resolve_device(cfg.device))
    ds = _DecodeDataset(base, items, cfg, multiple, target_fps)
    if num_workers == 0 or not items:
        return (ds[i] for i in range(len(ds)))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_as_is,
                                            num_workers=min(num_workers, len(items))))


# ---- the job -------------------------------------------------------------------------------------
def read_metadata(data: str | Path, limit: int | None = None,
                  data_format: str = "auto") -> tuple[Path, list[dict[str, Any]], list[dict[str, str]]]:
    """(base folder, rows, entries the reader skipped) of `data` in any fastpost.data.readers format."""
    rec = readers.read_records(data, data_format)
    return rec.base, rec.rows[:limit] if limit is not None else rec.rows, rec.skipped


def _resolve_workers(n: int | str, device: torch.device) -> int:
    if n != "auto":
        return int(n)
    if device.type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_rank - 1))


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def transformer_config(cfg: PreprocessConfig) -> dict | None:
    """The transformer config.json from cfg.transformer (a pipeline or transformer folder), else from the vae or
    text_encoder folder when it is a whole pipeline (transformer/config.json); None when there is none."""
    if cfg.transformer:
        candidates = [Path(cfg.transformer) / "transformer" / "config.json", Path(cfg.transformer) / "config.json"]
    else:
        candidates = [Path(p) / "transformer" / "config.json" for p in (cfg.vae, cfg.text_encoder)]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    if cfg.transformer:
        raise ConfigError(f"transformer={cfg.transformer!r} holds neither transformer/config.json nor config.json")
    return None


def text_length(cfg: PreprocessConfig, family: Any, config: dict | None) -> int:
    """max_text_length, else the transformer config's prompt length (what the pipeline pads prompts to)."""
    if cfg.max_text_length is not None:
        return cfg.max_text_length
    length = family.text.max_length(config) if config is not None and family.text is not None else None
    if not length:
        key = family.text.max_length_key if family.text is not None else "max_text_length"
        raise ConfigError(f"max_text_length is unset and there is no transformer config to read {key!r} from: pass "
                          f"a pipeline folder (vae=<pipeline> or transformer=<pipeline>) or set max_text_length")
    return int(length)


def pad_latent_frames(latents_CFHW: torch.Tensor, patch_t: int) -> torch.Tensor:
    """Latent frames up to a multiple of the transformer's temporal patch by repeating the first latent frame in
    front, as CogVideoX 1.5's own finetuning does (13 latent frames of a 49-frame clip -> 14; an image -> 2)."""
    pad = (patch_t - latents_CFHW.shape[1] % patch_t) % patch_t
    if not pad:
        return latents_CFHW
    return torch.cat([latents_CFHW[:, :1].expand(-1, pad, -1, -1), latents_CFHW], dim=1)


def image_noise_generator(source: str) -> torch.Generator:
    """The generator of one input's image-conditioning noise, seeded by its source path: shards stay reproducible
    and a rerun (or another world size) encodes the same input identically."""
    import hashlib

    return torch.Generator().manual_seed(int(hashlib.sha256(source.encode()).hexdigest()[:15], 16))


@torch.no_grad()
def encode_image_condition(vae: Any, image: Any, pixels_CFHW: torch.Tensor, source: str,
                           embedder: tuple | None = None) -> dict[str, torch.Tensor]:
    """The image-to-video conditioning of one clip ({field: [..]} without the batch dim) from its first frame,
    with the family's training noise (`image.train_noise_log_sigma`: pixels + sigma * randn, log sigma normal)."""
    first_3HW = pixels_CFHW[:, 0].float()
    if image.train_noise_log_sigma is not None:
        mean, std = image.train_noise_log_sigma
        g = image_noise_generator(source)
        sigma = math.exp(mean + std * torch.randn((), generator=g).item())
        first_3HW = first_3HW + sigma * torch.randn(first_3HW.shape, generator=g)
    out = image.encode(vae, first_3HW[None], pixels_CFHW.shape[1], None)
    if embedder is not None:  # (encoder, processor): the image encoder sees the (noised) frame as an 8-bit image
        from PIL import Image

        rgb = ((first_3HW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        out[image.embed_field] = image.embed(*embedder, [Image.fromarray(rgb)])
    return {k: v[0].float() for k, v in out.items()}


def _header(cfg: PreprocessConfig, family: Any, vae: Any, text: TextEncoder, length: int,
            patch_t: int, config: dict | None = None) -> dict[str, Any]:
    cond = {}
    if config is not None and hasattr(family, "takes_image") and family.takes_image(config):
        # the shards carry the first frame's conditioning (fastpost.data.shards: batch["cond"])
        cond = {"conditioning": {"inputs": list(family.conditioning_inputs(config)),
                                 "fields": list(family.cond_fields(config)),
                                 "image_noise_log_sigma": family.image.train_noise_log_sigma}}
    return {**cond,
        "vae": {"family": family.name, "class": type(vae).__name__, "path": str(cfg.vae),
                "normalization": latent_norm(vae), "frame_multiple": family.vae.frame_multiple(vae),
                # latent frames padded to a multiple of this by repeating the first one in front (1: no padding)
                "latent_frame_multiple": patch_t},
        "text_encoder": {"path": str(cfg.text_encoder), "hidden_size": text.hidden_size,
                         "max_length": length, "pass_mask": text.pass_mask,
                         "empty_prompt": shards.EMPTY_PROMPT},
        "latents": "posterior mean, normalised for the DiT input (fastpost.data.preprocess.normalize_latents)",
        "config": asdict(cfg),
    }


_MUST_MATCH = ("resolutions", "max_frames", "frame_stride", "max_text_length", "samples_per_shard", "dtype",
               "target_fps", "id_token")


def _check_resume(root: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A rerun may only add shards that are consistent with the ones already there."""
    diffs = []
    if old["vae"]["normalization"] != new["vae"]["normalization"]:
        diffs.append(f"vae normalization {old['vae']['normalization']} -> {new['vae']['normalization']}")
    for k in ("hidden_size", "pass_mask", "max_length"):
        if old["text_encoder"].get(k) != new["text_encoder"][k]:
            diffs.append(f"text_encoder.{k} {old['text_encoder'].get(k)} -> {new['text_encoder'][k]}")
    if json.loads(json.dumps(old.get("conditioning"))) != json.loads(json.dumps(new.get("conditioning"))):
        diffs.append(f"conditioning {old.get('conditioning')} -> {new.get('conditioning')}")
    if old["vae"].get("latent_frame_multiple", 1) != new["vae"]["latent_frame_multiple"]:
        diffs.append(f"latent_frame_multiple {old['vae'].get('latent_frame_multiple', 1)} -> "
                     f"{new['vae']['latent_frame_multiple']}")
    for k in _MUST_MATCH:
        a, b = json.loads(json.dumps(old["config"].get(k))), json.loads(json.dumps(new["config"].get(k)))
        if a != b:
            diffs.append(f"{k} {a} -> {b}")
    if diffs:
        raise ConfigError(f"{root / shards.MANIFEST} was written with different settings ({'; '.join(diffs)}); "
                          f"use a new output_dir, or rerun with the original settings to resume")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def preprocess(cfg: PreprocessConfig, family: Any) -> dict[str, Any]:
    """Run (or resume) preprocessing on this rank's shards with a model family's VAE and text conventions
    (fastpost.models.get_family(name)); returns the merged report (written by rank 0)."""
    t0 = time.time()
    rank, world = _world()
    device, dtype = _resolve_device(cfg.device), DTYPES[cfg.dtype]
    root = Path(cfg.output_dir)
    base, rows, reader_skipped = read_metadata(cfg.data, cfg.limit, cfg.data_format)
    for skip in reader_skipped if rank == 0 else []:
        log.warning("skipping input %s (%s)", skip["source"], skip["error"])
    if family.vae is None:
        raise ConfigError(f"model family {family.name!r} has no VAE of its own: preprocess with the family whose "
                          f"VAE made its latents")
    config = transformer_config(cfg)  # read once: fps, text length and frame padding all come from it
    target_fps = float(family.training_fps(config)) if cfg.target_fps == "family" else cfg.target_fps
    # The compute dtype only sets how the VAE / encoder run; outputs are cast at storage time (`dtype`).
    compute = _resolve_dtype(cfg.compute_dtype, device)
    vae = load_vae(cfg.vae, device=device, dtype=compute, spec=family.vae, allow_pickle=cfg.allow_pickle)
    if cfg.vae_tiling is True or (cfg.vae_tiling == "auto" and device.type == "cuda"):
        vae.enable_tiling()
        if hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
    text = TextEncoder.from_pretrained(cfg.text_encoder, family=family, pass_mask=cfg.text_encoder_pass_mask,
                                       allow_pickle=cfg.allow_pickle, device=device, dtype=compute)
    multiple = family.vae.frame_multiple(vae)
    length = text_length(cfg, family, config)
    patch_t = family.patch_sizes(config)[0] if config is not None else 1
    header = _header(cfg, family, vae, text, length, patch_t, config)
    image = family.image if "conditioning" in header else None  # image-to-video: encode the first frame too
    embedder = None
    if image is not None and family.takes_image_embed(config):
        from fastpost.components import load_image_encoder

        embedder = load_image_encoder(cfg.image_encoder or cfg.vae, image.encoder_class, image.processor_class,
                                      device=device, dtype=compute, allow_pickle=cfg.allow_pickle)
    if rank == 0 and not (root / shards.MANIFEST).is_file():
        shards.create_manifest(root, header)
    if world > 1:
        dist.barrier()
    old_header, entries = shards.read_manifest(root)
    _check_resume(root, old_header, header)
    if rank == 0:  # the unconditional prompt of guidance and caption dropout, encoded like every caption
        empty_embeds, empty_mask = text.encode([""], length)
        shards.write_empty_prompt(root, empty_embeds[0].to(dtype), empty_mask[0])
    # A shard is done only if it was made from the same inputs: a run with `limit`, or metadata that grew
    # since, can leave a short last shard that must be redone (its newer manifest line then wins).
    done = {e["index"]: e.get("inputs") for e in entries}

    plan = [rows[i:i + cfg.samples_per_shard] for i in range(0, len(rows), cfg.samples_per_shard)]
    mine = [i for i in range(len(plan)) if i % world == rank]
    stats = {"rank": rank, "shards_written": 0, "shards_skipped_complete": 0, "samples_written": 0,
             "inputs_failed": 0, "failures": []}
    todo = []
    for index in mine:
        if done.get(index, False) == [readers.source_of(row) for row in plan[index]]:
            stats["shards_skipped_complete"] += 1
        else:
            todo += [(index, row) for row in plan[index]]
    stream = decoded_inputs(base, todo, cfg, multiple, target_fps, _resolve_workers(cfg.num_workers, device))
    for index, group in itertools.groupby(stream, key=lambda item: item["index"]):
        inputs = [readers.source_of(row) for row in plan[index]]
        samples, failed = [], []
        for item in group:
            row = item["row"]
            src = readers.source_of(row)
            if "error" in item:
                log.warning("skipping unreadable input %s (%s)", base / src, item["error"])
                failed.append({"source": src, "error": item["error"]})
                continue
            latents = pad_latent_frames(encode_video(vae, item["pixels"]), patch_t).to(dtype)
            caption = with_id_token(row["caption"], cfg.id_token)
            samples.append({"latents": latents, "caption": caption, "source": src, "bucket": item["bucket"]})
            if image is not None:
                cond = encode_image_condition(vae, image, item["pixels"], src, embedder)
                samples[-1].update({k: v.to(dtype) for k, v in cond.items()})
        if samples:
            embeds, mask = text.encode([s["caption"] for s in samples], length)
            for s, e, m in zip(samples, embeds, mask):
                s["prompt_embeds"], s["prompt_attention_mask"] = e.to(dtype), m
            entry = shards.write_shard(root, index, samples)
        else:  # every input failed: record the shard as done (with no file) so reruns do not retry forever
            entry = {"type": "shard", "index": index, "file": None, "bytes": 0, "sha256": None, "samples": []}
        entry["inputs"], entry["failed"] = inputs, failed
        shards.append_manifest(root, entry)
        stats["shards_written"] += 1
        stats["samples_written"] += len(samples)
        stats["inputs_failed"] += len(failed)
        stats["failures"] += failed
        log.info("rank %d wrote %s (%d samples, %d failed)", rank, entry["file"], len(samples), len(failed))

    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, stats)
    else:
        per_rank = [stats]
    _, entries = shards.read_manifest(root)
    report = {
        "output_dir": str(root), "world_size": world, "shards_planned": len(plan),
        "shards_complete": len(entries), "elapsed_s": round(time.time() - t0, 3),
        **{k: sum(r[k] for r in per_rank) for k in
           ("shards_written", "shards_skipped_complete", "samples_written", "inputs_failed")},
        "failures": [f for r in per_rank for f in r["failures"]],
        # rows the reader could not use (no caption, no media): counted once, not per rank
        "records_skipped": len(reader_skipped), "skipped_records": reader_skipped,
        "dataset_samples": sum(len(e["samples"]) for e in entries),
        "dataset_failed_inputs": [f for e in entries for f in e.get("failed", [])],
        "per_rank": [{k: v for k, v in r.items() if k != "failures"} for r in per_rank],
    }
    if rank == 0:
        shards.atomic_write_bytes(root / REPORT, (json.dumps(report, indent=2) + "\n").encode())
    if world > 1:
        dist.barrier()
    return report


def main(argv: list[str] | None, resolve_family: Callable[[str | None, str], Any]) -> int:
    """`fastpost preprocess`. resolve_family(name, vae folder) -> the model family: the caller (cli.py, the
    composition root) looks families up, so data never imports models."""
    p = argparse.ArgumentParser(
        prog="fastpost preprocess",
        description="Encode captioned videos/images into latent shards (resumable; works under torchrun).",
    )
    p.add_argument("--config", help="YAML file with PreprocessConfig keys (or a job file with a 'preprocess' section)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data=synth/metadata.jsonl output_dir=shards vae=vae_dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = load_yaml(args.config) if args.config else {}
    if "preprocess" in data and isinstance(data["preprocess"], dict):
        data = data["preprocess"]
    cfg = from_dict(PreprocessConfig, apply_overrides(data, args.overrides))
    started, rank = False, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from fastpost.distributed import init_distributed

        init_distributed()
        started = True
    try:
        rank = _world()[0]
        report = preprocess(cfg, resolve_family(cfg.family, cfg.vae))
    finally:
        if started:
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({k: v for k, v in report.items()
                          if k not in ("per_rank", "dataset_failed_inputs", "skipped_records")}))
    return 0


if __name__ == "__main__":  # `python -m fastpost.data.preprocess ...` = `fastpost preprocess ...`
    import sys

    from fastpost.cli import main as cli_main

    cli_main(["preprocess", *sys.argv[1:]])
