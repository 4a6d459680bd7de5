#!/usr/bin/env python
"""Training step time before vs after a validation (users of other trainers report ~10x slower steps after one:
leaked VAE / text encoder memory, caches, the model left in eval mode or its FSDP units left gathered).

    python benchmarks/bench_validation.py          # CPU: tiny Mochi pipeline, world 1; GPU: the same on cuda

Two runs of the trainer from one seed, same data: without validation, and with validation every 20 steps (so at
step 0 and after step 20: 1 prompt, CFG, 4 sampling steps, VAE decode, mp4 + json). Per-step times come from
the trainer's own metrics.jsonl (step_time_s: host time between steps; the flushes at logging steps 20 and 40
sync the device). The table gives the median over steps 2-20 (step 1 warms up) and over steps 22-40 (step 21
follows the validation directly and is shown on its own). Target: "after" within 5% of "before".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
from _common import machine_line, markdown_table

from fastpost.config import from_dict
from fastpost.data.synthetic import write_latent_shards
from fastpost.distributed import init_distributed
from fastpost.tiny import build_tiny_pipeline
from fastpost.trainer import TrainConfig, Trainer

LATENT = (12, 4, 32, 32)  # 4 x 16 x 16 = 1,024 video tokens per sample: steps long enough to time


def job(root: Path, out: Path, validation: bool, steps: int) -> dict:
    cfg = {"output_dir": str(out), "steps": steps, "seed": 0,
           "model": {"family": "mochi", "pretrained": str(root / "pipe")},
           "data": {"path": str(root / "shards"), "batch_size": 1},
           "checkpoint": {"every_steps": 0}, "logging": {"progress_bar": False, "every_steps": 20}}
    if validation:
        cfg["validation"] = {"every_steps": 20, "prompts": ["a red ball"], "steps": 4, "guidance_scale": 4.5,
                             "height": 64, "width": 64, "num_frames": 7}
    return cfg


def step_times(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["step_time_s"] for r in rows if "step_time_s" in r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line())
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_pipeline(root / "pipe", "mochi", "debug")
        write_latent_shards(root / "shards", 16, LATENT, 16, 16)
        rows = []
        for validation in (False, True):
            out = root / ("with" if validation else "without")
            Trainer(from_dict(TrainConfig, job(root, out, validation, args.steps))).fit()
            t = step_times(out)
            before = statistics.median(t[s] for s in range(2, 21))
            after = statistics.median(t[s] for s in range(22, args.steps + 1))
            videos = len(list((out / "validation").glob("step_*/*.mp4"))) if validation else 0
            last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
            rows.append(("validation every 20 steps" if validation else "no validation", f"{1e3 * before:.1f}",
                         f"{1e3 * t[21]:.1f}", f"{1e3 * after:.1f}", f"{100 * (after / before - 1):+.1f}%", videos,
                         f"{last['loss']:.6f}"))
    print(f"tiny Mochi (debug flavor), full finetune, fp32, 1 thread; {LATENT[1] * LATENT[2] * LATENT[3] // 4} "
          f"video tokens; validation: 1 prompt, CFG, 4 steps, 64x64x7, VAE decode + mp4")
    print(markdown_table(["run", "median step ms, steps 2-20", "step 21 ms", "median step ms, steps 22-40",
                          "after vs before", "videos written", f"loss at step {args.steps}"], rows))
    print("The same final loss with and without validation: validating changes nothing in training (its noise "
          "comes from its own generators).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
