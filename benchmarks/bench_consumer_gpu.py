#!/usr/bin/env python
"""GPU MEMORY CHECK of the one-GPU job files (issue 22): measured peak vs `fastpost plan`'s prediction. CUDA only.

    python benchmarks/bench_consumer_gpu.py                 # the five configs/cogvideox/*b_lora_*gb.yaml jobs
    python benchmarks/bench_consumer_gpu.py --jobs 5b_lora_16gb --steps 5

For each job file: CogVideoX at real size (the job's plan.flavor) with RANDOM weights (no download: a memory
measurement needs none), random latent shards at the planned clip size (49x480x720 -> 13x60x90 latents, 226
T5 tokens), then `--steps` LoRA steps of the real trainer with the job's storage dtype, optimizer, AC and offload
settings. Printed per job: torch.cuda.max_memory_allocated and max_memory_reserved over the steps (the weights
included: the counters are reset after the build, while the weights are resident), the planner's prediction, the
error, and the mean step time after the first. The acceptance bar of the issue: measured within 15% of predicted.

scripts/gpu_check.sh (#17) calls this file; it exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
from _common import ROOT, machine_line, markdown_table

JOBS = ["2b_lora_8gb", "2b_lora_16gb", "2b_lora_24gb", "5b_lora_16gb", "5b_lora_24gb"]


def measure(name: str, steps: int, root: Path) -> list[str]:
    from fastpost.config import load_config
    from fastpost.data.synthetic import write_latent_shards
    from fastpost.models import get_family
    from fastpost.plan import GIB, model_config, plan_job, sequence, vae_config
    from fastpost.trainer import TrainConfig, Trainer

    path = ROOT / "configs" / "cogvideox" / f"{name}.yaml"
    probe = load_config(TrainConfig, path, [])
    family = get_family(probe.model.family)
    config = model_config(family, probe)
    spatial, temporal = family.vae.factors_fn(vae_config(family, probe))
    latent = (config["in_channels"], (probe.plan.frames - 1) // temporal + 1, probe.plan.height // spatial,
              probe.plan.width // spatial)
    _, text = sequence(family, config, vae_config(family, probe), probe.plan)
    shards = root / f"shards_{name}"
    write_latent_shards(shards, steps + 1, latent, text, config["text_embed_dim"])
    cfg = load_config(TrainConfig, path, [
        "model.pretrained=null", f"model.flavor={probe.plan.flavor}", f"data.path={shards}",
        f"output_dir={root / name}", f"steps={steps}", "checkpoint.every_steps=0", "logging.progress_bar=false"])
    predicted = plan_job(cfg).total
    trainer = Trainer(cfg)  # random init on the host (fp32, then cast), then moved: ~23 GB of host RAM for 5b
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    batches = trainer.loader.forever()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batches)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    trainer.close()
    del trainer
    torch.cuda.empty_cache()
    step = sum(times[1:]) / max(1, len(times) - 1)
    return [name, f"{allocated / GIB:.2f}", f"{reserved / GIB:.2f}", f"{predicted / GIB:.2f}",
            f"{100 * (predicted / allocated - 1):+.1f}%", f"{step:.2f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--jobs", nargs="*", default=JOBS, help=f"job files under configs/cogvideox (default {JOBS})")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_consumer_gpu: needs a CUDA GPU (it measures torch.cuda.max_memory_allocated); none is "
              "visible here. Nothing was measured.", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("OMP_NUM_THREADS", "8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs:
            rows.append(measure(name, args.steps, Path(tmp)))
            print(rows[-1], flush=True)
    print(machine_line())
    print(markdown_table(["job", "max allocated (GiB)", "max reserved (GiB)", "predicted (GiB)",
                          "prediction error vs allocated", "step time (s)"], rows))


if __name__ == "__main__":
    main()
