"""Pyramidal sampling: autoregressive frame units, each generated coarse-to-fine with stage-wise Euler steps.

For each unit (unit 0 = the first latent frame, then frame_per_unit frames each):
    x = n ~ N(0, I) at the coarsest stage (sigma = 1)
    for stage k = 0 .. K-1:
        k > 0: x = alpha Up(x) + beta n', n' block-correlated (the renoise correction, pyramid.py): sigma jumps
               from sigma_end_{k-1} to sigma_start_k and the noise is white again
        Euler on the stage's grid sigma_0 = sigma_start_k > ... > sigma_steps = sigma_end_k:
               x <- x + (sigma_{i+1} - sigma_i) v(x, 1000 sigma_i | history at stage k, text)
    the unit's clean latent (sigma_end_{K-1} = 0, full resolution) joins the history
The history is the temporal pyramid of the generated units (newest at the current stage's resolution, older ones
coarser), clean, as in training without corruption. Classifier-free guidance uses `guidance_scale` for the first
frame and `video_guidance_scale` for later units; the unconditional branch is the empty prompt (all-false mask,
what the recipe's caption_dropout trains). Image-to-video: pass `first_frame` (a clean latent frame); sampling
starts at unit 1 with it as history.

Sequence parallel: run the same call on every rank of the SP group with the same generator seed (inputs are then
identical on every rank); the model splits the tokens internally (apply_sequence_parallel / parallelize).

The command line (latents in, latents out) is fastpost/sampling/pyramid.py: `python -m fastpost.sampling.pyramid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F

from fastpost.models.pyramid.packing import Segment, pack, unpack_segment
from fastpost.models.pyramid.pyramid import (
    PAPER_STAGE_RANGE, StageSchedule, block_noise, down, frame_units, history_stages, renoise, up,
)

# (current unit segment, history segments, lam, stage, guidance scale) -> the estimate of the schedule's target
# (target_scale * (start - end): d x / d sigma for fastpost's schedule), shaped like the current unit. lam runs
# from 1 (stage start) to 0 (stage end); the schedule maps it to sigma and to the model timestep.
VelocityFn = Callable[[Segment, list, float, int, float], torch.Tensor]


@dataclass
class PyramidSampleConfig:
    stage_range: tuple[float, ...] = PAPER_STAGE_RANGE  # must match training
    gamma: float = 1.0 / 3.0  # must match training
    steps_per_stage: tuple[int, ...] = (10, 10, 10)  # Euler steps of each stage, coarse to fine
    first_frame_steps: tuple[int, ...] | None = None  # of the first-frame unit (None: steps_per_stage)
    guidance_scale: float = 7.0  # the first-frame unit
    video_guidance_scale: float = 5.0  # later units; <= 1 disables CFG for them
    temporal_pyramid: bool = True  # False: the whole clip is one unit (full-sequence pyramidal sampling)
    frame_per_unit: int = 1
    max_history_units: int | None = None

    def schedule(self, schedule_class: type = StageSchedule) -> StageSchedule:
        """The family's conventions (ModelFamily.pyramid.schedule) on these stage boundaries."""
        return schedule_class(tuple(self.stage_range), self.gamma)


def _pad_text(e_BTD: torch.Tensor, m_BT: torch.Tensor, length: int):
    extra = length - e_BTD.shape[1]
    return F.pad(e_BTD, (0, 0, 0, extra)), F.pad(m_BT, (0, extra), value=False)


