"""The end-to-end CPU demo: every stage is the command a user would run, on tiny random components.

  1. a tiny CogVideoX pipeline folder (stands in for THUDM/CogVideoX-2b)
  2. synthetic captioned videos (mp4 + metadata.jsonl)
  3. `fastpost preprocess`: VAE + T5 -> latent shards
  4. `torchrun ... fastpost train`: LoRA finetune, Ulysses sp=2, checkpoints, LoRA export
  5. `torchrun ... fastpost sample` twice, same prompt and seed: the base pipeline, then with the exported LoRA
  6. loss_curve.png from metrics.jsonl, before_after.png: frames of both samples

The job files are built here (and written to <workdir>/jobs/), so `fastpost demo` runs from any directory. They
are the same jobs as configs/cogvideox/{preprocess,lora,sample}_debug.yaml (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "a red circle moving left on a blue background"


def jobs(work: Path) -> dict[str, dict[str, Any]]:
    """The demo's preprocess, train and sample jobs, with every path under `work`."""
    w = work.as_posix()
    return {
        "preprocess": {"data": f"{w}/videos", "output_dir": f"{w}/shards", "vae": f"{w}/pipeline",
                       "text_encoder": f"{w}/pipeline", "resolutions": [[64, 64]],
                       "max_frames": 17,  # 4k+1 for the CogVideoX VAE: 17 frames -> 5 latent frames
                       "max_text_length": 8,  # = the debug transformer's max_text_seq_length
                       "samples_per_shard": 8},
        "train": {"output_dir": f"{w}/train", "steps": 300, "grad_accum": 1, "seed": 0, "recipe": "finetune",
                  "parallel": {"ulysses": 2},
                  "model": {"family": "cogvideox", "flavor": "debug", "pretrained": f"{w}/pipeline"},
                  "lora": {"enabled": True, "rank": 16, "alpha": 16},
                  "fsdp": {"param_dtype": "float32", "reduce_dtype": "float32"}, "ac": {"mode": "selective"},
                  "optim": {"lr": 2.0e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1,
                            "grad_clip": 1.0},
                  "data": {"path": f"{w}/shards", "batch_size": 2},
                  "checkpoint": {"every_steps": 100, "keep_last": 2}, "logging": {"every_steps": 25}},
        "sample": {"prompt": "a red ball bouncing on a wooden floor", "negative_prompt": "",
                   "output_dir": f"{w}/samples", "height": 64, "width": 64, "num_frames": 17, "steps": 20,
                   "guidance_scale": 6.0, "dynamic_cfg": False, "seed": 0, "sampler": "ddim",
                   "sampler_args": {"eta": 0.0},
                   "model": {"family": "cogvideox", "flavor": "debug", "pretrained": f"{w}/pipeline", "lora": None,
                             "checkpoint": None, "dtype": "float32"},
                   "parallel": {"ulysses": 1, "cfg": 1}},
    }


def write_jobs(work: Path) -> dict[str, Path]:
    import yaml

    (work / "jobs").mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, job in jobs(work).items():
        paths[kind] = work / "jobs" / f"{kind}.yaml"
        paths[kind].write_text(yaml.safe_dump(job, sort_keys=False))
    return paths


