"""Command line of the pyramidal samplers (fastpost/models/pyramid/sampling.py) for the families with a pyramid spec
(`pyramid`: fastpost's own model; `pyramid_flux`: Pyramid Flow's released miniflux): latents in, latents out. The
prompt embeddings (and the i2v first frame) come from a latent shard sample; the schedule conventions, default
steps and guidance are the family's. A VAE is not fastpost's for these families: without `--vae-class` the
latents are written (.pt + .json); with it, decoded to an mp4 by that class (see fastpost/vae_class.py).

    python -m fastpost.sampling.pyramid --transformer outputs/pyramid_debug/train/transformer \\
        --shards outputs/pyramid_debug/shards --index 0 --frames 3 --steps 2,2,2 --out outputs/pyramid_debug/sample.pt
    python -m fastpost.sampling.pyramid --family pyramid_flux --transformer <miniflux>/diffusion_transformer_384p \\
        --lora <run>/lora --shards <imported shards> --frames 16 --out sample.pt
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
    p.add_argument("--family", default="pyramid", help="pyramid (fastpost's own model) or pyramid_flux (miniflux)")
    p.add_argument("--lora", default=None, help="a diffusers-format LoRA folder (a training run's <output>/lora)")
    p.add_argument("--steps", default=None, help="Euler steps per stage of later units (default: the family's)")
    p.add_argument("--first-frame-steps", default=None, help="of the first-frame unit (default: the family's)")
    p.add_argument("--stage-range", default=None, help="stage boundaries in tau, e.g. 0,0.333,0.667,1 (training's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG of the first frame (default: the family's)")
    p.add_argument("--video-guidance", type=float, default=None, help="CFG of later units (default: the family's)")
    p.add_argument("--frame-per-unit", type=int, default=1)
    p.add_argument("--i2v", action="store_true", help="condition on the shard sample's first latent frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ulysses", type=int, default=None, help="SP degree (default: the world size / --cfg)")
    p.add_argument("--cfg", type=int, default=1, choices=[1, 2], help="2: uncond and cond on separate rank groups")
    p.add_argument("--out", required=True, help="output .pt (latents BCFHW) + .json next to it")
    p.add_argument("--vae-class", default=None, help="decode with this VAE class ('package.module:Class', e.g. "
                   "the release's CausalVideoVAE from your install) into an mp4 next to --out; else latents only")
    p.add_argument("--vae-path", default=None, help="the VAE's weights folder (cls.from_pretrained)")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--prompt", default=None, help="encode this prompt (with the family's suffix) instead of the "
                   "shard sample's; needs --text-encoders (pyramid_flux: the release's folder)")
    p.add_argument("--negative-prompt", default=None, help="with --prompt (default: the family's negative prompt)")
    p.add_argument("--text-encoders", default=None, help="folder with tokenizer/ text_encoder/ tokenizer_2/ "
                   "text_encoder_2/ (CLIP-L + T5, as the release ships them)")
    args = p.parse_args(argv)
    if args.prompt is not None and not args.text_encoders:
        p.error("--prompt needs --text-encoders")

    import torch.distributed as dist

    from fastpost.data.shards import ShardDataset, read_empty_prompt
    from fastpost.distributed.parallel_dims import init_distributed
    from fastpost.models import get_family

    family = get_family(args.family)
    spec = family.pyramid
    if spec is None:
        raise SystemExit(f"family {args.family!r} has no pyramidal sampler; use `fastpost sample`")
    steps = lambda text, default: tuple(int(v) for v in text.split(",")) if text else default  # noqa: E731
    rank, world = init_distributed()
    try:
        from fastpost.sampling.mesh import SamplingMesh

        guidance = max(spec.guidance if args.guidance is None else (args.guidance,))
        mesh = SamplingMesh.build(args.cfg, args.ulysses or world // args.cfg, guidance)
        dims = mesh.dims  # replicas x cfg x ulysses; every replica samples the same video, rank 0 writes it
        model = family.load(args.transformer).eval()
        if args.lora:
            from fastpost.lora import load_lora

            load_lora(model, args.lora)
        family.apply_sequence_parallel(model, dims)
        item = ShardDataset(args.shards)[args.index]
        channels, frames, height, width = item["latents"].shape
        shape = (1, channels, args.frames or frames, args.height or height, args.width or width)
        cfg = PyramidSampleConfig(steps_per_stage=steps(args.steps, spec.steps),
                                  first_frame_steps=steps(args.first_frame_steps, spec.first_frame_steps),
                                  guidance_scale=spec.guidance[0] if args.guidance is None else args.guidance,
                                  video_guidance_scale=spec.guidance[1] if args.video_guidance is None
                                  else args.video_guidance, frame_per_unit=args.frame_per_unit)
        if args.stage_range:
            cfg.stage_range = tuple(float(s) for s in args.stage_range.split(","))
        schedule = cfg.schedule(spec.schedule)
        negative = {}
        if schedule.null_text == "empty_prompt":  # the release's unconditional branch: the encoding of ""
            e, m, pooled = read_empty_prompt(args.shards, with_pooled=True)
            negative = dict(negative_embeds_BTD=e[None], negative_mask_BT=m[None], negative_pooled_BD=pooled[None])
        pooled = item.get("pooled_prompt_embeds")
        embeds, mask = item["prompt_embeds"][None], item["prompt_attention_mask"][None]
        pooled = None if pooled is None else pooled[None]
        caption = item.get("caption", "")
        if args.prompt is not None:  # the release's inference: prompt + suffix, its default negative prompt
            from fastpost.data.pyramid_preprocess import FluxText

            text = FluxText(args.text_encoders, max_length=embeds.shape[1])
            caption = args.prompt + family.notes.get("prompt_suffix", "")
            neg = text.encode([args.negative_prompt if args.negative_prompt is not None
                               else family.notes.get("negative_prompt", "")])
            pos = text.encode([caption])
            embeds, mask, pooled = pos["prompt_embeds"], pos["prompt_attention_mask"], pos["pooled_prompt_embeds"]
            negative = dict(negative_embeds_BTD=neg["prompt_embeds"], negative_mask_BT=neg["prompt_attention_mask"],
                            negative_pooled_BD=neg["pooled_prompt_embeds"])
        fn = model_velocity(model, embeds, mask, spec=spec, schedule=schedule, pooled_BD=pooled,
                            cfg_group=mesh.cfg_group, cfg_rank=mesh.cfg_rank, **negative)
        first = item["latents"][None, :, :1] if args.i2v else None
        t0 = time.perf_counter()
        latents = sample(fn, shape, cfg, torch.Generator().manual_seed(args.seed), first, schedule=schedule)
        seconds = time.perf_counter() - t0
        if rank == 0:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latents, out)
            meta = {**asdict(cfg), "family": family.name, "lora": args.lora, "shape": list(latents.shape),
                    "seconds": seconds, "world": world,
                    "ulysses": dims.ulysses, "cfg": args.cfg, "caption": caption, "seed": args.seed, "i2v": args.i2v}
            if args.vae_class:  # latents are normalised per frame (family notes) -> the VAE's own scale
                from fastpost.data.pyramid_preprocess import denormalize_per_frame, load_vae_class, vae_decode
                from fastpost.data.synthetic import write_mp4

                vae = load_vae_class(args.vae_class, args.vae_path)
                norm = family.notes.get("latent_norm")
                z = denormalize_per_frame(latents[0], norm)[None] if norm else latents
                video = vae_decode(vae, z.to(next(vae.parameters()).dtype))[0]  # [3, F, H, W] in [-1, 1]
                frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
                write_mp4(out.with_suffix(".mp4"), frames, args.fps)
                meta["video"] = str(out.with_suffix(".mp4"))
            out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
            print(f"[fastpost] wrote {out} {list(latents.shape)} in {seconds:.2f}s", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
