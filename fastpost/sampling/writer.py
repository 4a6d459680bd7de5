"""The writer of `fastpost.sampling` (its inputs and outputs): prompt lists, atomic mp4 / json / latent files,
the progress bar.

Every output is first written under `<output_dir>/.partial/<name>` and then moved to `<output_dir>/<name>` with
os.replace (atomic on one filesystem), so a killed run never leaves an incomplete file under a final name or
matching `<output_dir>/*.mp4`; the json is written last and is the marker that a video is done.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class SampleError(ValueError):
    """A user-facing problem with the sampling job (bad prompt file, geometry, parallel layout)."""


@dataclass
class PromptItem:
    prompt: str
    negative_prompt: str
    seed: int
    image: str | None = None  # image-to-video: the first frame (a path)


def read_prompts(prompt: str | None, prompt_file: str | None, negative_prompt: str, seed: int,
                 image: str | None = None) -> list[PromptItem]:
    """`prompt`, or a file: `.jsonl` (objects with "prompt", optional "negative_prompt", "seed" and "image") or
    plain text (one prompt per non-empty line). Video i gets seed `seed + i` unless its line names one, and the
    image `image` unless its line names one (a relative path is relative to the prompt file's folder)."""
    if (prompt is None) == (prompt_file is None):
        raise SampleError("pass exactly one of prompt (--prompt) and prompt_file (--prompt-file)")
    if prompt is not None:
        if not prompt.strip():
            raise SampleError("the prompt is empty")
        return [PromptItem(prompt, negative_prompt, seed, image)]
    path = Path(prompt_file)
    if not path.is_file():
        raise SampleError(f"prompt file {str(path)!r} does not exist; pass a text file (one prompt per line) or a "
                          f".jsonl file with {{\"prompt\": ...}} lines")
    items: list[PromptItem] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SampleError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise SampleError(f"{path}:{lineno}: each line must be an object with a string \"prompt\"")
            unknown = sorted(set(row) - {"prompt", "negative_prompt", "seed", "image"})
            if unknown:
                raise SampleError(f"{path}:{lineno}: unknown key(s) {unknown}; allowed: prompt, negative_prompt, seed, "
                                  f"image")
            if "image" in row and not isinstance(row["image"], str):
                raise SampleError(f"{path}:{lineno}: \"image\" must be a path (a string)")
            line_image = str(path.parent / row["image"]) if "image" in row else image
            items.append(PromptItem(row["prompt"], row.get("negative_prompt", negative_prompt),
                                    int(row.get("seed", seed + len(items))), line_image))
        else:
            items.append(PromptItem(line.strip(), negative_prompt, seed + len(items), image))
    if not items:
        raise SampleError(f"prompt file {str(path)!r} holds no prompts")
    return items


def output_stem(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48] or "video"
    return f"{index:04d}_{slug}"


def _partial(path: Path) -> Path:
    # same name in a hidden sibling folder: ffmpeg picks the container from the .mp4 suffix
    tmp = path.parent / ".partial" / path.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def write_video(path: Path, frames_FHWC: np.ndarray, fps: int) -> None:
    """uint8 [F, H, W, 3] -> H.264 mp4 (yuv420p, so H and W must be even; valid sizes are multiples of 16)."""
    import imageio.v2 as imageio

    tmp = _partial(path)
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=1,
                                pixelformat="yuv420p")
    try:
        for frame in frames_FHWC:
            writer.append_data(frame)
    finally:
        writer.close()
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = _partial(path)
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_tensor(path: Path, tensor: torch.Tensor) -> None:
    tmp = _partial(path)
    with open(tmp, "wb") as f:
        torch.save(tensor.detach().cpu(), f)
    os.replace(tmp, path)


def to_uint8_frames(video_BCFHW: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1] -> uint8 [B, F, H, W, 3] (rounded; the diffusers postprocessor truncates)."""
    x = ((video_BCFHW.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


class Progress:
    """A per-step bar on one rank (tqdm when installed, else nothing); `enabled=False` on the others."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
