"""VideoSampler: the sampling job, wired from the package's parts; `fastpost sample` is `main` below.

    fastpost sample --config configs/cogvideox/sample_debug.yaml --prompt "a red ball"
    torchrun --nproc_per_node=4 -m fastpost.cli sample --config ... parallel.ulysses=2 parallel.cfg=2

Build order (each step needs the ones before it):
  1. process group + layout (mesh.py: degrees checked against the world size first)
  2. prompts, model (pretrained dir, or a seeded flavor), geometry checks; every rank checks, so a bad job fails
     the same way everywhere before any collective
  3. fastpost DCP training checkpoint (collective), diffusers-format LoRA; adapters are fused into the weights
  4. SP processors + hooks (model.py: family.apply_sequence_parallel)
  5. prompt embeddings (prompts.py): rank 0 runs the family's text encoder, then frees it and broadcasts
Per video: seeded noise (drawn like the family's diffusers pipeline, then broadcast from the replica's rank 0),
the sampler loop (samplers.py) over the denoiser (denoiser.py: CFG strategy; one all-gather per step with CFG
parallel), the family's VAE decode and the writer (writer.py) on the replica's rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from fastpost.config import ConfigError, load_config, to_dict
from fastpost.data.checks import check_text_encoder_for_model, objective_scheduler_config
from fastpost.distributed.fsdp import DTYPES
from fastpost.distributed.parallel_dims import init_distributed
from fastpost.models import get_family
from fastpost.sampling import mesh as mesh_lib
from fastpost.sampling.denoiser import Denoiser, LowNoiseExpert
from fastpost.builder import BuildError, ModelSpec, build_model, pipeline_boundary_ratio
from fastpost.sampling.model import apply_trained_weights, check_lora_dir, resolve_checkpoint
from fastpost.sampling.prompts import encode_prompts
from fastpost.sampling.samplers import SamplerContext, build_sampler
from fastpost.sampling.writer import (PromptItem, Progress, SampleError, output_stem, read_prompts, to_uint8_frames,
                                      write_json, write_tensor, write_video)


@dataclass
class SampleModelConfig:
    family: str = "cogvideox"
    # model config without `pretrained` (None: the family's default, its tiny "debug"); with `pretrained` leave it
    # null: the pipeline dir's config.json and scheduler/scheduler_config.json are used, as diffusers does
    flavor: str | None = None
    pretrained: str | None = None  # diffusers pipeline dir (transformer/, vae/, text_encoder/, tokenizer/) or
    #                                a bare transformer dir
    checkpoint: str | None = None  # fastpost training checkpoint: a step_XXXXXXXX dir, or its parent (newest)
    train_config: str | None = None  # the run's config.yaml, for LoRA checkpoints; default <checkpoint>/../../
    lora: str | None = None  # diffusers-format LoRA dir (pytorch_lora_weights.safetensors)
    lora_scale: float = 1.0
    text_encoder: str | None = None  # default: `pretrained`
    image_encoder: str | None = None  # image-to-video with an image encoder (Wan 2.1 I2V's CLIP); default: `pretrained`
    vae: str | None = None  # default: `pretrained`
    init_seed: int = 0  # random init without `pretrained` (must match the training run's for its checkpoints)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # transformer, text encoder, VAE
    allow_pickle: bool = False  # accept pickled .bin weights in model folders (they can run code when loaded)
    attention_backend: str = "auto"
    # two-expert pipelines (Wan 2.2 A14B): the expert `checkpoint` / `lora` were trained for (a training job's
    # model.expert): high_noise (transformer/) or low_noise (transformer_2/)
    expert: Literal["high_noise", "low_noise"] | None = None


@dataclass
class SampleParallelConfig:
    ulysses: int = 1  # sequence-parallel degree
    cfg: int = 1  # 2: uncond and cond run on two rank groups at once
    timeout_s: float = 3600.0  # collective timeout: ranks wait at a barrier while a replica leader decodes/writes


@dataclass
class SampleConfig:
    prompt: str | None = None
    prompt_file: str | None = None  # text (one prompt per line) or .jsonl ({"prompt", "negative_prompt", "seed",
    #                                 "image"})
    image: str | None = None  # image-to-video models: the first frame (a path); a .jsonl line's "image" wins
    negative_prompt: str = ""  # "" is what both pipelines use by default
    output_dir: str = "outputs/samples"
    height: int | None = None  # None: the family pipeline's default
    width: int | None = None
    num_frames: int | None = None  # pixel frames: temporal * k + 1 (CogVideoX 4k+1, Mochi 6k+1)
    steps: int | None = None  # None: the pipeline's default (CogVideoX 50, Mochi 64)
    guidance_scale: float | None = None  # None: pipeline default (6.0 / 4.5); <= 1 disables CFG
    guidance_scale_2: float | None = None  # two-expert pipelines (Wan 2.2 A14B): the low-noise expert's; None: same
    dynamic_cfg: bool = False  # CogVideoXPipeline's use_dynamic_cfg schedule
    cfg_batched: bool = True  # parallel.cfg=1: uncond+cond in one batch (as diffusers); false: two calls, half the
    #                           activation memory, and bitwise the per-half computation CFG parallel does
    seed: int = 0  # video i: seed + i (a .jsonl line may set its own)
    sampler: str | None = None  # a registered sampler (ddim, dpm, flow_euler, phased, ...); None: the pipeline's
    imports: list[str] = field(default_factory=list)  # modules imported first, e.g. one registering a sampler
    sampler_args: dict = field(default_factory=dict)  # the sampler's own config, checked strictly
    scheduler_overrides: dict = field(default_factory=dict)  # over the scheduler config (see model.flavor)
    max_text_length: int | None = None  # None: what the pipeline pads to (transformer config)
    fps: int | None = None
    vae_tiling: bool = False
    save_latents: bool = False  # also write <stem>.latents.pt (final latents, BCFHW, fp32)
    progress_bar: bool = True
    model: SampleModelConfig = field(default_factory=SampleModelConfig)
    parallel: SampleParallelConfig = field(default_factory=SampleParallelConfig)


# ---- checks ------------------------------------------------------------------------------------------------------
def _guidance(cfg: SampleConfig) -> float:
    if cfg.guidance_scale is not None:
        return cfg.guidance_scale
    return get_family(cfg.model.family).pipeline_facts.guidance_scale


def check_parallel(cfg: SampleConfig, world_size: int) -> int:
    """Returns the number of replicas; raises SampleError for layouts that cannot work."""
    return mesh_lib.check_layout(cfg.parallel.cfg, cfg.parallel.ulysses, world_size, _guidance(cfg))


def _component_dir(explicit: str | None, pretrained: str | None, sub: str, what: str) -> Path:
    if not (explicit or pretrained):
        raise SampleError(f"no {what}: set model.{sub} or model.pretrained (a diffusers pipeline dir with {sub}/)")
    path = Path(explicit or pretrained)
    if (path / sub / "config.json").is_file():
        return path / sub
    if (path / "config.json").is_file():
        return path
    raise SampleError(f"{what} {str(path)!r} has neither {sub}/config.json nor config.json")


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, int, int, int, int]  # BCFHW, including pad_frames
    pad_frames: int  # leading latent frames CogVideoX 1.5's pipeline adds for patch_size_t, dropped before decode


def resolve_geometry(cfg: SampleConfig, family, model_config, vae_config: dict) -> Geometry:
    facts = family.pipeline_facts
    try:
        spatial, temporal = family.vae_factors(vae_config)
    except ValueError as e:
        raise SampleError(str(e)) from None
    if facts.size is not None:
        h0, w0, f0 = facts.size
    else:  # CogVideoXPipeline: the transformer's sample size in pixels
        h0, w0 = model_config.sample_height * spatial, model_config.sample_width * spatial
        f0 = model_config.sample_frames
    h, w = cfg.height or h0, cfg.width or w0
    f = cfg.num_frames or f0
    pt, p, _ = family.patch_sizes(model_config)
    mult = spatial * p
    if h <= 0 or w <= 0 or h % mult or w % mult:
        raise SampleError(f"resolution {h}x{w} (height x width) is not valid for {family.name}: both must be positive "
                          f"multiples of {mult} (VAE spatial factor {spatial} x patch size {p})")
    if f < 1 or (f - 1) % temporal:
        lo = max(0, (f - 1) // temporal) * temporal + 1
        raise SampleError(f"num_frames={f} is not valid for the {vae_config['_class_name']} VAE: it needs "
                          f"{temporal}k+1 frames (e.g. {lo} or {lo + temporal})")
    channels = family.latent_channels(model_config)  # an I2V transformer's in_channels also count the image's
    latent_channels = family.vae.latent_channels(vae_config)
    if latent_channels != channels:
        raise SampleError(f"the VAE has {latent_channels} latent channels but the transformer takes {channels}: "
                          f"model.vae does not belong to this model")
    latent_frames = (f - 1) // temporal + 1
    pad = (pt - latent_frames % pt) % pt
    shape = (1, channels, latent_frames + pad, h // spatial, w // spatial)
    return Geometry(h, w, f, shape, pad)


def check_images(items: list[PromptItem], takes_image: bool, family: str) -> None:
    """An image-to-video model needs an image for every prompt; a text-to-video model takes none."""
    if takes_image:
        missing = [i for i, it in enumerate(items) if it.image is None]
        if missing:
            raise SampleError(f"the {family} transformer is image-to-video: pass image=<path> (or an \"image\" key "
                              f"on every .jsonl line); prompts {missing[:5]} have none")
        absent = [it.image for it in items if not Path(it.image).is_file()]
        if absent:
            raise SampleError(f"image {absent[0]!r} does not exist")
    elif any(it.image is not None for it in items):
        raise SampleError(f"image= was given but the {family} transformer is text-to-video (it takes no image); "
                          f"use an image-to-video checkpoint or drop image")


# ---- the job -----------------------------------------------------------------------------------------------------
class VideoSampler:
    """Builds everything once (collective: every rank constructs it), then `run()` writes one video per prompt."""

    def __init__(self, cfg: SampleConfig):
        self.cfg = cfg
        m = cfg.model
        # 1. process group and layout
        self.family = get_family(m.family)
        self.facts = self.family.pipeline_facts
        self.guidance = _guidance(cfg)
        self.mesh = mesh_lib.SamplingMesh.build(cfg.parallel.cfg, cfg.parallel.ulysses, self.guidance)
        self.dims, self.device, self.rank = self.mesh.dims, self.mesh.device, self.mesh.rank
        self.replicas, self.is_leader = self.mesh.replicas, self.mesh.is_leader

        # 2. prompts, model, geometry (every rank, before any collective below)
        if self.family.vae is None or self.family.text is None:
            raise SampleError(f"model family {self.family.name!r} has no VAE / text encoder of its own: "
                              f"`fastpost sample` needs both (see docs/models.md for its own sampler)")
        # the loop runs in the pipeline's latent layout: stochastic samplers (DPM) then draw the same step noise
        self.layout = self.facts.noise_layout
        self.items: list[PromptItem] = read_prompts(cfg.prompt, cfg.prompt_file, cfg.negative_prompt, cfg.seed,
                                                    cfg.image)
        self.dtype = DTYPES[m.dtype]
        self.vae_dir = _component_dir(m.vae, m.pretrained, "vae", "VAE")
        _component_dir(m.text_encoder, m.pretrained, "text_encoder", "text encoder")  # checked here, loaded in 5.
        self.text_dir = Path(m.text_encoder or m.pretrained)  # TextEncoder finds tokenizer/ and text_encoder/ itself
        check_lora_dir(m.lora)
        # the one model builder: weights replicated (shard=False), SP processors installed, each tensor read once
        spec = ModelSpec(pretrained=m.pretrained, flavor=m.flavor, init_seed=m.init_seed, dtype=m.dtype,
                         trainable=False, allow_pickle=m.allow_pickle)
        try:
            model, _ = build_model(self.family, spec, self.dims, attention_backend=m.attention_backend,
                                   shard=False, device=self.device)
        except BuildError as e:
            raise SampleError(str(e)) from None
        self.vae_config = json.loads((self.vae_dir / "config.json").read_text())
        self.geometry = resolve_geometry(cfg, self.family, model.config, self.vae_config)
        self.takes_image = self.family.takes_image(model.config)
        check_images(self.items, self.takes_image, self.family.name)
        self.text_length = cfg.max_text_length or self.family.text.max_length(model.config)
        if not self.text_length:
            raise SampleError(f"set max_text_length: the transformer config has no "
                              f"{self.family.text.max_length_key!r}")
        self.steps = cfg.steps or self.facts.steps
        for module in cfg.imports:  # user plug-ins (e.g. a sampler registering itself)
            importlib.import_module(module)
        # a flavor whose noise schedule contradicts the checkpoint's scheduler/ raises; a text encoder of
        # another width fails here rather than inside the first forward
        objective_scheduler_config(self.family, m.pretrained, m.flavor)
        check_text_encoder_for_model(self.text_dir, model.config)
        self.scheduler_config = {**self.family.scheduler_config(m.pretrained, m.flavor), **cfg.scheduler_overrides}
        self.sampler_name = cfg.sampler or self.family.default_sampler(m.pretrained, m.flavor)
        build_sampler(self.sampler_name, cfg.sampler_args, self._sampler_ctx(0))  # fail now on a bad name / args

        # 3. trained weights, 4. sequence parallel
        self.checkpoint = resolve_checkpoint(m.checkpoint) if m.checkpoint else None
        self.model = model
        self.low_noise = self._low_noise_expert(spec)
        trained = self.low_noise.model if self.low_noise is not None and m.expert == "low_noise" else model
        apply_trained_weights(self.family, trained, m, self.checkpoint)

        # 5. prompt embeddings, identical everywhere
        negatives = [it.negative_prompt for it in self.items] if self.guidance > 1 else None
        self.cond, self.uncond = encode_prompts(self.family, self.text_dir, [it.prompt for it in self.items],
                                                negatives, self.text_length, self.device, self.dtype,
                                                allow_pickle=self.cfg.model.allow_pickle)
        if self.mesh.cfg_group is not None:
            strategy = "parallel"
        else:
            strategy = "batched" if cfg.cfg_batched else "sequential"
        self.denoiser = Denoiser(self.family, self.model, self.dtype, self.layout, self.guidance, cfg.dynamic_cfg,
                                 self.steps, strategy, self.mesh.cfg_group, self.mesh.cfg_rank, self.low_noise)
        self.vae = None
        self._embedder = None  # (image encoder, processor), loaded on first use

    def _low_noise_expert(self, spec: ModelSpec) -> LowNoiseExpert | None:
        """A two-expert pipeline folder (model_index.json names a transformer_2 and a boundary_ratio, as Wan 2.2
        A14B's): its low-noise expert, built like the first (replicated, SP processors), or None."""
        m = self.cfg.model
        try:
            ratio = pipeline_boundary_ratio(m.pretrained)
        except BuildError as e:
            raise SampleError(str(e)) from None
        if ratio is None:
            if m.expert is not None:
                raise SampleError(f"model.expert={m.expert!r} needs a two-expert pipeline folder (model_index.json "
                                  f"with transformer_2 and boundary_ratio); {m.pretrained} is not")
            return None
        if (m.checkpoint or m.lora) and m.expert is None:
            raise SampleError(f"{m.pretrained} holds two experts (transformer/ high noise, transformer_2/ low noise): "
                              f"set model.expert to the one model.checkpoint / model.lora was trained for")
        try:
            model_2, _ = build_model(self.family, spec.with_(pretrained=str(Path(m.pretrained) / "transformer_2")),
                                     self.dims, attention_backend=m.attention_backend, shard=False,
                                     device=self.device)
        except BuildError as e:
            raise SampleError(str(e)) from None
        boundary = ratio * self.scheduler_config.get("num_train_timesteps", 1000)
        guidance_2 = self.cfg.guidance_scale_2 if self.cfg.guidance_scale_2 is not None else self.guidance
        return LowNoiseExpert(model_2, boundary, guidance_2)

    def with_settings(self, cfg: SampleConfig, cond, uncond) -> "VideoSampler":
        """This sampler for other per-video settings (one prompt in `cfg`, its embeddings `cond` / `uncond` given),
        sharing the model, VAE and process groups: `fastpost serve` runs each request through one. The model
        section and the layout stay those this sampler was built with. Every rank calls it with the same `cfg`;
        it raises SampleError before any collective."""
        view = copy.copy(self)
        view.cfg = cfg
        view.items = read_prompts(cfg.prompt, None, cfg.negative_prompt, cfg.seed, cfg.image)
        check_images(view.items, self.takes_image, self.family.name)  # an I2V model's request needs its image
        view.guidance = _guidance(cfg)
        mesh_lib.check_layout(cfg.parallel.cfg, cfg.parallel.ulysses, self.dims.world_size, view.guidance)
        view.geometry = resolve_geometry(cfg, self.family, self.model.config, self.vae_config)
        view.steps = cfg.steps or self.facts.steps
        view.sampler_name = cfg.sampler or self.family.default_sampler(cfg.model.pretrained, cfg.model.flavor)
        try:
            build_sampler(view.sampler_name, cfg.sampler_args, view._sampler_ctx(0))
        except (ValueError, ConfigError) as e:
            raise SampleError(str(e)) from None
        view.cond, view.uncond = cond, (uncond if view.guidance > 1 else None)
        d = self.denoiser
        view.denoiser = Denoiser(self.family, self.model, self.dtype, self.layout, view.guidance, cfg.dynamic_cfg,
                                 view.steps, d.strategy, d.cfg_group, d.cfg_rank)
        return view

    # ---- the loop ------------------------------------------------------------------------------------------------
    def _sampler_ctx(self, seed: int) -> SamplerContext:
        return SamplerContext(self.family, dict(self.scheduler_config), torch.Generator("cpu").manual_seed(seed))

    def _bcfhw(self, x: torch.Tensor) -> torch.Tensor:
        return self.denoiser.to_bcfhw(x)

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        """Drawn with the same generator call and layout as the family's diffusers pipeline (same seed, same
        noise), in that layout (`self.layout`), identical on every rank of the replica (broadcast from its rank 0)."""
        b, c, f, h, w = self.geometry.latent_shape
        shape = (b, f, c, h, w) if self.layout == "BFCHW" else (b, c, f, h, w)
        noise = torch.randn(shape, generator=generator).to(self.device)
        if self.mesh.replica_group is not None:
            dist.broadcast(noise, group=self.mesh.replica_group, group_src=0)
        return noise

    def _load_vae(self):
        from fastpost.components import load_vae

        if self.vae is None:
            self.vae = load_vae(self.vae_dir, device=self.device, dtype=self.dtype, spec=self.family.vae,
                                allow_pickle=self.cfg.model.allow_pickle)
            if self.cfg.vae_tiling:
                self.vae.enable_tiling()
        return self.vae

    def image_condition(self, path: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The image-to-video conditioning of `path` as the family's I2V pipeline makes it: resized with the
        pipeline's VideoProcessor, encoded by the VAE with a posterior sample from the video's generator (before the
        noise draw, like the pipeline), identical on every rank of the replica. Every rank encodes (so every
        generator advances alike), then rank 0's tensors are broadcast."""
        from diffusers.utils import load_image
        from diffusers.video_processor import VideoProcessor

        spatial, _ = self.family.vae_factors(self.vae_config)
        image = VideoProcessor(vae_scale_factor=spatial).preprocess(
            load_image(path), height=self.geometry.height, width=self.geometry.width).to(self.device, self.dtype)
        out = self.family.image.encode(self._load_vae(), image, self.geometry.num_frames, generator)
        if self.family.takes_image_embed(self.model.config):  # e.g. Wan 2.1 I2V: CLIP on the image as given
            from fastpost.components import load_image_encoder

            spec, m = self.family.image, self.cfg.model
            if self._embedder is None:
                self._embedder = load_image_encoder(m.image_encoder or m.pretrained, spec.encoder_class,
                                                    spec.processor_class, self.device, self.dtype, m.allow_pickle)
            out[spec.embed_field] = spec.embed(*self._embedder, [load_image(path)])
        out = {k: v.to(self.device, torch.float32).contiguous() for k, v in out.items()}
        if self.mesh.replica_group is not None:
            for v in out.values():
                dist.broadcast(v, group=self.mesh.replica_group, group_src=0)
        return out

    @torch.no_grad()
    def generate(self, index: int, on_step=None) -> torch.Tensor:
        """Final latents (BCFHW, fp32, with any pipeline padding frames) of prompt `index`; collective over the
        replica that owns it. Latents stay fp32 between steps (only the model sees self.dtype) and are kept in the
        pipeline's layout, which samplers see. `on_step(done, total)` is called after every step (a progress
        bar of `fastpost serve`)."""
        item = self.items[index]
        ctx = self._sampler_ctx(item.seed)
        sampler = build_sampler(self.sampler_name, self.cfg.sampler_args, ctx)
        image = self.image_condition(item.image, ctx.generator) if self.takes_image else None
        latents = self.initial_noise(ctx.generator) * sampler.init_noise_sigma
        cond = tuple(x[index:index + 1].to(self.device) for x in self.cond)
        uncond = None if self.uncond is None else tuple(x[index:index + 1].to(self.device) for x in self.uncond)
        timesteps = sampler.set_timesteps(self.steps, self.device)
        bar = Progress(len(timesteps), f"video {index}", self.cfg.progress_bar and self.rank == 0)
        try:
            for i, t in enumerate(timesteps):
                pred = self.denoiser(latents, t, cond, uncond, image_cond=image)
                latents = sampler.step(pred, i, t, latents).float()
                bar.update()
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
        finally:
            bar.close()
        return self._bcfhw(latents).contiguous()

    # ---- decode and write ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor):
        """uint8 frames [B, F, H, W, 3]; the family's VAE loaded on first use (replica leaders only)."""
        from fastpost.components import denormalize_latents

        self._load_vae()
        z = latents_BCFHW[:, :, self.geometry.pad_frames:]
        z = denormalize_latents(self.vae, z.to(self.vae.dtype))
        return to_uint8_frames(self.vae.decode(z, return_dict=False)[0])

    def metadata(self, index: int, frames, timings: dict[str, float]) -> dict[str, Any]:
        it, g, cfg = self.items[index], self.geometry, self.cfg
        return {
            "prompt": it.prompt, "negative_prompt": it.negative_prompt, "seed": it.seed, "image": it.image,
            "steps": self.steps, "guidance_scale": self.guidance,
            "guidance_scale_2": self.low_noise.guidance if self.low_noise is not None else None,
            "dynamic_cfg": cfg.dynamic_cfg, "sampler": self.sampler_name,
            "sampler_args": cfg.sampler_args, "scheduler_config": self.scheduler_config,
            "model": {**to_dict(cfg.model), "checkpoint_resolved": str(self.checkpoint) if self.checkpoint else None},
            "lora": cfg.model.lora, "height": g.height, "width": g.width, "num_frames": g.num_frames,
            "decoded_frames": int(frames.shape[0]), "fps": cfg.fps or self.facts.fps,
            "latent_shape": list(g.latent_shape), "max_text_length": self.text_length,
            "parallel": {"world_size": self.dims.world_size, "replicas": self.replicas, "cfg": cfg.parallel.cfg,
                         "ulysses": cfg.parallel.ulysses},
            "elapsed_s": {k: round(v, 4) for k, v in timings.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def run(self) -> list[dict[str, Any]]:
        """Sample every prompt this replica owns; leaders write <stem>.mp4, <stem>.json (last), optionally
        <stem>.latents.pt. Returns the written files per video (leaders; an empty list elsewhere)."""
        out = Path(self.cfg.output_dir)
        if self.is_leader:
            out.mkdir(parents=True, exist_ok=True)
        results = []
        for index in range(self.mesh.replica_rank, len(self.items), self.replicas):
            t0 = time.perf_counter()
            latents = self.generate(index)
            t1 = time.perf_counter()
            if not self.is_leader:
                continue
            frames = self.decode(latents)[0]
            t2 = time.perf_counter()
            stem = output_stem(index, self.items[index].prompt)
            paths = {"video": out / f"{stem}.mp4", "metadata": out / f"{stem}.json"}
            if self.cfg.save_latents:
                paths["latents"] = out / f"{stem}.latents.pt"
                write_tensor(paths["latents"], latents)
            write_video(paths["video"], frames, self.cfg.fps or self.facts.fps)
            timings = {"denoise": t1 - t0, "decode": t2 - t1, "total": time.perf_counter() - t0}
            meta = self.metadata(index, frames, timings)
            meta.update(video=paths["video"].name, latents=paths.get("latents") and paths["latents"].name)
            write_json(paths["metadata"], meta)
            results.append({**paths, "index": index})
            if self.rank == 0:
                print(f"[fastpost] wrote {paths['video']} ({timings['total']:.1f}s)", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:  # every leader is done writing: the staging folder can go if it is empty
            with contextlib.suppress(OSError):  # missing, or not empty (files of an interrupted earlier run)
                (out / ".partial").rmdir()
        return results


# ---- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> SampleConfig:
    p = argparse.ArgumentParser(prog="fastpost sample", description="Sample videos (torchrun-compatible)")
    p.add_argument("--config", default=None, help="job file, e.g. configs/cogvideox/sample_debug.yaml")
    p.add_argument("--prompt", default=None, help="one prompt (= prompt=...)")
    p.add_argument("--prompt-file", default=None, help="text file, one prompt per line, or .jsonl (= prompt_file)")
    p.add_argument("--output-dir", default=None, help="= output_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=20 parallel.ulysses=2")
    args = p.parse_args(argv)
    cfg = load_config(SampleConfig, args.config, list(args.overrides))
    # flags are set after YAML parsing so prompts are taken verbatim (no YAML interpretation of "yes", "1.0")
    if args.prompt is not None:
        cfg.prompt, cfg.prompt_file = args.prompt, None
    if args.prompt_file is not None:
        cfg.prompt_file, cfg.prompt = args.prompt_file, None
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    return cfg


def main(argv: list[str] | None = None) -> int:
    """`fastpost sample ...`: 0 on success, 2 on a job error (message on stderr)."""
    created = False
    try:
        cfg = parse_args(argv)
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
            init_distributed(timeout_s=cfg.parallel.timeout_s)
            created = True
        VideoSampler(cfg).run()
        return 0
    except (SampleError, ConfigError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"fastpost sample: error: {e}", file=sys.stderr)
        return 2
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
