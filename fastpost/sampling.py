"""Video sampling with Ulysses sequence parallelism and CFG parallelism; mp4 + metadata json per prompt.

    fastpost sample --config configs/cogvideox/sample_debug.yaml --prompt "a red ball"
    torchrun --nproc_per_node=4 -m fastpost.cli sample --config ... parallel.ulysses=2 parallel.cfg=2

Layout: world = replicas x cfg x ulysses, built as ParallelDims(dp_replicate=replicas, dp_shard=cfg,
ulysses=ulysses). The `dp_shard` mesh is the CFG group (rank 0 = uncond, 1 = cond), the `sp` mesh splits the video
tokens, and each replica (`fsdp` mesh = cfg x sp ranks) samples its own prompts (i % replicas). Weights are
replicated (no FSDP: sampling holds no gradients or optimizer state).

Build order (each step needs the ones before it):
  1. process group + ParallelDims (degrees checked against the world size first)
  2. prompts, model (pretrained dir, or a seeded flavor), geometry checks; every rank checks, so a bad job fails
     the same way everywhere before any collective
  3. fastpost DCP training checkpoint (collective), diffusers-format LoRA; adapters are fused into the weights
  4. SP processors + hooks (family.apply_sequence_parallel)
  5. prompt embeddings: rank 0 runs the text encoder, then frees it and broadcasts the embeddings
Per video: seeded noise (drawn like the family's diffusers pipeline, then broadcast from the replica's rank 0),
the sampler loop (one all-gather per step over the CFG group), VAE decode and writing on the replica's rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from fastpost.config import ConfigError, from_dict, load_config, to_dict
from fastpost.distributed.parallel_dims import ParallelDims, init_distributed
from fastpost.models import get_family
from fastpost.sampling_io import (PromptItem, Progress, SampleError, output_stem, read_prompts, to_uint8_frames,
                                  write_json, write_tensor, write_video)
from fastpost.sampling_schedulers import SamplerContext, build_sampler, guidance_at, pipeline_facts

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampleModelConfig:
    family: str = "cogvideox"
    flavor: str | None = "debug"  # model config without `pretrained`; and the family's scheduler config for it
    #                               (null with `pretrained`: the pipeline dir's scheduler/scheduler_config.json)
    pretrained: str | None = None  # diffusers pipeline dir (transformer/, vae/, text_encoder/, tokenizer/) or
    #                                a bare transformer dir
    checkpoint: str | None = None  # fastpost training checkpoint: a step_XXXXXXXX dir, or its parent (newest)
    train_config: str | None = None  # the run's config.yaml, for LoRA checkpoints; default <checkpoint>/../../
    lora: str | None = None  # diffusers-format LoRA dir (pytorch_lora_weights.safetensors)
    lora_scale: float = 1.0
    text_encoder: str | None = None  # default: `pretrained`
    vae: str | None = None  # default: `pretrained`
    init_seed: int = 0  # random init without `pretrained` (must match the training run's for its checkpoints)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # transformer, text encoder, VAE
    attention_backend: str = "auto"


@dataclass
class SampleParallelConfig:
    ulysses: int = 1  # sequence-parallel degree
    cfg: int = 1  # 2: uncond and cond run on two rank groups at once


@dataclass
class SampleConfig:
    prompt: str | None = None
    prompt_file: str | None = None  # text (one prompt per line) or .jsonl ({"prompt", "negative_prompt", "seed"})
    negative_prompt: str = ""  # "" is what both pipelines use by default
    output_dir: str = "outputs/samples"
    height: int | None = None  # None: the family pipeline's default
    width: int | None = None
    num_frames: int | None = None  # pixel frames: 4k+1 (CogVideoX), 6k+1 (Mochi)
    steps: int | None = None  # None: the pipeline's default (CogVideoX 50, Mochi 64)
    guidance_scale: float | None = None  # None: pipeline default (6.0 / 4.5); <= 1 disables CFG
    dynamic_cfg: bool = False  # CogVideoXPipeline's use_dynamic_cfg schedule
    cfg_batched: bool = True  # parallel.cfg=1: uncond+cond in one batch (as diffusers); false: two calls, half the
    #                           activation memory, and bitwise the per-half computation CFG parallel does
    seed: int = 0  # video i: seed + i (a .jsonl line may set its own)
    sampler: str | None = None  # a registered sampler (ddim, dpm, flow_euler, ...); None: the pipeline's
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
def check_parallel(cfg: SampleConfig, world_size: int) -> int:
    """Returns the number of replicas; raises SampleError for layouts that cannot work."""
    c, u = cfg.parallel.cfg, cfg.parallel.ulysses
    if c not in (1, 2):
        raise SampleError(f"parallel.cfg must be 1 or 2 (uncond and cond on separate rank groups), got {c}")
    if u < 1:
        raise SampleError(f"parallel.ulysses must be >= 1, got {u}")
    if world_size % (c * u):
        raise SampleError(f"parallel.cfg x parallel.ulysses = {c} x {u} = {c * u} does not divide the world size "
                          f"{world_size}; launch a multiple of {c * u} processes")
    if c == 2 and not _guidance(cfg) > 1:
        raise SampleError(f"parallel.cfg=2 runs uncond and cond apart, but guidance_scale={_guidance(cfg)} <= 1 "
                          f"disables classifier-free guidance; set parallel.cfg=1 or guidance_scale > 1")
    return world_size // (c * u)


def _guidance(cfg: SampleConfig) -> float:
    if cfg.guidance_scale is not None:
        return cfg.guidance_scale
    return pipeline_facts(get_family(cfg.model.family)).guidance_scale


def _component_dir(explicit: str | None, pretrained: str | None, sub: str, what: str) -> Path:
    if not (explicit or pretrained):
        raise SampleError(f"no {what}: set model.{sub} or model.pretrained (a diffusers pipeline dir with {sub}/)")
    path = Path(explicit or pretrained)
    if (path / sub / "config.json").is_file():
        return path / sub
    if (path / "config.json").is_file():
        return path
    raise SampleError(f"{what} {str(path)!r} has neither {sub}/config.json nor config.json")


def vae_factors(vae_config: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of a VAE from its config.json; pixel frames are temporal * k + 1."""
    name = vae_config.get("_class_name")
    if name == "AutoencoderKLCogVideoX":  # as CogVideoXPipeline: 2 ** (levels - 1), temporal_compression_ratio
        return 2 ** (len(vae_config["block_out_channels"]) - 1), int(vae_config["temporal_compression_ratio"])
    if name == "AutoencoderKLMochi":  # MochiPipeline hard-codes 8 and 6 = these products for the real VAE
        return math.prod(vae_config["spatial_expansions"]), math.prod(vae_config["temporal_expansions"])
    raise SampleError(f"unsupported VAE class {name!r}; supported: AutoencoderKLCogVideoX, AutoencoderKLMochi")


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, int, int, int, int]  # BCFHW, including pad_frames
    pad_frames: int  # leading latent frames CogVideoX 1.5's pipeline adds for patch_size_t, dropped before decode


