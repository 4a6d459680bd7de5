"""Samplers for `fastpost.sampling`: the plug-in interface and registry, the diffusers schedulers the families'
pipelines use (DDIM / DPM for v-prediction, flow-match Euler, flow UniPC), the phased few-step sampler of a
consistency-distilled student (PCM, MCM) and the re-noising sampler of a DMD2 generator. Which one a job gets by
default is the family's (ModelFamily.default_sampler).

The plug-in interface (everything the denoising loop touches):

    class Sampler(Protocol):
        init_noise_sigma: float                          # the initial Gaussian noise is multiplied by this
        def set_timesteps(self, num_steps, device) -> Tensor   # model timesteps in loop order, in the family's
                                                               # predict() convention (DDPM t for v-prediction,
                                                               # 1000 * sigma for flow matching)
        def step(self, model_output, index, timestep, latents) -> Tensor  # next latents (fp32)

`model_output` is the guided family.predict() output in fp32. Both tensors are in the family pipeline's latent
layout (`family.pipeline_facts.noise_layout`: BFCHW for CogVideoX, BCFHW otherwise), so a sampler that draws noise
(CogVideoXDPMScheduler) draws exactly what diffusers draws for the same seed. A sampler is built fresh for every
video (schedulers keep state: DPM's previous x0 estimate, Euler's step index) by a factory registered with
`register_sampler(name, ConfigCls)`; `sampler_args` in the job file is parsed strictly into ConfigCls. A
few-step sampler of a user's own registers itself the same way (its module listed in the job's `imports`) and is
picked with `sampler=<name>`; it needs no change to the loop. Every rank runs the
sampler on identical inputs, and any noise it draws must come from `ctx.generator` (a CPU generator seeded per
video, identical on every rank), so ranks stay bit-identical without communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch

from fastpost.config import from_dict
from fastpost.noise import linear_quadratic_sigmas, make_grid, phase_edges


@runtime_checkable
class Sampler(Protocol):
    init_noise_sigma: float

    def set_timesteps(self, num_steps: int, device: torch.device | str) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, index: int, timestep: torch.Tensor,
             latents: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SamplerContext:
    family: Any  # fastpost.models.ModelFamily (its prediction_type says what predict() returns)
    scheduler_config: dict  # diffusers scheduler config (the flavor's, or the pipeline dir's) + overrides
    generator: torch.Generator | None = None  # CPU, seeded per video, identical on every rank


@dataclass(frozen=True)
class SamplerSpec:
    factory: Callable[[SamplerContext, Any], Sampler]
    config_cls: type


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(name: str, config_cls: type) -> Callable:
    """Decorator: `@register_sampler("name", NameConfig)` on `factory(ctx, cfg) -> Sampler`."""

    def deco(factory: Callable[[SamplerContext, Any], Sampler]) -> Callable:
        SAMPLERS[name] = SamplerSpec(factory, config_cls)
        return factory

    return deco


def build_sampler(name: str, args: dict, ctx: SamplerContext) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered: {sorted(SAMPLERS)}")
    spec = SAMPLERS[name]
    return spec.factory(ctx, from_dict(spec.config_cls, dict(args), where="sampler_args"))


def _require(ctx: SamplerContext, prediction_type: str, name: str) -> None:
    if ctx.family.prediction_type != prediction_type:
        raise ValueError(f"sampler {name!r} integrates {prediction_type} models, but family {ctx.family.name!r} "
                         f"predicts {ctx.family.prediction_type}; pick another sampler")


# ---- CogVideoX: v-prediction DDIM / DPM-solver (CogVideoXPipeline's two schedulers) -----------------------------
@dataclass
class DDIMConfig:
    eta: float = 0.0  # DDIM noise weight; 0 = deterministic (the pipeline default)


class CogVideoXDDIMSampler:
    def __init__(self, ctx: SamplerContext, cfg: DDIMConfig, scheduler_class: str = "CogVideoXDDIMScheduler"):
        import diffusers

        _require(ctx, "v_prediction", "ddim")
        self.scheduler = getattr(diffusers, scheduler_class).from_config(ctx.scheduler_config)
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)
        self.eta, self.generator = cfg.eta, ctx.generator

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        self.scheduler.set_timesteps(num_steps, device=device)
        return self.scheduler.timesteps

    def step(self, model_output, index, timestep, latents):
        return self.scheduler.step(model_output, timestep, latents, eta=self.eta, generator=self.generator,
                                   return_dict=False)[0]


class CogVideoXDPMSampler(CogVideoXDDIMSampler):
    """CogVideoXDPMScheduler: a second-order SDE solver; it draws fresh noise every step from ctx.generator."""

    def __init__(self, ctx: SamplerContext, cfg: DDIMConfig):
        super().__init__(ctx, cfg, "CogVideoXDPMScheduler")
        self.old_x0: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        self.timesteps = super().set_timesteps(num_steps, device)
        return self.timesteps

    def step(self, model_output, index, timestep, latents):
        # As CogVideoXPipeline: the "back" timestep it passes is the *previous* loop timestep.
        back = self.timesteps[index - 1] if index > 0 else None
        latents, self.old_x0 = self.scheduler.step(model_output, self.old_x0, timestep, back, latents, eta=self.eta,
                                                   generator=self.generator, return_dict=False)
        return latents


register_sampler("ddim", DDIMConfig)(CogVideoXDDIMSampler)
register_sampler("dpm", DDIMConfig)(CogVideoXDPMSampler)


# ---- flow matching: Euler on a sigma schedule (MochiPipeline's linear-quadratic one by default) ------------------
@dataclass
class FlowEulerConfig:
    sigma_schedule: Literal["linear_quadratic", "linear"] = "linear_quadratic"
    threshold_noise: float = 0.025  # MochiPipeline's constant
    linear_steps: int | None = None  # None: num_steps // 2, as MochiPipeline


class FlowEulerSampler:
    """FlowMatchEulerDiscreteScheduler in fastpost's flow convention (x_s = (1 - s) x0 + s noise, velocity
    noise - x0 at t = 1000 s). MochiPipeline runs the *inverted* scheduler on Mochi's raw output (x0 - noise at
    1000 (1 - s)); that is the same update, x + (s_next - s) (noise - x0), which family.predict translates."""

    def __init__(self, ctx: SamplerContext, cfg: FlowEulerConfig):
        from diffusers import FlowMatchEulerDiscreteScheduler

        _require(ctx, "flow_matching", "flow_euler")
        # invert_sigmas off whatever the config says: mochi-1-preview's scheduler_config.json sets it for
        # Mochi's own convention, which family.predict() already translates
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**ctx.scheduler_config, "invert_sigmas": False})
        self.cfg, self.generator = cfg, ctx.generator
        self.init_noise_sigma = 1.0  # x at s = 1 is pure noise (MochiPipeline does not scale it)

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        sigmas = None
        if self.cfg.sigma_schedule == "linear_quadratic":
            sigmas = linear_quadratic_sigmas(num_steps, self.cfg.threshold_noise, self.cfg.linear_steps)
        self.scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def step(self, model_output, index, timestep, latents):
        return self.scheduler.step(model_output.float(), timestep, latents.float(), generator=self.generator,
                                   return_dict=False)[0]


register_sampler("flow_euler", FlowEulerConfig)(FlowEulerSampler)


# ---- flow matching: UniPC on flow sigmas (WanPipeline's default scheduler) -------------------------------------------
@dataclass
class UniPCConfig:
    """No options of its own: the scheduler config (the checkpoint's, e.g. flow_shift, solver_order) is the truth;
    change it with the job's scheduler_overrides."""


class UniPCSampler:
    """diffusers' UniPCMultistepScheduler from the scheduler config, as WanPipeline runs it: with
    prediction_type=flow_prediction and use_flow_sigmas it integrates fastpost's flow convention directly (velocity
    noise - x0; its timesteps are int(1000 sigma), what the pipeline feeds the model)."""

    def __init__(self, ctx: SamplerContext, cfg: UniPCConfig):
        from diffusers import UniPCMultistepScheduler

        _require(ctx, "flow_matching", "unipc")
        self.scheduler = UniPCMultistepScheduler.from_config(ctx.scheduler_config)
        if self.scheduler.config.prediction_type != "flow_prediction" or not self.scheduler.config.use_flow_sigmas:
            raise ValueError("sampler 'unipc' needs a flow UniPC scheduler config (prediction_type: flow_prediction, "
                             "use_flow_sigmas: true), as Wan checkpoints ship; set them in scheduler_overrides")
        self.init_noise_sigma = 1.0  # WanPipeline starts from unscaled noise

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        self.scheduler.set_timesteps(num_steps, device=device)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def step(self, model_output, index, timestep, latents):
        return self.scheduler.step(model_output.float(), timestep, latents.float(), return_dict=False)[0]


register_sampler("unipc", UniPCConfig)(UniPCSampler)


# ---- a distilled student's few-step sampler (recipes/distill.py trains it) ------------------------------------------
@dataclass
class PhasedSamplerConfig:
    num_teacher_steps: int = 50  # the grid the student was distilled on (recipe_args.num_teacher_steps)
    phases: int = 4  # recipe_args.phases; `steps` may be any divisor of it (fewer jumps, each over whole phases)
    schedule: Literal["uniform", "linear_quadratic"] = "uniform"
    lq_threshold: float = 0.025
    lq_linear_steps: int | None = None


class PhasedSampler:
    """Deterministic multi-phase sampling: one DDIM jump from phase edge to phase edge (recipes/distill.py's
    phased_sample, on the same fastpost.noise grid)."""

    def __init__(self, ctx: SamplerContext, cfg: PhasedSamplerConfig):
        self.cfg = cfg
        self.grid = make_grid(ctx.family, None, cfg.num_teacher_steps, cfg.schedule, cfg.lq_threshold,
                              cfg.lq_linear_steps, scheduler_config=ctx.scheduler_config)
        self.init_noise_sigma = float(self.grid.b[0])
        self.edges = None

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        if num_steps < 1 or self.cfg.phases % num_steps:
            raise ValueError(f"the phased sampler of a {self.cfg.phases}-phase student runs a divisor of "
                             f"{self.cfg.phases} steps, got steps={num_steps}")
        self.edges = phase_edges(self.cfg.num_teacher_steps, self.cfg.phases)[:: self.cfg.phases // num_steps]
        t = self.grid.model_t[self.edges[:-1]]
        return (t.float() if self.grid.prediction_type == "flow_matching" else t).to(device)

    def step(self, model_output, index, timestep, latents):
        src = torch.full((latents.shape[0],), int(self.edges[index]))  # CPU indices into the CPU grid
        dst = torch.full((latents.shape[0],), int(self.edges[index + 1]))
        return self.grid.ddim(latents.double(), model_output.double(), src, dst).float()


register_sampler("phased", PhasedSamplerConfig)(PhasedSampler)


# ---- a DMD2 generator's few-step sampler (recipes/dmd2.py trains it) ------------------------------------------------
@dataclass
class DMDSamplerConfig:
    num_teacher_steps: int = 50  # recipe_args.num_teacher_steps: the grid the generator's steps sit on
    generator_steps: int = 4  # recipe_args.generator_steps; `steps` may be any divisor of it
    renoise: Literal["fresh", "ddim"] = "fresh"  # recipe_args.renoise: fresh noise between steps, or DDIM


class DMDSampler:
    """Predict the clean video, re-noise it to the next step's level with fresh noise from ctx.generator (or the
    DDIM step), repeat; the last step returns the clean estimate (recipes/dmd2.py's dmd_sample, same grid)."""

    def __init__(self, ctx: SamplerContext, cfg: DMDSamplerConfig):
        self.cfg, self.generator = cfg, ctx.generator
        self.grid = make_grid(ctx.family, None, cfg.num_teacher_steps, scheduler_config=ctx.scheduler_config)
        self.init_noise_sigma = float(self.grid.b[0])
        self.edges = None

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        if num_steps < 1 or self.cfg.generator_steps % num_steps:
            raise ValueError(f"the DMD sampler of a {self.cfg.generator_steps}-step generator runs a divisor of "
                             f"{self.cfg.generator_steps} steps, got steps={num_steps}")
        k = self.cfg.generator_steps
        self.edges = phase_edges(self.cfg.num_teacher_steps, k)[:: k // num_steps]
        t = self.grid.model_t[self.edges[:-1]]
        return (t.float() if self.grid.prediction_type == "flow_matching" else t).to(device)

    def step(self, model_output, index, timestep, latents):
        src = torch.full((latents.shape[0],), int(self.edges[index]))
        dst = torch.full((latents.shape[0],), int(self.edges[index + 1]))
        x, pred = latents.double(), model_output.double()
        if int(dst[0]) == self.grid.steps:  # the clean end: the generator's estimate itself
            return self.grid.estimates(x, pred, src)[0].float()
        noise = None if self.cfg.renoise == "ddim" else torch.randn(latents.shape, generator=self.generator,
                                                                     dtype=torch.float64)
        return self.grid.renoise(x, pred, src, dst, noise).float()


register_sampler("dmd", DMDSamplerConfig)(DMDSampler)
