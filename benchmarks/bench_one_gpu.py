#!/usr/bin/env python
"""One consumer GPU (issue 22): the planner's peak per option set for the goal jobs, and the loss curves of the
frozen base stored in fp32 / bf16 / fp8.

    python benchmarks/bench_one_gpu.py            # planner tables (CogVideoX-2b / 5b, Wan 2.1 T2V-14B LoRA), ~1 min
    python benchmarks/bench_one_gpu.py --curves   # 50 LoRA steps of the tiny CogVideoX per storage dtype (~1 min)

The table's step times are ESTIMATES, not measurements (no GPU was available): training FLOPs (forward: 2 x linear
params x tokens + 4 x blocks x tokens^2 x width for attention; backward: 1x the linear part (input gradients only,
the base is frozen) + 2x the attention part; the AC recompute: the forward again, or its linear part under
selective AC) at 40% of the card's dense bf16 tensor peak (fp32 accumulate: RTX 4090 165, RTX 4080 97.5,
RTX 4060 Ti 44 TFLOPS), or the PCIe time of the offloaded bytes at 20 GB/s when that is longer (the copies overlap
the compute).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import _common  # noqa: F401  (sys.path for a fresh checkout)
from _common import ROOT, machine_line, markdown_table

from fastpost.config import load_config
from fastpost.plan import GIB, model_config, model_facts, parse_bytes, plan_job, sequence, vae_config

CARDS = {"8GB": ("RTX 4060 Ti 8GB", 44e12), "16GB": ("RTX 4080 16GB", 97.5e12), "24GB": ("RTX 4090 24GB", 165e12)}
MFU, PCIE = 0.40, 20e9
# option sets, from the plain bf16 LoRA job upwards; each is a list of dotted overrides
OPTIONS = {
    "bf16 base, AdamW, AC selective": [],
    "bf16 base, AdamW, AC full": ["ac.mode=full"],
    "fp8 base, AdamW, AC full": ["model.storage_dtype=float8_e4m3fn", "ac.mode=full"],
    "fp8 base, 8-bit AdamW, AC selective": ["model.storage_dtype=float8_e4m3fn", "optim.name=adamw8bit"],
    "fp8 base, 8-bit AdamW, AC full": ["model.storage_dtype=float8_e4m3fn", "optim.name=adamw8bit", "ac.mode=full"],
    "bf16 base, offloaded AdamW, AC full": ["optim.name=adamw_offload", "ac.mode=full"],
    "fp8 base, 8-bit AdamW, AC full + activation offload": ["model.storage_dtype=float8_e4m3fn",
                                                            "optim.name=adamw8bit", "ac.mode=full",
                                                            "offload.activations=true"],
    "fp8 base, 8-bit AdamW, AC full + block and activation offload": [
        "model.storage_dtype=float8_e4m3fn", "optim.name=adamw8bit", "ac.mode=full", "offload.activations=true",
        "offload.blocks=true"],
}
GOALS = {"CogVideoX-2b LoRA, 49x480x720": ("configs/cogvideox/lora_2b.yaml", "8GB"),
         "CogVideoX-5b LoRA, 49x480x720": ("configs/cogvideox/lora_5b.yaml", "16GB"),
         "Wan 2.1 T2V-14B LoRA, 81x480x832": ("configs/wan/t2v_14b_lora_24gb.yaml", "24GB")}
# every option set starts from these (a goal's job file may already set some of them)
RESET = ["model.storage_dtype=null", "optim.name=adamw", "ac.mode=selective", "offload.blocks=false",
         "offload.activations=false"]


def step_seconds(cfg, tflops: float) -> float:
    """The estimated step time of `cfg` on a card of `tflops` dense bf16 peak (module docstring)."""
    from fastpost.models import get_family

    family = get_family(cfg.model.family)
    config = model_config(family, cfg)
    facts = model_facts(family, config, cfg.lora)
    video, text = sequence(family, config, vae_config(family, cfg), cfg.plan)
    tokens = (video + text) * cfg.data.batch_size
    width = config["num_attention_heads"] * config["attention_head_dim"]
    linear = 2 * facts.total * tokens
    attention = 4 * facts.blocks * tokens ** 2 * width
    recompute = {"full": linear + attention, "selective": linear, "none": 0.0}.get(cfg.ac.mode, linear + attention)
    flops = linear * 2 + attention * 3 + recompute
    compute = flops / (tflops * MFU)
    moved = 0.0
    if cfg.offload.blocks:  # frozen weights in per forward and per recompute
        low = 1 if (cfg.model.storage_dtype or "").startswith("float8") else 2
        moved += 2 * facts.stored * low
    if cfg.offload.activations:  # block inputs out and back
        moved += 2 * facts.blocks * tokens * width * 2  # video + text streams: tokens x width, bf16
    return max(compute, moved / PCIE)


def plan_rows() -> list[list[str]]:
    from fastpost.trainer import TrainConfig

    rows = []
    for job, (path, goal) in GOALS.items():
        for name, overrides in OPTIONS.items():
            cfg = load_config(TrainConfig, ROOT / path, [*RESET, *overrides, f"plan.gpu_memory={goal}"])
            plan = plan_job(cfg)
            card, tflops = CARDS[goal]
            fits = "fits" if plan.total <= parse_bytes(goal) else "no"
            rows.append([job, name, f"{plan.total / GIB:.2f}", f"{goal} ({parse_bytes(goal) / GIB:.1f} GiB): {fits}",
                         f"~{step_seconds(cfg, tflops):.0f} s on {card}"])
    return rows


JOB_FILES = ["cogvideox/2b_lora_8gb", "cogvideox/2b_lora_16gb", "cogvideox/2b_lora_24gb", "cogvideox/5b_lora_16gb",
             "cogvideox/5b_lora_24gb", "wan/t2v_14b_lora_24gb"]


def job_file_rows() -> list[list[str]]:
    """The one-GPU job files of configs/: their predicted peak and estimated step time (quoted in their headers)."""
    from fastpost.trainer import TrainConfig

    rows = []
    for name in JOB_FILES:
        cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml", [])
        card = next(v for k, v in CARDS.items() if k == cfg.plan.gpu_memory)
        rows.append([f"configs/{name}.yaml", f"{plan_job(cfg).total / GIB:.2f}",
                     f"{parse_bytes(cfg.plan.gpu_memory) / GIB:.1f}",
                     f"~{step_seconds(cfg, card[1]):.0f} s on {card[0]}"])
    return rows


def curves(steps: int = 50) -> dict[str, list[float]]:
    """LoRA loss per step of the tiny CogVideoX on random latent shards, per frozen-base storage."""
    import torch.distributed as dist

    from fastpost.config import from_dict
    from fastpost.data.synthetic import write_latent_shards
    from fastpost.distributed.parallel_dims import free_port
    from fastpost.trainer import TrainConfig, Trainer

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_latent_shards(root / "shards", 16, (4, 3, 10, 10), 8, 16)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        for storage in (None, "bfloat16", "float8_e4m3fn", "float8_e5m2"):
            cfg = {"output_dir": str(root / str(storage)), "steps": steps, "seed": 0,
                   "model": {"family": "cogvideox", "flavor": "debug", "storage_dtype": storage},
                   "lora": {"enabled": True, "rank": 16, "alpha": 16},
                   "optim": {"lr": 2e-3, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1},
                   "data": {"path": str(root / "shards"), "batch_size": 2},
                   "checkpoint": {"every_steps": 0}, "logging": {"progress_bar": False}}
            trainer = Trainer(from_dict(TrainConfig, cfg))
            out[storage or "float32"] = trainer.fit()
            trainer.guard.close()
        dist.destroy_process_group()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--curves", action="store_true", help="the 50-step loss curves per storage dtype")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.curves:
        losses = curves()
        print(machine_line())
        marks = [0, 9, 19, 29, 39, 49]
        rows = []
        for name, ls in losses.items():
            mean = lambda a, b: sum(ls[a:b]) / (b - a)  # noqa: E731
            rows.append([name, *[f"{ls[i]:.4f}" for i in marks], f"{mean(0, 10):.4f}", f"{mean(40, 50):.4f}"])
        print(markdown_table(["frozen base", *[f"step {i + 1}" for i in marks], "mean 1-10", "mean 41-50"], rows))
        return
    print(markdown_table(["job file", "predicted peak (GiB)", "budget (GiB)", "step time (estimate)"],
                         job_file_rows()))
    print()
    print(markdown_table(["job (batch 1)", "options", "predicted peak (GiB)", "card",
                          "step time (estimate)"], plan_rows()))


if __name__ == "__main__":
    main()