def resolve_geometry(cfg: SampleConfig, family, model_config, vae_config: dict) -> Geometry:
    facts = pipeline_facts(family)
    spatial, temporal = vae_factors(vae_config)
    if facts.size is not None:
        h0, w0, f0 = facts.size
    else:  # CogVideoXPipeline: the transformer's sample size in pixels
        h0, w0 = model_config.sample_height * spatial, model_config.sample_width * spatial
        f0 = model_config.sample_frames
    h, w = cfg.height or h0, cfg.width or w0
    f = cfg.num_frames or f0
    p = model_config.patch_size
    mult = spatial * p
    if h <= 0 or w <= 0 or h % mult or w % mult:
        raise SampleError(f"resolution {h}x{w} (height x width) is not valid for {family.name}: both must be positive "
                          f"multiples of {mult} (VAE spatial factor {spatial} x patch size {p})")
    if f < 1 or (f - 1) % temporal:
        lo = max(0, (f - 1) // temporal) * temporal + 1
        raise SampleError(f"num_frames={f} is not valid for the {vae_config['_class_name']} VAE: it needs "
                          f"{temporal}k+1 frames (e.g. {lo} or {lo + temporal})")
    if vae_config.get("latent_channels") != model_config.in_channels:
        raise SampleError(f"the VAE has {vae_config.get('latent_channels')} latent channels but the transformer takes "
                          f"{model_config.in_channels}: model.vae does not belong to this model")
    latent_frames = (f - 1) // temporal + 1
    pt = getattr(model_config, "patch_size_t", None) or 1
    pad = (pt - latent_frames % pt) % pt
    shape = (1, model_config.in_channels, latent_frames + pad, h // spatial, w // spatial)
    return Geometry(h, w, f, shape, pad)


# the sampler that runs a pipeline dir's scheduler class, when the job names none
SCHEDULER_SAMPLERS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm",
                      "FlowMatchEulerDiscreteScheduler": "flow_euler"}


def scheduler_config(family, flavor: str | None, pretrained: str | None) -> tuple[dict, str | None]:
    """(config, sampler for it or None): the flavor's scheduler config; with flavor null, the pipeline dir's own
    scheduler/scheduler_config.json (what diffusers would use)."""
    if flavor is None and pretrained is not None:
        path = Path(pretrained) / "scheduler" / "scheduler_config.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            config = {k: v for k, v in raw.items() if not k.startswith("_")}
            return config, SCHEDULER_SAMPLERS.get(raw.get("_class_name"))
    return family.scheduler_config(flavor), None


# ---- model -------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> Path:
    from fastpost.checkpoint import complete_checkpoints

    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    found = complete_checkpoints(p)
    if not found:
        raise SampleError(f"model.checkpoint {path!r} is neither a complete DCP checkpoint (step_XXXXXXXX with "
                          f".metadata) nor a folder holding one")
    return found[-1]


def load_training_checkpoint(model: torch.nn.Module, step_dir: Path, train_config: str | None) -> bool:
    """Load the model part of a fastpost training checkpoint into a plain (unsharded) model; collective when a
    process group exists. LoRA runs save only adapter tensors: the adapter is injected first, with the run's
    LoRA config (rank/alpha/targets) read from its config.yaml. Returns whether it was a LoRA checkpoint."""
    import torch.distributed.checkpoint as dcp
    import yaml
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from fastpost.lora import LoRAConfig, inject_lora

    stored = {k[len("model."):] for k in dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
              if k.startswith("model.")}
    if not stored:
        raise SampleError(f"checkpoint {str(step_dir)!r} holds no model state")
    is_lora = any("lora_" in k for k in stored)
    if is_lora:
        conf = Path(train_config) if train_config else step_dir.parent.parent / "config.yaml"
        if not conf.is_file():
            raise SampleError(f"{str(step_dir)!r} is a LoRA checkpoint; its run's config.yaml (for the LoRA rank, "
                              f"alpha and targets) is not at {str(conf)!r}: set model.train_config")
        run = yaml.safe_load(conf.read_text()) or {}
        inject_lora(model, from_dict(LoRAConfig, run.get("lora", {}), where="lora"))
    options = StateDictOptions(ignore_frozen_params=is_lora)
    state = get_model_state_dict(model, options=options)
    missing = sorted(set(state) - stored)
    if missing:
        raise SampleError(f"checkpoint {str(step_dir)!r} does not match the model (flavor/pretrained/LoRA): "
                          f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    dcp.load({"model": state}, checkpoint_id=str(step_dir))
    # strict=False: a LoRA state holds only the adapter; completeness was checked against `stored` above
    set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=is_lora, strict=False))
    if is_lora:  # fold the adapter into the weights: exact up to rounding, and no LoRA matmuls per step
        model.fuse_lora(lora_scale=1.0)
        model.unload_lora()
    return is_lora


