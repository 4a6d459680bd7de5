"""The denoiser: family.predict() in the pipeline's latent layout, with a classifier-free-guidance strategy.

CFG strategies (the same numbers, different memory / communication):
  batched      uncond and cond in one batch of 2 (as the diffusers pipelines)
  sequential   two calls of batch 1: half the activation memory, bitwise the per-half computation CFG parallel does
  cfg-parallel two rank groups compute one half each; one all-gather per step brings the other half
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

CfgStrategy = Literal["batched", "sequential", "parallel"]


def guidance_at(scale: float, dynamic: bool, timestep: torch.Tensor, num_steps: int) -> float:
    """The guidance weight of one step. dynamic: CogVideoXPipeline's `use_dynamic_cfg` formula, reproduced as
    written there (it mixes DDPM timesteps with the step count; e.g. 50 steps ramps 1 -> 1 + scale)."""
    if not dynamic:
        return scale
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - timestep.item()) / num_steps) ** 5.0)) / 2)


@dataclass(frozen=True)
class LowNoiseExpert:
    """The second expert of a two-expert pipeline (diffusers' transformer_2 + boundary_ratio, Wan 2.2 A14B): it
    denoises the timesteps below boundary_timestep = boundary_ratio * num_train_timesteps, with its own guidance."""

    model: torch.nn.Module
    boundary_timestep: float
    guidance: float


class Denoiser:
    """Guided predictions for the sampler loop. Latents arrive and leave in the pipeline layout (`layout`: BFCHW
    or BCFHW) in fp32; only the model sees `dtype`."""

    def __init__(self, family, model: torch.nn.Module, dtype: torch.dtype, layout: str, guidance: float,
                 dynamic_cfg: bool, steps: int, strategy: CfgStrategy, cfg_group=None, cfg_rank: int = 0,
                 low_noise: "LowNoiseExpert | None" = None):
        if strategy == "parallel" and cfg_group is None:
            raise ValueError("the cfg-parallel strategy needs the CFG process group")
        self.family, self.model, self.dtype, self.layout = family, model, dtype, layout
        self.guidance, self.dynamic_cfg, self.steps = guidance, dynamic_cfg, steps
        self.strategy, self.cfg_group, self.cfg_rank = strategy, cfg_group, cfg_rank
        self.low_noise = low_noise

    def _expert(self, t: torch.Tensor) -> tuple[torch.nn.Module, float]:
        """(model, guidance scale) of timestep t: a two-expert pipeline (Wan 2.2 A14B) hands t below the boundary
        to its low-noise expert (transformer_2), as WanPipeline does."""
        if self.low_noise is not None and t.item() < self.low_noise.boundary_timestep:
            return self.low_noise.model, self.low_noise.guidance
        return self.model, self.guidance

    def to_bcfhw(self, x: torch.Tensor) -> torch.Tensor:
        """Pipeline layout <-> BCFHW (family.predict's layout); a swap of dims 1 and 2, so its own inverse."""
        return x.permute(0, 2, 1, 3, 4) if self.layout == "BFCHW" else x

    def predict(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor):
        x = self.to_bcfhw(latents).to(self.dtype)
        model = self._expert(t)[0]
        return self.to_bcfhw(self.family.predict(model, x, t.expand(x.shape[0]), embeds, mask).float())

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        if uncond is None:
            return self.predict(latents, t, *cond)
        if self.strategy == "batched":
            out = self.predict(torch.cat([latents, latents]), t, torch.cat([uncond[0], cond[0]]),
                               torch.cat([uncond[1], cond[1]]))
            out_uncond, out_cond = out.chunk(2)
        elif self.strategy == "sequential":
            out_uncond, out_cond = self.predict(latents, t, *uncond), self.predict(latents, t, *cond)
        else:
            mine = self.predict(latents, t, *(cond if self.cfg_rank == 1 else uncond)).contiguous()
            halves = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(halves, mine, group=self.cfg_group)
            out_uncond, out_cond = halves
        g = guidance_at(self._expert(t)[1], self.dynamic_cfg, t, self.steps)
        return out_uncond + g * (out_cond - out_uncond)
