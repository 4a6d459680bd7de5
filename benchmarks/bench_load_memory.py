"""Peak host memory per rank while a training job starts: the model builder's meta init + sliced loading.

    python benchmarks/bench_load_memory.py                 # 335M-param CogVideoX-2b-width model, world 2 and 4
    python benchmarks/bench_load_memory.py --layers 2      # quicker, smaller model

Writes a CogVideoX-2b-width transformer (1920 wide, 30 heads x 64, T5-XXL text width 4096; fewer layers) with
the RoPE layout of 5b/1.5 to a diffusers folder in bf16 safetensors (the 2b layout's sincos position table is
a non-persistent float64 buffer diffusers computes at construction on every rank: 273 MB at 49x480x720,
whatever N; it is not a weight, so it is left out here and listed in docs/performance.md), then starts `fastpost train` under torchrun for each job and world size.
Each rank records its peak RSS (ru_maxrss) above its RSS after the imports, once the Trainer is built (models
loaded and sharded, optimizers made) and again after one training step (which also gathers blocks for the
forward and backward). Reported as a fraction of the full fp32 model. Targets (issue #12): finetune start-up
<= 1/N + 10%, distill <= twice that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (import path)
from _common import machine_line, markdown_table

WIDTH = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
             text_embed_dim=4096, max_text_seq_length=226, patch_size=2, sample_height=60, sample_width=90,
             sample_frames=49, temporal_compression_ratio=4, use_rotary_positional_embeddings=True)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(job_file: str, out_file: str) -> None:
    """Run by torchrun: build the Trainer, one step, and report this rank's memory."""
    import importlib

    from fastpost.config import load_config
    from fastpost.trainer import TrainConfig, Trainer

    # the baseline holds every library the job imports (diffusers and peft alone are ~0.5 GB of RSS)
    for module in ("fastpost.models.cogvideox", "fastpost.recipes.finetune", "fastpost.recipes.distill", "peft",
                   "peft.tuners.lora", "diffusers", "torch.distributed.checkpoint", "safetensors.torch"):
        importlib.import_module(module)
    base = rss_mib()
    trainer = Trainer(load_config(TrainConfig, job_file))
    built = peak_mib() - base
    trainer.train_step(trainer.loader.forever())
    stepped = peak_mib() - base
    rank = trainer.rank
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"rank": rank, "built_mib": built, "step_mib": stepped}, f)
    trainer.close()


def make_model(root: Path, layers: int) -> tuple[Path, int]:
    import torch
    from diffusers import CogVideoXTransformer3DModel

    folder = root / "model"
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel.from_config({**WIDTH, "num_layers": layers})
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder / "transformer")
    return folder, params


def make_shards(root: Path) -> Path:
    """Four random samples in the shard format, shaped for this model (16 latent channels, T5-XXL width)."""
    import torch

    from fastpost.data.shards import append_manifest, create_manifest, write_shard

    folder = root / "shards"
    create_manifest(folder, {"vae_family": "synthetic", "note": "bench_load_memory"})
    samples = [{"latents": torch.randn(16, 1, 4, 4), "prompt_embeds": torch.randn(226, 4096),
                "prompt_attention_mask": torch.ones(226, dtype=torch.long), "caption": "x", "source": f"s{i}",
                "bucket": "16x1x4x4"} for i in range(4)]
    append_manifest(folder, write_shard(folder, 0, samples))
    return folder


def run(job: dict, world: int, root: Path, name: str) -> list[dict]:
    job_file = root / f"{name}_{world}.yaml"
    import yaml

    job_file.write_text(yaml.safe_dump(job))
    out = root / f"{name}_{world}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{_common.ROOT}:{Path(__file__).parent}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__)), "--worker", str(job_file), str(out)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, params = make_model(root, args.layers)
        teacher_dir = root / "teacher"  # the same weights under another name: a separate frozen teacher
        teacher_dir.symlink_to(model_dir)
        shards = make_shards(root)
        fp32_mib = params * 4 / 2**20
        print(f"model: CogVideoX-2b width, {args.layers} layers, {params / 1e6:.0f}M params; full fp32 "
              f"{fp32_mib:.0f} MiB; checkpoint bf16 safetensors")
        base = {"output_dir": str(root / "out"), "steps": 1, "model": {"pretrained": str(model_dir)},
                "lora": {"enabled": True, "rank": 16, "alpha": 16}, "data": {"path": str(shards)},
                "checkpoint": {"every_steps": 0}, "logging": {"progress_bar": False}}
        jobs = {
            "finetune (LoRA)": ({**base, "recipe": "finetune"}, 1.0),
            "distill (LoRA; teacher + EMA target share the base)": (
                {**base, "recipe": "distill", "recipe_args": {"num_teacher_steps": 8, "phases": 2}}, 2.0),
            "distill (LoRA; separate teacher folder)": (
                {**base, "recipe": "distill", "recipe_args": {"num_teacher_steps": 8, "phases": 2,
                                                              "teacher": str(teacher_dir)}}, 2.0),
        }
        rows = []
        for name, (job, factor) in jobs.items():
            for world in args.worlds:
                ranks = run({**job, "parallel": {"ulysses": world}}, world, root, f"job{len(rows)}")
                built = max(r["built_mib"] for r in ranks) / fp32_mib
                step = max(r["step_mib"] for r in ranks) / fp32_mib
                target = factor * (1 / world + 0.10)
                rows.append([name, world, f"{built:.3f}", f"{step:.3f}", f"{target:.3f}",
                             "yes" if built <= target else "NO"])
    print(markdown_table(["job", "world", "start-up peak / fp32 model", "after 1 step", "target", "met"], rows))


if __name__ == "__main__":
    main()
