"""Validation videos during training: the sequence-parallel sampler run on the sharded training model itself.

    validation: {every_steps: 500, prompts: ["a red ball"], steps: 30, guidance_scale: 4.5, height: 480, ...}

No copy of the model: every rank runs fastpost.sampling's denoiser and sampler over the FSDP-sharded, SP-hooked
training model in eval mode under no_grad (FSDP gathers one block at a time, as in training), with the EMA
weights swapped in when `use_ema`. The text encoder runs once (rank 0, then freed; the prompt embeddings are kept on
the host), the VAE is loaded by rank 0 only for the decode and freed right after, so nothing stays on the device
between validations: the training step after a validation takes what it took before
(benchmarks/bench_validation.py). Every dp replica samples the same prompts with the same noise (FSDP's gathers
span all ranks, so all take part); rank 0 decodes and writes
<output_dir>/validation/step_XXXXXXXX/<stem>.mp4 + <stem>.json, and logs the video to tensorboard / wandb.
Step 0 (the base model) is included, for comparison.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastpost.distributed.fsdp import compute_dtype, reshard_all


@dataclass
class ValidationConfig:
    every_steps: int = 0  # 0: off; else at step 0 (the base model) and every N optimizer steps
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    steps: int | None = None  # sampling steps; None: the family pipeline's default
    guidance_scale: float | None = None  # None: the pipeline's default; <= 1 disables CFG
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None
    num_frames: int | None = None
    seed: int = 0  # video i: seed + i, the same at every validation (so steps compare like for like)
    use_ema: bool = False  # sample with the EMA weights (needs ema_decay)


class Validator:
    """Built by the trainer after its models (step 5b); `run(step)` is collective over every rank."""

    def __init__(self, cfg: ValidationConfig, *, family, model: torch.nn.Module, out_dir: Path, rank: int,
                 device: torch.device, pretrained: str | None, flavor: str | None, allow_pickle: bool,
                 metrics=None, ema=None):
        from fastpost.sampling.sampler import resolve_geometry

        if cfg.every_steps < 0:
            raise ValueError(f"validation.every_steps must be >= 0 (0 turns validation off), got {cfg.every_steps}")
        if not cfg.prompts or not all(isinstance(p, str) and p.strip() for p in cfg.prompts):
            raise ValueError("validation.prompts must be a non-empty list of non-empty strings")
        if cfg.use_ema and ema is None:
            raise ValueError("validation.use_ema needs ema_decay set (there are no EMA weights to sample with)")
        if family.vae is None or family.text is None:
            raise ValueError(f"validation needs a VAE and a text encoder; model family {family.name!r} has none")
        root = Path(pretrained) if pretrained else None
        if root is None or not (root / "vae" / "config.json").is_file() or not (root / "text_encoder").is_dir():
            raise ValueError("validation needs model.pretrained to be a diffusers pipeline folder (with vae/ and "
                             "text_encoder/ + tokenizer/), to encode the prompts and decode the videos")
        import json

        self.cfg, self.family, self.model, self.rank, self.device = cfg, family, model, rank, device
        self.out, self.pretrained, self.flavor, self.allow_pickle = out_dir, root, flavor, allow_pickle
        self.metrics, self.ema = metrics, ema
        facts = family.pipeline_facts
        self.guidance = cfg.guidance_scale if cfg.guidance_scale is not None else facts.guidance_scale
        self.steps = cfg.steps or facts.steps
        self.fps = facts.fps
        self.vae_config = json.loads((root / "vae" / "config.json").read_text())
        self.geometry = resolve_geometry(cfg, family, model.config, self.vae_config)  # bad sizes fail at start
        self.scheduler_config = family.scheduler_config(str(root), flavor)
        self.sampler_name = family.default_sampler(str(root), flavor)
        self._embeds = None  # (cond, uncond) on the host, encoded at the first validation

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    # ---- the pieces --------------------------------------------------------------------------------------------
    def _prompt_embeds(self):
        """Encoded once (rank 0 loads the text encoder, encodes, frees it; broadcast), then kept on the host."""
        if self._embeds is None:
            from fastpost.sampling.prompts import encode_prompts

            prompts = list(self.cfg.prompts)
            negatives = [self.cfg.negative_prompt] * len(prompts) if self.guidance > 1 else None
            cond, uncond = encode_prompts(self.family, self.pretrained, prompts, negatives,
                                          self.family.text.max_length(self.model.config), self.device,
                                          compute_dtype(self.model), allow_pickle=self.allow_pickle)
            self._embeds = (tuple(t.cpu() for t in cond), uncond and tuple(t.cpu() for t in uncond))
        return self._embeds

    def _sample(self, index: int, denoiser, cond, uncond) -> torch.Tensor:
        """Final latents BCFHW (fp32) of prompt `index`: fastpost.sampling's sampler loop over the denoiser."""
        from fastpost.sampling.samplers import SamplerContext, build_sampler

        ctx = SamplerContext(self.family, dict(self.scheduler_config),
                             torch.Generator("cpu").manual_seed(self.cfg.seed + index))
        sampler = build_sampler(self.sampler_name, {}, ctx)
        b, c, f, h, w = self.geometry.latent_shape
        layout = denoiser.layout
        shape = (b, f, c, h, w) if layout == "BFCHW" else (b, c, f, h, w)
        # drawn like the family's pipeline (same seed, same noise); identical on every rank (same CPU generator)
        latents = torch.randn(shape, generator=ctx.generator).to(self.device) * sampler.init_noise_sigma
        c_i = tuple(t[index:index + 1].to(self.device) for t in cond)
        u_i = None if uncond is None else tuple(t[index:index + 1].to(self.device) for t in uncond)
        for i, t in enumerate(sampler.set_timesteps(self.steps, self.device)):
            latents = sampler.step(denoiser(latents, t, c_i, u_i), i, t, latents).float()
        return denoiser.to_bcfhw(latents).contiguous()

    def _decode_and_write(self, step: int, latents: list[torch.Tensor], elapsed: float) -> list[Path]:
        """Rank 0: the VAE is loaded for this decode only and freed after."""
        from fastpost.components import denormalize_latents, load_vae
        from fastpost.sampling.writer import output_stem, to_uint8_frames, write_json, write_video

        folder = self.out / "validation" / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        vae = load_vae(self.pretrained, device=self.device, dtype=compute_dtype(self.model), spec=self.family.vae,
                       allow_pickle=self.allow_pickle)
        written = []
        try:
            for i, z in enumerate(latents):
                z = denormalize_latents(vae, z[:, :, self.geometry.pad_frames:].to(vae.dtype))
                frames = to_uint8_frames(vae.decode(z, return_dict=False)[0])[0]
                stem = output_stem(i, self.cfg.prompts[i])
                write_video(folder / f"{stem}.mp4", frames, self.fps)
                g = self.geometry
                write_json(folder / f"{stem}.json", {  # last: the marker that the video is complete
                    "step": step, "prompt": self.cfg.prompts[i], "negative_prompt": self.cfg.negative_prompt,
                    "seed": self.cfg.seed + i, "steps": self.steps, "guidance_scale": self.guidance,
                    "sampler": self.sampler_name, "height": g.height, "width": g.width, "num_frames": g.num_frames,
                    "decoded_frames": int(frames.shape[0]), "fps": self.fps, "use_ema": self.cfg.use_ema,
                    "video": f"{stem}.mp4", "elapsed_s": round(elapsed, 3)})
                if self.metrics is not None:
                    self.metrics.log_video(f"validation/{i:02d}", frames, step, self.fps, folder / f"{stem}.mp4")
                written.append(folder / f"{stem}.mp4")
        finally:
            del vae
            with contextlib.suppress(OSError):
                (folder / ".partial").rmdir()
        return written

    # ---- the run -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, step: int) -> list[Path]:
        from fastpost.sampling.denoiser import Denoiser

        t0 = time.perf_counter()
        model, was_training = self.model, self.model.training
        cond, uncond = self._prompt_embeds()
        denoiser = Denoiser(self.family, model, compute_dtype(model), self.family.pipeline_facts.noise_layout,
                            self.guidance, False, self.steps, "batched")
        swap = self.ema.swapped() if self.cfg.use_ema else contextlib.nullcontext()
        model.eval()
        try:
            with swap:
                latents = [self._sample(i, denoiser, cond, uncond).cpu() for i in range(len(self.cfg.prompts))]
                # FSDP keeps the last block and the root gathered after a forward (expecting backward): free them,
                # before the EMA weights are swapped back, so training gathers its own weights afresh
                reshard_all(model)
        finally:
            model.train(was_training)
        written = []
        if self.rank == 0:
            written = self._decode_and_write(step, latents, time.perf_counter() - t0)
        del latents, denoiser
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the VAE's and the sampler's blocks go back: training's peak is its own
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            print(f"[fastpost] validation at step {step}: {len(written)} videos in "
                  f"{time.perf_counter() - t0:.1f}s -> {self.out / 'validation' / f'step_{step:08d}'}", flush=True)
        return written