def model_velocity(model: nn.Module, prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None,
                   negative_embeds_BTD: torch.Tensor | None = None,
                   negative_mask_BT: torch.Tensor | None = None, *, spec=None, schedule: StageSchedule | None = None,
                   pooled_BD: torch.Tensor | None = None, negative_pooled_BD: torch.Tensor | None = None,
                   cfg_group=None, cfg_rank: int = 0) -> VelocityFn:
    """The model as a VelocityFn, with classifier-free guidance in one batch [uncond; cond] when guidance > 1.
    `spec` is the family's PyramidSpec (default: fastpost's own pyramid family), `schedule` its conventions (the
    model timestep of (stage, lam), positions, patch order). The default negative prompt is the empty prompt:
    zero embeddings, all-false mask (families with pooled text pass the encoding of "" or a negative prompt).
    cfg_group (2 ranks: 0 uncond, 1 cond): CFG parallel; each rank runs its half and one all-gather per step brings
    the other (the same numbers as the batched [uncond; cond] call)."""
    if spec is None:
        from fastpost.models.pyramid import FAMILY

        spec = FAMILY.pyramid
    schedule = schedule if schedule is not None else spec.schedule()
    p = spec.patch_size(model)
    b, t = prompt_embeds_BTD.shape[:2]
    mask = (torch.ones(b, t, dtype=torch.bool, device=prompt_embeds_BTD.device) if prompt_mask_BT is None
            else prompt_mask_BT.bool())
    neg = torch.zeros_like(prompt_embeds_BTD) if negative_embeds_BTD is None else negative_embeds_BTD
    neg_mask = (torch.zeros(b, neg.shape[1], dtype=torch.bool, device=neg.device) if negative_mask_BT is None
                else negative_mask_BT.bool())
    length = max(t, neg.shape[1])
    cond, cond_mask = _pad_text(prompt_embeds_BTD, mask, length)
    uncond, uncond_mask = _pad_text(neg, neg_mask, length)
    both, both_mask = torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])
    pooled_both = None
    if pooled_BD is not None:
        neg_pooled = torch.zeros_like(pooled_BD) if negative_pooled_BD is None else negative_pooled_BD
        pooled_both = torch.cat([neg_pooled.expand_as(pooled_BD), pooled_BD])

    def velocity(current: Segment, history: list, lam: float, stage: int, guidance: float) -> torch.Tensor:
        segments = [*history, current]
        guided = guidance > 1.0
        if guided and cfg_group is not None:  # CFG parallel: this rank's half, then the other by all-gather
            half = (uncond, uncond_mask, None if pooled_both is None else pooled_both[:b]) if cfg_rank == 0 else \
                (cond, cond_mask, pooled_BD)
            packed = pack(segments, p, schedule)
            t_B = torch.full((b,), float(schedule.model_timestep(stage, lam)), dtype=torch.float32,
                             device=packed.tokens.device)
            out = spec.forward(model, packed, t_B, {"prompt_embeds": half[0], "prompt_attention_mask": half[1],
                                                    "pooled_prompt_embeds": half[2]})
            mine = torch.cat(unpack_segment(out, packed, -1, p)).float().contiguous()
            halves = [torch.empty_like(mine) for _ in range(2)]
            torch.distributed.all_gather(halves, mine, group=cfg_group)
            return halves[0] + guidance * (halves[1] - halves[0])
        if guided:
            segments = [Segment(torch.cat([s.latents] * 2), s.frame_start, s.level) for s in segments]
        packed = pack(segments, p, schedule)
        n = packed.tokens.shape[0]
        t_B = torch.full((n,), float(schedule.model_timestep(stage, lam)), dtype=torch.float32,
                         device=packed.tokens.device)
        text = ({"prompt_embeds": both, "prompt_attention_mask": both_mask, "pooled_prompt_embeds": pooled_both}
                if guided else {"prompt_embeds": cond, "prompt_attention_mask": cond_mask,
                                "pooled_prompt_embeds": pooled_BD})
        out = spec.forward(model, packed, t_B, text)
        v = torch.cat(unpack_segment(out, packed, -1, p)).float()
        if not guided:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return velocity


@torch.no_grad()
def sample(velocity_fn: VelocityFn, shape_BCFHW: tuple[int, ...], cfg: PyramidSampleConfig,
           generator: torch.Generator, first_frame_BC1HW: torch.Tensor | None = None,
           device: torch.device | str = "cpu", schedule: StageSchedule | None = None) -> torch.Tensor:
    """Latents [B, C, F, H, W] (full resolution). Noise comes only from `generator` (CPU), so every SP rank that
    passes the same seed runs the same loop. `schedule`: the family's conventions (default: cfg.schedule())."""
    sched = schedule if schedule is not None else cfg.schedule()
    k_stages = sched.num_stages
    for name in ("steps_per_stage", "first_frame_steps"):
        steps = getattr(cfg, name)
        if steps is not None and len(steps) != k_stages:
            raise ValueError(f"{name} has {len(steps)} entries for {k_stages} stages")
    b, c, frames, height, width = shape_BCFHW
    coarsest = 2 ** sched.level(0)
    if height % coarsest or width % coarsest:
        raise ValueError(f"latent {height}x{width} must be divisible by 2^(stages-1) = {coarsest}")
    units = frame_units(frames, cfg.frame_per_unit) if cfg.temporal_pyramid else [(0, frames)]
    generated: list[torch.Tensor] = []  # clean full-resolution latents of the finished units
    if first_frame_BC1HW is not None:
        if not cfg.temporal_pyramid:
            raise ValueError("image-to-video conditions the later units on the first frame: needs temporal_pyramid")
        if tuple(first_frame_BC1HW.shape) != (b, c, 1, height, width):
            raise ValueError(f"first_frame must be {(b, c, 1, height, width)}, got {tuple(first_frame_BC1HW.shape)}")
        generated.append(first_frame_BC1HW.float().to(device))

    def noise(shape, block: bool) -> torch.Tensor:
        n = block_noise(shape, sched.gamma, generator) if block else torch.randn(shape, generator=generator)
        return n.to(device)

    for u in range(len(generated), len(units)):
        f0, f1 = units[u]
        guidance = cfg.guidance_scale if u == 0 else cfg.video_guidance_scale
        x = noise((b, c, f1 - f0, height // coarsest, width // coarsest), block=False)
        for k in range(k_stages):
            level = sched.level(k)
            if k > 0:
                x = renoise(x, sched.sigma_end(k - 1), sched.gamma, noise(tuple(up(x).shape), block=True))
            history = [Segment(down(generated[u - j], sched.level(stage_j)), units[u - j][0], sched.level(stage_j))
                       for j, stage_j in history_stages(k, u, cfg.max_history_units)]
            steps = cfg.first_frame_steps if u == 0 and cfg.first_frame_steps is not None else cfg.steps_per_stage
            lams = sched.lam_grid(k, steps[k])
            for lam, lam_next in zip(lams[:-1], lams[1:]):
                v = velocity_fn(Segment(x, f0, level), history, lam, k, guidance)
                x = x + sched.euler_step(k, lam, lam_next) * v.float()
        generated.append(x)
    return torch.cat(generated, dim=2)
