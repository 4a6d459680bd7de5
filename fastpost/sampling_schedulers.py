"""Samplers for `fastpost.sampling`: the plug-in interface, the diffusers schedulers each family's pipeline uses,
and the per-family facts of those pipelines that the sampler reproduces.

The plug-in interface (everything the denoising loop touches):

    class Sampler(Protocol):
        init_noise_sigma: float                          # the initial Gaussian noise is multiplied by this
        def set_timesteps(self, num_steps, device) -> Tensor   # model timesteps in loop order, in the family's
                                                               # predict() convention (DDPM t for v-prediction,
                                                               # 1000 * sigma for flow matching)
        def step(self, model_output, index, timestep, latents) -> Tensor  # next latents (fp32)

`model_output` is the guided family.predict() output in fp32. Both tensors are in the family pipeline's latent
layout (`PipelineFacts.noise_layout`: BFCHW for CogVideoX, BCFHW otherwise), so a sampler that draws noise
(CogVideoXDPMScheduler) draws exactly what diffusers draws for the same seed. A sampler is built fresh for every
video (schedulers keep state: DPM's previous x0 estimate, Euler's step index) by a factory registered with
`register_sampler(name, ConfigCls)`; `sampler_args` in the job file is parsed strictly into ConfigCls. A
few-step sampler (e.g. a distillation recipe's multi-phase one) registers itself the same way (its module listed
in the job's `imports`) and is picked with `sampler=<name>`; it needs no change to the loop. Every rank runs the
sampler on identical inputs, and any noise it draws must come from `ctx.generator` (a CPU generator seeded per
video, identical on every rank), so ranks stay bit-identical without communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch

from fastpost.config import from_dict


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


def linear_quadratic_schedule(num_steps: int, threshold_noise: float, linear_steps: int | None = None) -> list[float]:
    """Mochi's sigmas (1 -> ~0): linear from 1 down to 1 - threshold_noise over the first `linear_steps`, then a
    quadratic that reaches 0 one step past the end and joins the line with matching slope."""
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 0 < linear_steps < num_steps:
        raise ValueError(f"the linear-quadratic sigma schedule needs 0 < linear_steps < steps (steps >= 2), got "
                         f"steps={num_steps}, linear_steps={linear_steps}")
    quadratic_steps = num_steps - linear_steps
    # coefficients of q(i) = a i^2 + b i + c on i in [linear_steps, num_steps): continuous with the line at
    # linear_steps, and reaching 1 (i.e. sigma 0) at i = num_steps
    gap = linear_steps - threshold_noise * num_steps
    a = gap / (linear_steps * quadratic_steps ** 2)
    b = threshold_noise / linear_steps - 2 * gap / quadratic_steps ** 2
    c = a * linear_steps ** 2
    ramp = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    ramp += [a * i ** 2 + b * i + c for i in range(linear_steps, num_steps)]
    return [1.0 - x for x in ramp]


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
            sigmas = linear_quadratic_schedule(num_steps, self.cfg.threshold_noise, self.cfg.linear_steps)
        self.scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def step(self, model_output, index, timestep, latents):
        return self.scheduler.step(model_output.float(), timestep, latents.float(), generator=self.generator,
                                   return_dict=False)[0]


register_sampler("flow_euler", FlowEulerConfig)(FlowEulerSampler)


# ---- classifier-free guidance schedules ------------------------------------------------------------------------
def guidance_at(scale: float, dynamic: bool, timestep: torch.Tensor, num_steps: int) -> float:
    """The guidance weight of one step. dynamic: CogVideoXPipeline's `use_dynamic_cfg` formula, reproduced as
    written there (it mixes DDPM timesteps with the step count; e.g. 50 steps ramps 1 -> 1 + scale)."""
    if not dynamic:
        return scale
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - timestep.item()) / num_steps) ** 5.0)) / 2)


# ---- what each family's diffusers pipeline does ------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineFacts:
    sampler: str  # default sampler
    noise_layout: Literal["BFCHW", "BCFHW"]  # layout of the pipeline's randn draw: same seed -> same noise
    text_length_key: str  # transformer config key of the prompt length the pipeline pads to
    fps: int
    steps: int
    guidance_scale: float
    size: tuple[int, int, int] | None  # (height, width, frames); None: transformer sample_* x VAE factors


PIPELINE_FACTS = {
    # CogVideoXPipeline: randn [B, F, C, H, W]; 226 tokens = max_text_seq_length; 8 fps; 50 steps, guidance 6
    "cogvideox": PipelineFacts("ddim", "BFCHW", "max_text_seq_length", 8, 50, 6.0, None),
    # MochiPipeline: randn [B, C, F, H, W]; 256 tokens; 30 fps; 64 steps, guidance 4.5, 480x848x19
    "mochi": PipelineFacts("flow_euler", "BCFHW", "max_sequence_length", 30, 64, 4.5, (480, 848, 19)),
}


def pipeline_facts(family) -> PipelineFacts:
    """The family's facts; a family without an entry gets defaults derived from its prediction type."""
    if family.name in PIPELINE_FACTS:
        return PIPELINE_FACTS[family.name]
    sampler = "ddim" if family.prediction_type == "v_prediction" else "flow_euler"
    return PipelineFacts(sampler, "BCFHW", "max_sequence_length", 16, 50, 5.0, None)
