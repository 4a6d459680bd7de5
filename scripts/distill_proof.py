"""Does few-step distillation work? A CPU-sized proof of PCM, DMD2 and MCM, one command:

    python scripts/distill_proof.py [--workdir outputs/distill_proof]

1. tiny CogVideoX pipeline + synthetic videos -> latent shards (the demo's data stages), and an image set:
   synthetic stills encoded by the same VAE into single-frame latent shards (MCM's appearance data)
2. train a teacher (full finetune, v-prediction) on the video shards, export it
3. distill three 4-step students from it: PCM (recipe distill), DMD2 (recipe dmd2, with DMD v1's regression on
   the teacher's 50-step ODE outputs from the same noise, weight --dmd-regression-weight), MCM (recipe mcm)
4. on held-out prompts x noise seeds, per sampler: latent MSE and SSIM of decoded frames to the teacher's 50-step
   output (same prompt and noise), diversity (per-prompt variance over seeds / the teacher@50's), and the frame
   proxy: the distance of per-frame latent statistics (channel means and stds) to the image set's. Prints one
   table, writes result.json. Exit status 0 when every target of docs/distill.md holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HELD_OUT = [  # captions built from the synthetic vocabulary in combinations the generator did not emit
    "a green star moving up on a white background",
    "a yellow square moving down on a purple background",
    "camera panning left over an image of rings",
    "a blue background changing from red to green",
    "a purple circle moving right on a yellow background",
    "camera panning up over an image of checkers",
]


def train(cfg: dict) -> list[dict]:
    from fastpost.config import from_dict
    from fastpost.trainer import TrainConfig, Trainer

    shutil.rmtree(cfg["output_dir"], ignore_errors=True)  # always from scratch (no resume, no old metrics)
    Trainer(from_dict(TrainConfig, cfg)).fit()
    return [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]


def first_last(records: list[dict], key: str, n: int = 20) -> list[float]:
    vals = [r[key] for r in records if key in r]
    return [sum(vals[:n]) / len(vals[:n]), sum(vals[-n:]) / len(vals[-n:])]


def prepare_images(work: Path, images: int) -> Path:
    """Synthetic stills -> the same preprocessing as the videos -> single-frame latent shards."""
    from fastpost.demo import write_jobs

    src, out = work / "image_src", work / "image_shards"
    for d in (src, out):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    subprocess.run([sys.executable, "-m", "fastpost.data.synthetic", f"out_dir={src}", "num_videos=0",
                    f"num_images={images}", "sizes=[[64, 64]]", "seed=1"], check=True)
    job = work / "preprocess_images.yaml"
    text = write_jobs(work)["preprocess"].read_text()
    job.write_text(text.replace(str(work / "videos"), str(src)).replace(str(work / "shards"), str(out)))
    subprocess.run([sys.executable, "-m", "fastpost.cli", "preprocess", "--config", str(job)], check=True)
    return out


def ssim(a, b) -> float:
    """Mean SSIM of uint8 frames [N, H, W, 3] (7x7 box window, per channel; constants of Wang et al. 2004)."""
    x = torch.from_numpy(a).float().permute(0, 3, 1, 2) / 255
    y = torch.from_numpy(b).float().permute(0, 3, 1, 2) / 255
    mu_x, mu_y = F.avg_pool2d(x, 7, 1), F.avg_pool2d(y, 7, 1)
    var_x = F.avg_pool2d(x * x, 7, 1) - mu_x ** 2
    var_y = F.avg_pool2d(y * y, 7, 1) - mu_y ** 2
    cov = F.avg_pool2d(x * y, 7, 1) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean().item()


def frame_stats(latents_BCFHW: torch.Tensor) -> torch.Tensor:
    """Per latent frame: channel means and stds -> [B*F, 2C]."""
    x = latents_BCFHW.permute(0, 2, 1, 3, 4).flatten(0, 1).flatten(2)  # [B*F, C, H*W]
    return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def stats_distance(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """Frechet distance of diagonal Gaussians fitted to two sets of per-frame statistics."""
    return ((gen.mean(0) - ref.mean(0)) ** 2 + (gen.std(0) - ref.std(0)) ** 2).sum().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="outputs/distill_proof")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--distill-steps", type=int, default=300)  # PCM and MCM
    p.add_argument("--dmd-steps", type=int, default=150)  # generator updates (each after --critic-updates)
    p.add_argument("--critic-updates", type=int, default=2)
    p.add_argument("--dmd-lr", type=float, default=2e-4)  # generator; the critic: --critic-lr
    p.add_argument("--no-backward-simulation", action="store_true")
    p.add_argument("--dmd-renoise", choices=["ddim", "fresh"], default="ddim")
    p.add_argument("--dmd-regression-weight", type=float, default=1.0)  # DMD v1's paired teacher-ODE regression
    p.add_argument("--dmd-weight", type=float, default=1.0)  # 0: regression only (an ablation)
    p.add_argument("--dmd-real-guidance", type=float, default=1.0)
    p.add_argument("--critic-lr", type=float, default=3e-4)
    p.add_argument("--students", default="pcm,dmd2,mcm",
                   help="students to train; the others are loaded from --workdir (their earlier run)")
    p.add_argument("--mcm-raw-weight", type=float, default=1.0)
    p.add_argument("--mcm-adv-weight", type=float, default=0.1)
    p.add_argument("--mcm-disc-lr", type=float, default=2e-4)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reuse-teacher", action="store_true",
                   help="keep the data, image set and teacher of an earlier run in --workdir (train the students only)")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    t0 = time.time()

    from fastpost.demo import prepare_data

    reuse = args.reuse_teacher and (work / "teacher" / "transformer" / "config.json").is_file()
    if not reuse:
        prepare_data(work, args.videos)
        prepare_images(work, args.images)
    image_shards = work / "image_shards"
    common = {
        "model": {"family": "cogvideox", "flavor": "debug"},
        "data": {"path": str(work / "shards"), "batch_size": 4},
        "checkpoint": {"every_steps": 0}, "logging": {"every_steps": 1, "progress_bar": False},
    }
    teacher_job = {
        **common, "output_dir": str(work / "teacher"), "steps": args.teacher_steps, "recipe": "finetune",
        "model": {**common["model"], "pretrained": str(work / "pipeline")},
        "optim": {"lr": 1e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
    }
    logs = {"teacher": [json.loads(line) for line in (work / "teacher" / "metrics.jsonl").read_text().splitlines()]
            if reuse else train(teacher_job)}
    teacher_dir = str(work / "teacher" / "transformer")
    student = {**common["model"], "pretrained": teacher_dir}
    pcm_args = {"teacher": teacher_dir, "num_teacher_steps": 50, "phases": 4, "skip_steps": 5, "target": "ema",
                "ema_decay": 0.95, "huber_c": 1e-3}
    todo = set(args.students.split(","))

    def train_or_load(name, cfg):
        if name in todo:
            return train(cfg)
        return [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]

    logs["pcm"] = train_or_load("pcm", {**common, "output_dir": str(work / "pcm"), "steps": args.distill_steps,
                                        "recipe": "distill", "model": student, "recipe_args": pcm_args,
                                        "optim": {"lr": 3e-4, "warmup_steps": 20}})
    logs["dmd2"] = train_or_load("dmd2", {
        **common, "output_dir": str(work / "dmd2"), "steps": args.dmd_steps, "recipe": "dmd2", "model": student,
        "recipe_args": {"teacher": teacher_dir, "num_teacher_steps": 50, "generator_steps": 4,
                        "renoise": args.dmd_renoise,
                        "critic_updates": args.critic_updates, "critic": "full",
                        "critic_optim": {"lr": args.critic_lr}, "real_guidance": args.dmd_real_guidance,
                        "regression_weight": args.dmd_regression_weight, "dmd_weight": args.dmd_weight,
                        "backward_simulation": not args.no_backward_simulation},
        "optim": {"lr": args.dmd_lr, "warmup_steps": 20, "betas": [0.0, 0.99]},
    })
    logs["mcm"] = train_or_load("mcm", {
        **common, "output_dir": str(work / "mcm"), "steps": args.distill_steps, "recipe": "mcm", "model": student,
        "recipe_args": {**pcm_args, "images": str(image_shards), "image_batch_size": 4, "image_mix": 1.0,
                        "adv_weight": args.mcm_adv_weight, "raw_weight": args.mcm_raw_weight,
                        "disc_optim": {"lr": args.mcm_disc_lr, "betas": [0.0, 0.99]}},
        "optim": {"lr": 3e-4, "warmup_steps": 20},
    })

    from fastpost.components import denormalize_latents, load_vae
    from fastpost.data.loader import ShardLoader
    from fastpost.data.text import TextEncoder
    from fastpost.models import get_family
    from fastpost.noise import even_edges, make_grid, phase_edges
    from fastpost.recipes.distill import phased_sample
    from fastpost.recipes.dmd2 import dmd_sample
    from fastpost.sampling.writer import to_uint8_frames

    family = get_family("cogvideox")
    models = {name: family.load(str(work / name / "transformer")).eval() for name in ("pcm", "dmd2", "mcm")}
    teacher = family.load(teacher_dir).eval()
    vae = load_vae(work / "pipeline", spec=family.vae)
    text = TextEncoder.from_pretrained(work / "pipeline", family=family)
    embeds, mask = text.encode(HELD_OUT, 8)
    shape = (len(HELD_OUT), 4, 5, 8, 8)  # 17 frames at 64x64 -> 5 latent frames of 8x8
    grid = make_grid(family, "debug", 50)
    edges4 = phase_edges(50, 4)
    samplers = {
        "teacher@50": lambda noise, seed: phased_sample(family, teacher, grid, even_edges(50, 50), noise, embeds, mask),
        "teacher@4": lambda noise, seed: phased_sample(family, teacher, grid, even_edges(50, 4), noise, embeds, mask),
        "PCM@4": lambda noise, seed: phased_sample(family, models["pcm"], grid, edges4, noise, embeds, mask),
        "DMD2@4": lambda noise, seed: dmd_sample(family, models["dmd2"], grid, edges4, noise, embeds, mask,
                                                 mode=args.dmd_renoise, generator=torch.Generator().manual_seed(seed)),
        "MCM@4": lambda noise, seed: phased_sample(family, models["mcm"], grid, edges4, noise, embeds, mask),
    }
    outs = {name: [] for name in samplers}
    for seed in range(args.seeds):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + seed))
        for name, run in samplers.items():
            outs[name].append(run(noise, seed))

    @torch.no_grad()
    def decode(z):
        return to_uint8_frames(vae.decode(denormalize_latents(vae, z), return_dict=False)[0])

    images = torch.cat([b["latents"] for b in ShardLoader(image_shards, 8, shuffle=False)])
    image_stats = frame_stats(images)
    ref, ref_frames = outs["teacher@50"], [decode(z) for z in outs["teacher@50"]]
    ref_var = torch.stack(ref).var(dim=0).mean().item()
    table = {}
    for name, xs in outs.items():
        frames = [decode(z) for z in xs]
        table[name] = {
            "latent_mse": sum(((x - r) ** 2).mean().item() for x, r in zip(xs, ref)) / len(xs),
            "ssim": sum(ssim(f.reshape(-1, *f.shape[2:]), r.reshape(-1, *r.shape[2:]))
                        for f, r in zip(frames, ref_frames)) / len(xs),
            "diversity": torch.stack(xs).var(dim=0).mean().item() / ref_var,
            "frame_proxy": stats_distance(frame_stats(torch.cat(xs)), image_stats),
        }
    targets = {
        "DMD2@4 closer to teacher@50 than teacher@4": table["DMD2@4"]["latent_mse"] < table["teacher@4"]["latent_mse"],
        "MCM@4 closer to teacher@50 than teacher@4": table["MCM@4"]["latent_mse"] < table["teacher@4"]["latent_mse"],
        "diversity >= 0.5 (DMD2, MCM)": min(table["DMD2@4"]["diversity"], table["MCM@4"]["diversity"]) >= 0.5,
        "MCM frame proxy better than PCM": table["MCM@4"]["frame_proxy"] < table["PCM@4"]["frame_proxy"],
    }
    losses = {"teacher loss": first_last(logs["teacher"], "loss"), "PCM loss": first_last(logs["pcm"], "loss"),
              "DMD2 critic denoising": first_last(logs["dmd2"], "denoise_critic"),
              "DMD2 generator (DMD) loss": first_last(logs["dmd2"], "dmd_generator"),
              **({"DMD2 regression loss": first_last(logs["dmd2"], "regression_generator")}
                 if args.dmd_regression_weight > 0 else {}),
              "MCM motion loss": first_last(logs["mcm"], "motion_student"),
              "MCM discriminator loss": first_last(logs["mcm"], "loss_disc")}
    result = {"args": vars(args), "table": table, "targets": targets, "loss_first_last_20": losses,
              "held_out_prompts": len(HELD_OUT), "noise_seeds": args.seeds, "image_set": len(images),
              "elapsed_s": round(time.time() - t0)}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print("\n| sampler | latent MSE to teacher@50 | SSIM to teacher@50 | diversity (/ teacher@50) | frame proxy |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['latent_mse']:.5f} | {row['ssim']:.4f} | {row['diversity']:.3f} | "
              f"{row['frame_proxy']:.4f} |")
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(0 if all(targets.values()) else 1)


if __name__ == "__main__":
    main()
