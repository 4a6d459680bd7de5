"""The end-to-end CPU demo: every stage is the command a user would run, on tiny random components.

  1. a tiny CogVideoX pipeline folder (stands in for THUDM/CogVideoX-2b)
  2. synthetic captioned videos (mp4 + metadata.jsonl)
  3. `fastpost preprocess`: VAE + T5 -> latent shards
  4. `torchrun ... fastpost train`: LoRA finetune, Ulysses sp=2, checkpoints, LoRA export
  5. `torchrun ... fastpost sample`: sp=2 sampling with the exported LoRA -> mp4 + metadata json
  6. loss curve PNG from metrics.jsonl
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


def prepare_data(work: Path, videos: int, seed: int = 0) -> None:
    """Stages 1-3: tiny pipeline, synthetic videos, latent shards (under work/pipeline, videos, shards)."""
    from fastpost.data.tiny import build_tiny_pipeline

    for stage in ("pipeline", "videos", "shards"):
        shutil.rmtree(work / stage, ignore_errors=True)  # always from scratch
    work.mkdir(parents=True, exist_ok=True)
    print("[demo] 1. tiny CogVideoX pipeline ->", work / "pipeline", flush=True)
    build_tiny_pipeline(work / "pipeline", "cogvideox", "debug", seed=seed)
    _run(["-m", "fastpost.data.synthetic", f"out_dir={work / 'videos'}", f"num_videos={videos}",
          "frames=[17]", "sizes=[[64, 64]]", f"seed={seed}"])
    _run(["-m", "fastpost.cli", "preprocess", "--config", "configs/cogvideox/preprocess_debug.yaml",
          f"data={work / 'videos'}", f"output_dir={work / 'shards'}", f"vae={work / 'pipeline'}",
          f"text_encoder={work / 'pipeline'}"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastpost demo", description="End-to-end CPU demo (about 3-6 minutes)")
    p.add_argument("--workdir", default="outputs/demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--videos", type=int, default=24)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    t0 = time.time()
    for stage in ("train", "samples"):
        shutil.rmtree(work / stage, ignore_errors=True)
    prepare_data(work, args.videos)
    _run(["-m", "fastpost.cli", "train", "--config", "configs/cogvideox/lora_debug.yaml",
          f"output_dir={work / 'train'}", f"steps={args.steps}", f"model.pretrained={work / 'pipeline'}",
          f"data.path={work / 'shards'}"], nproc=2)
    _run(["-m", "fastpost.cli", "sample", "--config", "configs/cogvideox/sample_debug.yaml",
          f"model.pretrained={work / 'pipeline'}", f"model.lora={work / 'train' / 'lora'}",
          f"output_dir={work / 'samples'}", "parallel.ulysses=2",
          "prompt=a red circle moving left on a blue background"],
         nproc=2)

    first, last = plot_losses(work / "train" / "metrics.jsonl", work / "loss_curve.png")
    videos = sorted((work / "samples").glob("*.mp4"))
    print(f"[demo] loss: mean of first 20 steps {first:.4f} -> last 20 steps {last:.4f} ({last / first:.0%})")
    print(f"[demo] wrote {[str(v) for v in videos]}, {work / 'loss_curve.png'}, LoRA {work / 'train' / 'lora'}")
    print(f"[demo] done in {time.time() - t0:.0f}s")
    if not videos:
        raise SystemExit("[demo] sampling wrote no video")
    if last > 0.9 * first:
        raise SystemExit(f"[demo] the loss did not fall clearly ({first:.4f} -> {last:.4f})")


if __name__ == "__main__":
    main()
