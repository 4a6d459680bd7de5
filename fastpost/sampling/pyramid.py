"""Command line of the pyramid family's stage-wise sampler (fastpost/models/pyramid/sampling.py): latents in,
latents out (the family has no VAE or text encoder of its own; prompt embeddings come from a latent shard).

    python -m fastpost.sampling.pyramid --transformer outputs/pyramid_debug/train/transformer \\
        --shards outputs/pyramid_debug/shards --index 0 --frames 3 --steps 2,2,2 --out outputs/pyramid_debug/sample.pt
    torchrun --nproc_per_node=2 -m fastpost.sampling.pyramid ... --ulysses 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastpost.models.pyramid.sampling import PyramidSampleConfig, model_velocity, sample


# ---- the command ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpost.sampling.pyramid",
                                description="Sample latents from a trained pyramid transformer (torchrun: SP)")
    p.add_argument("--transformer", required=True, help="save_pretrained dir (a training run's <output>/transformer)")
    p.add_argument("--shards", required=True, help="latent shard folder: prompt embeddings (and the i2v frame)")
    p.add_argument("--index", type=int, default=0, help="which shard sample's prompt to use")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the sample's)")
    p.add_argument("--height", type=int, default=None, help="latent height (default: the sample's)")
    p.add_argument("--width", type=int, default=None, help="latent width (default: the sample's)")
    p.add_argument("--steps", default="10,10,10", help="Euler steps per stage, coarse to fine")
    p.add_argument("--stage-range", default=None, help="stage boundaries in tau, e.g. 0,0.333,0.667,1 (training's)")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--video-guidance", type=float, default=5.0)
    p.add_argument("--frame-per-unit", type=int, default=1)
    p.add_argument("--i2v", action="store_true", help="condition on the shard sample's first latent frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ulysses", type=int, default=None, help="SP degree (default: the world size)")
    p.add_argument("--out", required=True, help="output .pt (latents BCFHW) + .json next to it")
    args = p.parse_args(argv)

    import torch.distributed as dist

    from fastpost.data.shards import ShardDataset
    from fastpost.distributed.parallel_dims import ParallelDims, init_distributed
    from fastpost.models.pyramid import FAMILY as family

    rank, world = init_distributed()
    try:
        dims = ParallelDims(ulysses=args.ulysses or world, world_size=world)
        dims.build_mesh()
        model = family.load(args.transformer).eval()
        family.apply_sequence_parallel(model, dims)
        item = ShardDataset(args.shards)[args.index]
        _, frames, height, width = item["latents"].shape
        shape = (1, model.config.in_channels, args.frames or frames, args.height or height, args.width or width)
        cfg = PyramidSampleConfig(steps_per_stage=tuple(int(s) for s in args.steps.split(",")),
                                  guidance_scale=args.guidance, video_guidance_scale=args.video_guidance,
                                  frame_per_unit=args.frame_per_unit)
        if args.stage_range:
            cfg.stage_range = tuple(float(s) for s in args.stage_range.split(","))
        fn = model_velocity(model, item["prompt_embeds"][None], item["prompt_attention_mask"][None])
        first = item["latents"][None, :, :1] if args.i2v else None
        t0 = time.perf_counter()
        latents = sample(fn, shape, cfg, torch.Generator().manual_seed(args.seed), first)
        seconds = time.perf_counter() - t0
        if rank == 0:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latents, out)
            meta = {**asdict(cfg), "shape": list(latents.shape), "seconds": seconds, "world": world,
                    "ulysses": dims.ulysses, "caption": item.get("caption", ""), "seed": args.seed, "i2v": args.i2v}
            out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
            print(f"[fastpost] wrote {out} {list(latents.shape)} in {seconds:.2f}s", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
