"""Procedurally generated captioned clips: real mp4 files (libx264) + metadata.jsonl, deterministic by seed.

The demo and the tests need video data with captions that actually describe the pixels, without downloads.
Three kinds of clip, each caption generated from the same parameters that drew it:
  shape  "a red circle moving left on a blue background"
  pan    "a camera panning right over green and yellow stripes"
  color  "a white square on a background changing from red to blue"
plus optional still images (png, 1 frame) so mixed image/video datasets can be exercised.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastpost.config import load_config

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
    "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
PATTERNS = ("stripes", "checkers", "rings")
KINDS = ("shape", "pan", "color")
# Every word a caption can contain; the tiny tokenizer is trained on this so nothing maps to <unk>.
CAPTION_WORDS = sorted(
    set(COLORS) | set(SHAPES) | set(DIRECTIONS) | set(PATTERNS)
    | {"a", "an", "and", "on", "over", "background", "moving", "camera", "panning", "changing", "from", "to",
       "image", "of", "still"}
)


@dataclass
class SyntheticConfig:
    out_dir: str
    num_videos: int = 8
    num_images: int = 0
    frames: list[int] = field(default_factory=lambda: [17, 25])  # each clip picks one (seeded)
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(64, 64)])  # (height, width), even numbers
    fps: int = 8
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"SyntheticConfig.kinds has {bad or 'nothing'}; choose from {list(KINDS)}")
        for h, w in self.sizes:
            if h % 2 or w % 2 or h < 16 or w < 16:  # libx264 with yuv420p needs even sizes
                raise ValueError(f"SyntheticConfig.sizes: {(h, w)} must be even and >= 16 in both dimensions")
        if not self.frames or min(self.frames) < 1:
            raise ValueError(f"SyntheticConfig.frames must be positive frame counts, got {self.frames}")


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean [h, w] mask of a shape centred at (cy, cx) with half-size r (pixels)."""
    yy, xx = _grid(h, w)
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    if shape == "triangle":  # apex up: inside when below the apex and within the widening edges
        rel = (yy - (cy - r)) / (2 * r)
        return (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _fill(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items, exclude=()) -> str:
    choices = [x for x in items if x not in exclude]
    return choices[int(rng.integers(len(choices)))]


def make_shape_clip(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, str]:
    shape, direction = _pick(rng, SHAPES), _pick(rng, DIRECTIONS)
    bg = _pick(rng, COLORS)
    fg = _pick(rng, COLORS, exclude=(bg,))
    r = min(h, w) * float(rng.uniform(0.12, 0.2))
    dy, dx = DIRECTIONS[direction]
    # Travel across ~60% of the frame along the motion axis, starting off-centre so the motion is visible.
    y0, x0 = h / 2 - dy * 0.3 * h, w / 2 - dx * 0.3 * w
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        a = t / max(n - 1, 1)
        img = _fill(h, w, COLORS[bg])
        img[shape_mask(shape, h, w, y0 + dy * 0.6 * h * a, x0 + dx * 0.6 * w * a, r)] = COLORS[fg]
        frames[t] = img
    return frames, f"{_article(fg)} {fg} {shape} moving {direction} on {_article(bg)} {bg} background"


def _pattern(pattern: str, h: int, w: int, c1, c2, period: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(h, w)
    if pattern == "stripes":
        sel = ((xx + yy) // period) % 2 == 0
    elif pattern == "checkers":
        sel = ((xx // period) + (yy // period)) % 2 == 0
    else:
        cy, cx = h * float(rng.uniform(0.3, 0.7)), w * float(rng.uniform(0.3, 0.7))
        sel = (np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) // period) % 2 == 0
    img = np.where(sel[..., None], np.asarray(c1, np.uint8), np.asarray(c2, np.uint8))
    # A little deterministic texture so the pan is visible even along a pattern's symmetry axis.
    noise = rng.integers(-12, 13, size=(h, w, 1))
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_pan_clip(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, str]:
    pattern, direction = _pick(rng, PATTERNS), _pick(rng, DIRECTIONS)
    c1 = _pick(rng, COLORS)
    c2 = _pick(rng, COLORS, exclude=(c1,))
    canvas = _pattern(pattern, 2 * h, 2 * w, COLORS[c1], COLORS[c2], float(rng.uniform(5, 11)), rng)
    dy, dx = DIRECTIONS[direction]
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        a = t / max(n - 1, 1)
        # Panning right means the window moves right over the canvas (the content moves left on screen).
        oy = int(round((0.5 + 0.5 * dy * (2 * a - 1)) * h)) if dy else h // 2
        ox = int(round((0.5 + 0.5 * dx * (2 * a - 1)) * w)) if dx else w // 2
        frames[t] = canvas[oy:oy + h, ox:ox + w]
    return frames, f"a camera panning {direction} over {c1} and {c2} {pattern}"


def make_color_clip(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, str]:
    shape = _pick(rng, SHAPES)
    fg = _pick(rng, COLORS)
    a_name = _pick(rng, COLORS, exclude=(fg,))
    b_name = _pick(rng, COLORS, exclude=(fg, a_name))
    a, b = np.asarray(COLORS[a_name], np.float32), np.asarray(COLORS[b_name], np.float32)
    mask = shape_mask(shape, h, w, h / 2, w / 2, min(h, w) * 0.22)
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        mix = t / max(n - 1, 1)
        img = _fill(h, w, tuple(int(round(v)) for v in (1 - mix) * a + mix * b))
        img[mask] = COLORS[fg]
        frames[t] = img
    return frames, f"{_article(fg)} {fg} {shape} on a background changing from {a_name} to {b_name}"


def make_still_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    shape, bg = _pick(rng, SHAPES), _pick(rng, COLORS)
    fg = _pick(rng, COLORS, exclude=(bg,))
    img = _fill(h, w, COLORS[bg])
    cy, cx = h * float(rng.uniform(0.35, 0.65)), w * float(rng.uniform(0.35, 0.65))
    img[shape_mask(shape, h, w, cy, cx, min(h, w) * float(rng.uniform(0.15, 0.25)))] = COLORS[fg]
    return img, f"a still image of {_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


_MAKERS = {"shape": make_shape_clip, "pan": make_pan_clip, "color": make_color_clip}


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 [F,H,W,3] frames as H.264 mp4 (atomically: a killed run never leaves half a video)."""
    import imageio

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    # One encoder thread: deterministic output and polite on a shared 2-core box; 17x64x64 takes ~40 ms.
    imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=2,
                     ffmpeg_params=["-threads", "1"], format="FFMPEG")
    os.replace(tmp, path)


def generate(cfg: SyntheticConfig) -> list[dict]:
    """Write cfg.num_videos mp4 clips and cfg.num_images png stills under cfg.out_dir; return the records.

    Each clip draws its parameters from its own seeded generator (seed, index), so clip i is the same no
    matter how many clips are generated.
    """
    import imageio.v3 as iio

    out = Path(cfg.out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(cfg.num_videos):
        rng = np.random.default_rng([cfg.seed, 0, i])
        kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
        n = int(cfg.frames[int(rng.integers(len(cfg.frames)))])
        h, w = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        frames, caption = _MAKERS[kind](rng, n, h, w)
        rel = f"videos/{i:06d}.mp4"
        write_mp4(out / rel, frames, cfg.fps)
        records.append(dict(path=rel, caption=caption, fps=cfg.fps, frames=n, width=w, height=h, kind=kind))
    if cfg.num_images:
        (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(cfg.num_images):
        rng = np.random.default_rng([cfg.seed, 1, i])
        h, w = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        img, caption = make_still_image(rng, h, w)
        rel = f"images/{i:06d}.png"
        iio.imwrite(out / rel, img)
        records.append(dict(path=rel, caption=caption, fps=0, frames=1, width=w, height=h, kind="image"))
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out / "metadata.jsonl")
    return records


def write_format(out_dir: str | Path, records: list[dict], fmt: str, samples_per_tar: int = 2) -> Path:
    """Describe `records` (as `generate` returns them, paths relative to out_dir) in another input format that
    fastpost.data.readers reads; returns what to pass as preprocess `data`. Formats: fastvideo_json
    (videos2caption.json), csv (captions.csv), txt_pairs (prompts.txt + videos.txt), webdataset (wds/*.tar with
    <key>.<ext> + <key>.json {"caption": ...})."""
    import csv
    import tarfile

    out = Path(out_dir)
    if fmt == "fastvideo_json":
        items = [{"path": r["path"], "cap": [r["caption"]], "resolution": {"height": r["height"], "width": r["width"]},
                  "fps": r["fps"], "duration": r["frames"] / r["fps"] if r["fps"] else 0.0} for r in records]
        (out / "videos2caption.json").write_text(json.dumps(items, indent=1))
        return out / "videos2caption.json"
    if fmt == "csv":
        with open(out / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "text", "fps"])
            w.writerows([r["path"], r["caption"], r["fps"]] for r in records)
        return out / "captions.csv"
    if fmt == "txt_pairs":
        (out / "prompts.txt").write_text("".join(r["caption"] + "\n" for r in records))
        (out / "videos.txt").write_text("".join(r["path"] + "\n" for r in records))
        return out / "videos.txt"
    if fmt == "webdataset":
        (out / "wds").mkdir(exist_ok=True)
        for t, start in enumerate(range(0, len(records), samples_per_tar)):
            with tarfile.open(out / "wds" / f"shard-{t:05d}.tar", "w") as tar:
                for i, r in enumerate(records[start:start + samples_per_tar], start):
                    key = f"{i:06d}"
                    tar.add(out / r["path"], arcname=key + Path(r["path"]).suffix)
                    meta = json.dumps({"caption": r["caption"]}).encode()
                    info = tarfile.TarInfo(key + ".json")
                    info.size = len(meta)
                    tar.addfile(info, io.BytesIO(meta))
        return out / "wds"
    raise ValueError(f"write_format: unknown format {fmt!r}; use fastvideo_json, csv, txt_pairs or webdataset")


def write_latent_shards(root, n_samples: int, latent_shape: tuple[int, ...], text_len: int, text_dim: int,
                        samples_per_shard: int = 4, seed: int = 0, classes: int = 4) -> None:
    """A learnable latent dataset in the real shard format (no VAE needed): each sample is one of `classes`
    fixed latent patterns plus noise, with the class's prompt embedding, so a conditional model can fit it."""
    import torch

    from fastpost.data.shards import append_manifest, create_manifest, write_empty_prompt, write_shard

    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, *latent_shape, generator=g)
    embeds = torch.randn(classes, text_len, text_dim, generator=g)
    create_manifest(root, {"vae_family": "synthetic", "note": "fastpost.data.synthetic.write_latent_shards"})
    samples = []
    for i in range(n_samples):
        c = i % classes
        samples.append({
            "latents": patterns[c] + 0.1 * torch.randn(latent_shape, generator=g),
            "prompt_embeds": embeds[c],
            "prompt_attention_mask": torch.ones(text_len, dtype=torch.long),
            "caption": f"class {c}", "source": f"synthetic/{i}", "bucket": "x".join(map(str, latent_shape)),
        })
    for s, start in enumerate(range(0, n_samples, samples_per_shard)):
        append_manifest(root, write_shard(root, s, samples[start:start + samples_per_shard]))
    # the "empty prompt" of this dataset, as preprocessing stores the encoding of "": its own embedding, with a
    # mask of one valid token (T5's EOS), drawn from its own generator so the samples above stay as they were
    empty = torch.randn(text_len, text_dim, generator=torch.Generator().manual_seed(seed + 1))
    write_empty_prompt(root, empty, (torch.arange(text_len) < 1).long())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="make_synthetic_videos",
        description="Write procedurally generated captioned mp4 clips + metadata.jsonl (deterministic by seed).",
    )
    p.add_argument("--config", help="YAML file with SyntheticConfig keys")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. out_dir=data/synth num_videos=16 'sizes=[[48,80]]'")
    args = p.parse_args(argv)
    cfg = load_config(SyntheticConfig, args.config, args.overrides)
    records = generate(cfg)
    print(f"wrote {len(records)} samples and {Path(cfg.out_dir) / 'metadata.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