class VideoSampler:
    """Builds everything once (collective: every rank constructs it), then `run()` writes one video per prompt."""

    def __init__(self, cfg: SampleConfig):
        self.cfg = cfg
        # 1. process group and meshes
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.replicas = check_parallel(cfg, world)
        self.dims = ParallelDims(dp_replicate=self.replicas, dp_shard=cfg.parallel.cfg, ulysses=cfg.parallel.ulysses,
                                 world_size=world)
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available()
                                   else "cpu")
        self.dims.build_mesh(self.device.type)
        sub = self.dims.submesh
        self.cfg_group = sub("dp_shard").get_group() if cfg.parallel.cfg > 1 else None
        self.cfg_rank = sub("dp_shard").get_local_rank() if self.cfg_group is not None else 0  # 0 uncond, 1 cond
        self.replica_group = sub("fsdp").get_group() if world > self.replicas else None
        self.replica_rank = sub("dp_replicate").get_local_rank() if self.replicas > 1 else 0
        self.is_leader = sub("fsdp") is None or sub("fsdp").get_local_rank() == 0

        # 2. prompts, model, geometry (every rank, before any collective below)
        self.family = get_family(cfg.model.family)
        self.facts = pipeline_facts(self.family)
        # the loop runs in the pipeline's latent layout: stochastic samplers (DPM) then draw the same step noise
        self.layout = self.facts.noise_layout
        self.items: list[PromptItem] = read_prompts(cfg.prompt, cfg.prompt_file, cfg.negative_prompt, cfg.seed)
        m = cfg.model
        self.dtype = _DTYPES[m.dtype]
        self.vae_dir = _component_dir(m.vae, m.pretrained, "vae", "VAE")
        _component_dir(m.text_encoder, m.pretrained, "text_encoder", "text encoder")  # checked here, loaded in 5.
        self.text_dir = Path(m.text_encoder or m.pretrained)  # TextEncoder finds tokenizer/ and text_encoder/ itself
        if m.lora is not None and not (Path(m.lora) / "pytorch_lora_weights.safetensors").is_file():
            raise SampleError(f"model.lora {m.lora!r} holds no pytorch_lora_weights.safetensors")
        torch.manual_seed(m.init_seed)  # random init must equal the training run's (LoRA checkpoints hold no base)
        model = self.family.load(m.pretrained, m.flavor, dtype=self.dtype)
        self.vae_config = json.loads((self.vae_dir / "config.json").read_text())
        self.geometry = resolve_geometry(cfg, self.family, model.config, self.vae_config)
        key = self.facts.text_length_key
        self.text_length = cfg.max_text_length or getattr(model.config, key, None)
        if not self.text_length:
            raise SampleError(f"set max_text_length: the transformer config has no {key!r}")
        self.steps = cfg.steps or self.facts.steps
        self.guidance = _guidance(cfg)
        for module in cfg.imports:
            importlib.import_module(module)
        sched, sched_sampler = scheduler_config(self.family, m.flavor, m.pretrained)
        self.scheduler_config = {**sched, **cfg.scheduler_overrides}
        self.sampler_name = cfg.sampler or sched_sampler or self.facts.sampler
        build_sampler(self.sampler_name, cfg.sampler_args, self._sampler_ctx(0))  # fail now on a bad name / args

        # 3. trained weights
        self.checkpoint = resolve_checkpoint(m.checkpoint) if m.checkpoint else None
        if self.checkpoint is not None:
            load_training_checkpoint(model, self.checkpoint, m.train_config)
        if m.lora is not None:
            # weight_name is explicit: without it diffusers 0.42 looks for a pickled .bin in a local folder
            model.load_lora_adapter(m.lora, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
            model.fuse_lora(lora_scale=m.lora_scale)
            model.unload_lora()

        # 4. sequence parallel (processors also run with SP off, through fastpost's attention backends)
        model = model.to(self.device).eval().requires_grad_(False)
        self.family.apply_sequence_parallel(model, self.dims, m.attention_backend)
        self.model = model

        # 5. prompt embeddings, identical everywhere
        self.cond, self.uncond = self._encode_prompts()
        self.vae = None

    # ---- text ----------------------------------------------------------------------------------------------------
    def _encode_prompts(self):
        """Rank 0 encodes every prompt (and negative prompt), frees the encoder, broadcasts [N, T, D] / [N, T]."""
        use_cfg = self.guidance > 1
        tensors: list[torch.Tensor] = []
        if self.rank == 0:
            from fastpost.data.text import TextEncoder

            enc = TextEncoder.from_pretrained(self.text_dir, family=self.family.name, device=self.device,
                                              dtype=self.dtype)
            tensors = list(enc.encode([it.prompt for it in self.items], self.text_length))
            if use_cfg:
                tensors += list(enc.encode([it.negative_prompt for it in self.items], self.text_length))
            del enc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if dist.is_initialized():
            tensors = [_broadcast(tensors[i] if self.rank == 0 else None, None, self.device)
                       for i in range(4 if use_cfg else 2)]
        cond = (tensors[0], tensors[1])
        return cond, ((tensors[2], tensors[3]) if use_cfg else None)

    # ---- the loop ------------------------------------------------------------------------------------------------
    def _sampler_ctx(self, seed: int) -> SamplerContext:
        return SamplerContext(self.family, dict(self.scheduler_config), torch.Generator("cpu").manual_seed(seed))

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        """Drawn with the same generator call and layout as the family's diffusers pipeline (same seed, same
        noise), in that layout (`self.layout`), identical on every rank of the replica (broadcast from its rank 0)."""
        b, c, f, h, w = self.geometry.latent_shape
        shape = (b, f, c, h, w) if self.layout == "BFCHW" else (b, c, f, h, w)
        noise = torch.randn(shape, generator=generator).to(self.device)
        if self.replica_group is not None:
            dist.broadcast(noise, group=self.replica_group, group_src=0)
        return noise

    def _bcfhw(self, x: torch.Tensor) -> torch.Tensor:
        """Pipeline layout <-> BCFHW (family.predict's layout); a swap of dims 1 and 2, so its own inverse."""
        return x.permute(0, 2, 1, 3, 4) if self.layout == "BFCHW" else x

    def _predict(self, latents, t, embeds, mask) -> torch.Tensor:
        x = self._bcfhw(latents).to(self.dtype)
        return self._bcfhw(self.family.predict(self.model, x, t.expand(x.shape[0]), embeds, mask).float())

    def _guided(self, latents: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        if uncond is None:
            return self._predict(latents, t, *cond)
        if self.cfg_group is None and self.cfg.cfg_batched:  # both halves in one batch, as the diffusers pipelines
            out = self._predict(torch.cat([latents, latents]), t, torch.cat([uncond[0], cond[0]]),
                                torch.cat([uncond[1], cond[1]]))
            out_uncond, out_cond = out.chunk(2)
        elif self.cfg_group is None:
            out_uncond, out_cond = self._predict(latents, t, *uncond), self._predict(latents, t, *cond)
        else:  # CFG parallel: this rank group computes one half; one all-gather per step brings the other
            mine = self._predict(latents, t, *(cond if self.cfg_rank == 1 else uncond)).contiguous()
            halves = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(halves, mine, group=self.cfg_group)
            out_uncond, out_cond = halves
        g = guidance_at(self.guidance, self.cfg.dynamic_cfg, t, self.steps)
        return out_uncond + g * (out_cond - out_uncond)

    @torch.no_grad()
    def generate(self, index: int) -> torch.Tensor:
        """Final latents (BCFHW, fp32, with any pipeline padding frames) of prompt `index`; collective over the
        replica that owns it. Latents stay fp32 between steps (only the model sees self.dtype) and are kept in the
        pipeline's layout, which samplers see."""
        item = self.items[index]
        ctx = self._sampler_ctx(item.seed)
        sampler = build_sampler(self.sampler_name, self.cfg.sampler_args, ctx)
        latents = self.initial_noise(ctx.generator) * sampler.init_noise_sigma
        cond = tuple(x[index:index + 1].to(self.device) for x in self.cond)
        uncond = None if self.uncond is None else tuple(x[index:index + 1].to(self.device) for x in self.uncond)
        timesteps = sampler.set_timesteps(self.steps, self.device)
        bar = Progress(len(timesteps), f"video {index}", self.cfg.progress_bar and self.rank == 0)
        try:
            for i, t in enumerate(timesteps):
                pred = self._guided(latents, t, cond, uncond)
                latents = sampler.step(pred, i, t, latents).float()
                bar.update()
        finally:
            bar.close()
        return self._bcfhw(latents).contiguous()

    # ---- decode and write ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor):
        """uint8 frames [B, F, H, W, 3]; VAE loaded on first use (replica leaders only)."""
        from fastpost.data.preprocess import denormalize_latents, load_vae

        if self.vae is None:
            self.vae = load_vae(self.vae_dir, device=self.device, dtype=self.dtype)
            if self.cfg.vae_tiling:
                self.vae.enable_tiling()
        z = latents_BCFHW[:, :, self.geometry.pad_frames:]
        z = denormalize_latents(self.vae, z.to(self.vae.dtype))
        return to_uint8_frames(self.vae.decode(z, return_dict=False)[0])

    def metadata(self, index: int, frames, timings: dict[str, float]) -> dict[str, Any]:
        it, g, cfg = self.items[index], self.geometry, self.cfg
        return {
            "prompt": it.prompt, "negative_prompt": it.negative_prompt, "seed": it.seed, "steps": self.steps,
            "guidance_scale": self.guidance, "dynamic_cfg": cfg.dynamic_cfg, "sampler": self.sampler_name,
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
        for index in range(self.replica_rank, len(self.items), self.replicas):
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


def _broadcast(t: torch.Tensor | None, group, device: torch.device) -> torch.Tensor:
    """A tensor from rank 0 of `group` (None: the world) to all its ranks; the others pass None."""
    src = dist.get_rank(group) == 0 if group is not None else dist.get_rank() == 0
    meta = [(tuple(t.shape), t.dtype) if src else None]
    dist.broadcast_object_list(meta, group=group, group_src=0)
    shape, dtype = meta[0]
    buf = t.to(device).contiguous() if src else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, group=group, group_src=0)
    return buf


# ---- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> SampleConfig:
    p = argparse.ArgumentParser(prog="fastpost sample", description="Sample videos (torchrun-compatible)")
    p.add_argument("--config", default=None, help="job file, e.g. configs/cogvideox/sample_debug.yaml")
    p.add_argument("--prompt", default=None, help="one prompt (= prompt=...)")
    p.add_argument("--prompt-file", default=None, help="text file, one prompt per line, or .jsonl (= prompt_file)")
    p.add_argument("--output-dir", default=None, help="= output_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=20 parallel.ulysses=2")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    cfg = load_config(SampleConfig, args.config, overrides)
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
            init_distributed()
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