def _run(cmd: list[str], nproc: int = 1) -> None:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    print("[demo] $", " ".join(["python" if c == sys.executable else c for c in cmd]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def plot_losses(metrics_file: Path, out_png: Path, window: int = 20) -> tuple[float, float]:
    """Write the loss curve (raw + moving average); returns the mean loss of the first and last `window` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    steps = sorted(losses)
    values = [losses[s] for s in steps]
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("v-prediction MSE")
    ax.set_title("fastpost demo: LoRA finetune, CogVideoX (tiny), sp=2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return sum(values[:window]) / window, sum(values[-window:]) / window


def read_frames(video: Path):
    import imageio.v2 as imageio
    import numpy as np

    reader = imageio.get_reader(video, format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


def frame_strip(before: Path, after: Path, out_png: Path, columns: int = 6) -> int:
    """Evenly spaced frames of two videos of the same prompt and seed, one row each; returns frames shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("base pipeline", read_frames(before)), ("with the demo LoRA", read_frames(after))]
    n = min(len(rows[0][1]), len(rows[1][1]))
    picks = [round(i * (n - 1) / (columns - 1)) for i in range(columns)]
    fig, axes = plt.subplots(2, columns, figsize=(1.3 * columns + 0.6, 3.2))
    for r, (label, frames) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r, c]
            ax.imshow(frames[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    # the demo's VAE is random, so frames show its textures, not the prompt: the strip shows what the LoRA changes
    fig.suptitle(f'"{PROMPT}", seed 0, 64x64 (tiny random VAE)', fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return len(picks)


def prepare_data(work: Path, videos: int, seed: int = 0) -> None:
    """Stages 1-3: tiny pipeline, synthetic videos, latent shards (under work/pipeline, videos, shards)."""
    from fastpost.tiny import build_tiny_pipeline

    for stage in ("pipeline", "videos", "shards"):
        shutil.rmtree(work / stage, ignore_errors=True)  # always from scratch
    work.mkdir(parents=True, exist_ok=True)
    job = write_jobs(work)["preprocess"]
    print("[demo] 1. tiny CogVideoX pipeline ->", work / "pipeline", flush=True)
    build_tiny_pipeline(work / "pipeline", "cogvideox", "debug", seed=seed)
    _run(["-m", "fastpost.data.synthetic", f"out_dir={work / 'videos'}", f"num_videos={videos}",
          "frames=[17]", "sizes=[[64, 64]]", f"seed={seed}"])
    _run(["-m", "fastpost.cli", "preprocess", "--config", str(job)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastpost demo", description="End-to-end CPU demo on tiny random models "
                                "(about 2-3 minutes on 2 CPU cores); writes everything under --workdir")
    p.add_argument("--workdir", default="outputs/demo", help="output folder (relative to the current directory)")
    p.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    p.add_argument("--videos", type=int, default=24, help="synthetic training videos")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    t0 = time.time()
    for stage in ("train", "samples", "samples_base"):
        shutil.rmtree(work / stage, ignore_errors=True)
    prepare_data(work, args.videos)
    job = write_jobs(work)
    _run(["-m", "fastpost.cli", "train", "--config", str(job["train"]), f"steps={args.steps}"], nproc=2)
    for out, lora in (("samples_base", "null"), ("samples", str(work / "train" / "lora"))):
        # --prompt first: argparse takes the key=value overrides only as one uninterrupted run
        _run(["-m", "fastpost.cli", "sample", "--config", str(job["sample"]), "--prompt", PROMPT,
              f"model.lora={lora}", f"output_dir={work / out}", "parallel.ulysses=2"], nproc=2)

    first, last = plot_losses(work / "train" / "metrics.jsonl", work / "loss_curve.png")
    before, after = sorted((work / "samples_base").glob("*.mp4")), sorted((work / "samples").glob("*.mp4"))
    if not (before and after):
        raise SystemExit("[demo] sampling wrote no video")
    frame_strip(before[0], after[0], work / "before_after.png")
    print(f"[demo] loss: mean of first 20 steps {first:.4f} -> last 20 steps {last:.4f} ({last / first:.0%})")
    print(f"[demo] wrote {before[0]}, {after[0]}, {work / 'loss_curve.png'}, {work / 'before_after.png'}, "
          f"LoRA {work / 'train' / 'lora'}")
    print(f"[demo] done in {time.time() - t0:.0f}s")
    if last > 0.9 * first:
        raise SystemExit(f"[demo] the loss did not fall clearly ({first:.4f} -> {last:.4f})")


if __name__ == "__main__":
    main()
