#!/usr/bin/env python
"""`fastpost plan`'s predicted per-rank peak vs the peak measured in the trainer's real step, on CPU.

    python benchmarks/bench_plan.py            # tiny + mid CogVideoX (full, LoRA), 3 AC modes, world 1 + 2 (~3 min)
    python benchmarks/bench_plan.py --quick    # tiny only, world 1

Measured: fastpost.trainer.Trainer on synthetic latent shards; after one warm-up step (AdamW state exists), the
second `train_step` runs under fastpost.plan.LiveTensorBytes, which counts every live tensor storage (parameters,
grads, optimizer state, activations, FSDP's gathered copies, the batch) and records the peak. Predicted:
fastpost.plan.plan_job on the same job file at the same world size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
from _common import machine_line, markdown_table

from fastpost.config import from_dict
from fastpost.plan import LiveTensorBytes, model_config, plan_job, sequence, state_tensors, vae_config
from fastpost.trainer import TrainConfig, Trainer
from tests._harness import run_distributed, write_random_shards

# "mid": a CogVideoX 1.0 layout at width 512 (8 heads of 64, like the real models' head_dim), 4 blocks
MID = dict(num_attention_heads=8, attention_head_dim=64, num_layers=4, text_embed_dim=64, max_text_seq_length=16,
           time_embed_dim=64)
MODELS = {"tiny": None, "mid": MID, "mid LoRA": MID}  # "mid LoRA": rank-16 LoRA, so activations dominate
ACS = ["none", "selective", "full"]
CLIP = {"tiny": (64, 64, 17), "mid": (128, 128, 17), "mid LoRA": (192, 192, 17)}  # pixels (height, width, frames)


def job(root: Path, model: str, ac: str, world: int) -> dict:
    """A full-finetune CogVideoX job dict for `model` (written to root; its shards and weights too)."""
    h, w, f = CLIP[model]
    cfg = {"output_dir": str(root / "out"), "steps": 2, "recipe": "finetune",
           "parallel": {"ulysses": world},  # world 2: sp=2, FSDP over both ranks
           "model": {"family": "cogvideox", "flavor": "debug"}, "ac": {"mode": ac},
           "data": {"path": str(root / "shards"), "batch_size": 1},
           "checkpoint": {"every_steps": 0}, "logging": {"every_steps": 100, "progress_bar": False},
           "plan": {"gpus": world, "gpu_memory": "1GiB", "flavor": "debug", "height": h, "width": w, "frames": f}}
    if MODELS[model] is not None:
        cfg["model"] = {"family": "cogvideox", "pretrained": str(root / "weights")}
    if "LoRA" in model:
        cfg["lora"] = {"enabled": True, "rank": 16, "alpha": 16}
    return cfg


def prepare(root: Path, model: str) -> None:
    from fastpost.models import get_family

    family = get_family("cogvideox")
    if MODELS[model] is not None and not (root / "weights").exists():
        torch.manual_seed(0)
        family.diffusers_class.from_config({**family.config("debug"), **MODELS[model]}).save_pretrained(
            root / "weights")
    cfg = from_dict(TrainConfig, job(root, model, "none", 1))
    config = model_config(family, cfg)
    spatial, temporal = family.vae.factors_fn(vae_config(family, cfg))
    h, w, f = CLIP[model]
    latent = (config["in_channels"], (f - 1) // temporal + 1, h // spatial, w // spatial)
    _, text = sequence(family, config, vae_config(family, cfg), cfg.plan)
    if not (root / "shards").exists():
        write_random_shards(root / "shards", 4, latent, text, config["text_embed_dim"])


def _measure_worker(rank: int, world: int, cfg_dicts: list[dict], out: str) -> None:
    results = []
    for cfg_dict in cfg_dicts:
        trainer = Trainer(from_dict(TrainConfig, cfg_dict))
        batches = iter(trainer.loader)
        trainer.train_step(batches)  # warm-up: AdamW state now exists
        optimizer = next(iter(trainer.optimizers.values()))
        with LiveTensorBytes(state_tensors(trainer.model, optimizer)) as live:
            trainer.train_step(batches)
        trainer.guard.close()  # the harness tears the process group down
        results.append({"peak": live.peak, "baseline": live.baseline})
        del trainer, optimizer, batches
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def measure(root: Path, model: str, acs: list[str], world: int) -> list[dict]:
    """Measured and predicted peaks of one process group running the job once per AC mode."""
    cfgs = []
    for ac in acs:
        cfg = job(root, model, ac, world)
        cfg["output_dir"] = str(root / f"out_{ac}_{world}")
        cfgs.append(cfg)
    out = root / f"peaks_{world}.json"
    run_distributed(_measure_worker, world, cfgs, str(out))
    rows = []
    for cfg, measured in zip(cfgs, json.loads(out.read_text())):
        predicted = plan_job(from_dict(TrainConfig, cfg), device="cpu").total
        rows.append({**measured, "predicted": predicted, "error": predicted / measured["peak"] - 1})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true", help="tiny model at world 1 only")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    models = ["tiny"] if args.quick else list(MODELS)
    worlds = [1] if args.quick else [1, 2]
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            prepare(root, model)
            for world in worlds:
                for ac, r in zip(ACS, measure(root, model, ACS, world)):
                    rows.append([model, world, ac, f"{r['baseline'] / 2**20:.2f}", f"{r['peak'] / 2**20:.2f}",
                                 f"{r['predicted'] / 2**20:.2f}", f"{100 * r['error']:+.1f}%"])
                    print(rows[-1], flush=True)
    print(machine_line())
    print(markdown_table(["model", "world", "AC", "state before step (MiB)", "measured peak (MiB)",
                          "predicted (MiB)", "error"], rows))


if __name__ == "__main__":
    main()
