"""Does phased consistency distillation work? A CPU-sized proof, one command:

    python scripts/distill_proof.py [--workdir outputs/distill_proof]

1. tiny CogVideoX pipeline + synthetic videos -> latent shards (the demo's data stages)
2. train a teacher (full finetune, v-prediction) on the shards, export it
3. distill a 4-phase student from it (student initialised from the teacher, EMA target, 50-step teacher grid)
4. on held-out prompts and noise seeds, the latent MSE of each sampler to the teacher's 50-step output:
   student at 1/2/4 steps vs teacher (DDIM on the same grid) at 1/2/4 steps. Prints a table, writes json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HELD_OUT = [  # captions built from the synthetic vocabulary in combinations the generator did not emit
    "a green star moving up on a white background",
    "a yellow square moving down on a purple background",
    "camera panning left over an image of rings",
    "a blue background changing from red to green",
    "a purple circle moving right on a yellow background",
    "camera panning up over an image of checkers",
]


def train(cfg: dict) -> list[float]:
    from fastpost.config import from_dict
    from fastpost.trainer import TrainConfig, Trainer

    trainer = Trainer(from_dict(TrainConfig, cfg))
    return trainer.fit()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="outputs/distill_proof")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    t0 = time.time()

    from fastpost.demo import prepare_data

    prepare_data(work, args.videos)
    common = {
        "model": {"family": "cogvideox", "flavor": "debug"},
        "data": {"path": str(work / "shards"), "batch_size": 4},
        "checkpoint": {"every_steps": 0}, "logging": {"every_steps": 50, "progress_bar": False},
    }
    teacher_losses = train({
        **common, "output_dir": str(work / "teacher"), "steps": args.teacher_steps, "recipe": "finetune",
        "model": {**common["model"], "pretrained": str(work / "pipeline")},
        "optim": {"lr": 1e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
    })
    teacher_dir = str(work / "teacher" / "transformer")
    distill_losses = train({
        **common, "output_dir": str(work / "student"), "steps": args.distill_steps, "recipe": "distill",
        "model": {**common["model"], "pretrained": teacher_dir},
        "recipe_args": {"teacher": teacher_dir, "num_teacher_steps": 50, "phases": 4, "skip_steps": 5,
                        "target": "ema", "ema_decay": 0.95, "huber_c": 1e-3},
        "optim": {"lr": 3e-4, "warmup_steps": 20},
    })

    from fastpost.data.text import TextEncoder
    from fastpost.models import get_family
    from fastpost.noise import even_edges, make_grid, phase_edges
    from fastpost.recipes.distill import phased_sample

    family = get_family("cogvideox")
    teacher = family.load(teacher_dir).eval()
    student = family.load(str(work / "student" / "transformer")).eval()
    text = TextEncoder.from_pretrained(work / "pipeline", family=family)
    embeds, mask = text.encode(HELD_OUT, 8)
    shape = (len(HELD_OUT), 4, 5, 8, 8)  # 17 frames at 64x64 -> 5 latent frames of 8x8
    grid = make_grid(family, "debug", 50)
    rows = {f"{who} {k} step{'s' * (k > 1)}": [] for who in ("teacher", "student") for k in (1, 2, 4)}
    for seed in range(args.seeds):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + seed))
        ref = phased_sample(family, teacher, grid, even_edges(50, 50), noise, embeds, mask)
        for k in (1, 2, 4):
            t_out = phased_sample(family, teacher, grid, even_edges(50, k), noise, embeds, mask)
            s_edges = phase_edges(50, 4)[:: 4 // k]  # the student's own phase edges, every (4/k)-th
            s_out = phased_sample(family, student, grid, s_edges, noise, embeds, mask)
            rows[f"teacher {k} step{'s' * (k > 1)}"].append(((t_out - ref) ** 2).mean().item())
            rows[f"student {k} step{'s' * (k > 1)}"].append(((s_out - ref) ** 2).mean().item())
    table = {name: sum(v) / len(v) for name, v in rows.items()}
    result = {
        "table_mse_to_teacher_50_steps": table,
        "teacher_loss_first_last_20": [sum(teacher_losses[:20]) / 20, sum(teacher_losses[-20:]) / 20],
        "distill_loss_first_last_20": [sum(distill_losses[:20]) / 20, sum(distill_losses[-20:]) / 20],
        "held_out_prompts": len(HELD_OUT), "noise_seeds": args.seeds, "elapsed_s": round(time.time() - t0),
    }
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print("\n| sampler | latent MSE to teacher 50-step |\n|---|---|")
    for name, value in table.items():
        print(f"| {name} | {value:.5f} |")
    print(json.dumps({k: v for k, v in result.items() if k != "table_mse_to_teacher_50_steps"}))
    ok = table["student 4 steps"] < table["teacher 4 steps"]
    print("student@4 closer to teacher@50 than teacher@4:", ok)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
