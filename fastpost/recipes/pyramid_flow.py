"""Pyramidal flow matching (Jin et al. 2024) for the `pyramid` model family; the math is in
fastpost/models/pyramid/pyramid.py and docs/pyramid.md. Per sample, drawn from the step's generator only (so the
ranks of an SP group, which share it, build the same sequence):

    k ~ Categorical(stage_weights)                     spatial stage (resolution 1/2^(K-1-k))
    u ~ U{0 .. units-1}                                 current autoregressive unit (unit 0 = first frame)
    lam ~ U(0, 1) (or logit-normal),  sigma = sigma_end_k + lam (sigma_start_k - sigma_end_k)
    x_sigma = end_k + lam (start_k - end_k),           target v = (start_k - end_k) / (sigma_start_k - sigma_end_k)
    history: units j < u, unit u-i at stage max(k+1-i, 0) (temporal pyramid), clean latents corrupted as
             (1 - sigma_h) h + sigma_h n,  sigma_h ~ U(0, corrupt_ratio)
    c_b = the empty prompt (zero embeddings, all-false mask) with probability caption_dropout, else the prompt
    loss = mean_b || v_theta([history_b ; x_sigma,b], 1000 sigma_b, c_b)[current unit] - v_b ||^2

Only the current unit is supervised; the history is context under the block-causal mask. With
temporal_pyramid=False the whole clip is one unit (full-sequence pyramidal flow matching, no history). Samples of a
batch get different stages and units, hence sequences of different lengths and resolutions: they are packed into
one right-padded batch (padding masked out of attention) and run in a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastpost.models.pyramid import forward_packed
from fastpost.models.pyramid.packing import Segment, pack, pad_batch, unpack_segment
from fastpost.models.pyramid.pyramid import (
    PAPER_STAGE_RANGE, StageSchedule, down, frame_units, history_stages, interpolate, stage_endpoints, velocity,
)
from fastpost.recipes import Recipe, RecipeContext, Trainable


@dataclass
class PyramidFlowConfig:
    stage_range: tuple[float, ...] = PAPER_STAGE_RANGE  # K + 1 stage boundaries in tau = 1 - sigma (paper: thirds)
    stage_weights: tuple[float, ...] | None = None  # how often each stage is trained; None: equally often
    gamma: float = 1.0 / 3.0  # block-noise correlation of the renoise correction (paper: 1/3)
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # lam within the stage window
    logit_mean: float = 0.0
    logit_std: float = 1.0
    temporal_pyramid: bool = True  # autoregressive units with a compressed history; False: whole clip at once
    frame_per_unit: int = 1  # latent frames per unit after the first-frame unit
    max_history_units: int | None = None  # keep only the newest history units (None: all)
    corrupt_ratio: float = 1.0 / 3.0  # history noise level sigma_h ~ U(0, corrupt_ratio)
    caption_dropout: float = 0.0  # train the empty prompt (zero embeddings, all-false mask) for CFG sampling

    def schedule(self) -> StageSchedule:
        return StageSchedule(tuple(self.stage_range), self.gamma)


@dataclass
class SampleDraw:
    """The per-sample random choices of one batch (all from the step's generator)."""

    stage_B: torch.Tensor
    unit_B: torch.Tensor
    lam_B: torch.Tensor
    sigma_hist_B: torch.Tensor
    drop_text_B: torch.Tensor  # bool: this sample sees the empty prompt


class PyramidFlow(Recipe):
    Config = PyramidFlowConfig

    def __init__(self, cfg: PyramidFlowConfig, ctx: RecipeContext):
        super().__init__(cfg, ctx)
        if ctx.family.name != "pyramid":
            raise ValueError(f"recipe pyramid_flow trains the 'pyramid' family (mixed-resolution token sequences), "
                             f"not {ctx.family.name!r}; use recipe: finetune for other families")
        self.model = ctx.build(ctx.spec)
        self.sched = cfg.schedule()
        k = self.sched.num_stages
        weights = cfg.stage_weights or (1.0,) * k
        if len(weights) != k or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"stage_weights must be {k} non-negative numbers, not all zero; got {list(weights)}")
        self.stage_probs = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        for name in ("corrupt_ratio", "caption_dropout"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")

    def trainables(self):
        return {"model": Trainable(self.model)}

    def units(self, num_frames: int) -> list[tuple[int, int]]:
        return frame_units(num_frames, self.cfg.frame_per_unit) if self.cfg.temporal_pyramid else [(0, num_frames)]

    def draw(self, batch_size: int, n_units: int, g: torch.Generator) -> SampleDraw:
        stage = torch.multinomial(self.stage_probs, batch_size, replacement=True, generator=g)
        unit = torch.randint(n_units, (batch_size,), generator=g)
        if self.cfg.timestep_sampling == "logit_normal":
            lam = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(batch_size, generator=g))
        else:
            lam = torch.rand(batch_size, generator=g)
        sigma_hist = torch.rand(batch_size, generator=g) * self.cfg.corrupt_ratio
        drop = torch.rand(batch_size, generator=g) < self.cfg.caption_dropout
        return SampleDraw(stage, unit, lam.double(), sigma_hist, drop)

    def sample_sequence(self, x0_1CFHW: torch.Tensor, units: list[tuple[int, int]], k: int, u: int, lam: float,
                        sigma_hist: float, g: torch.Generator):
        """(segments [history..., x_sigma], sigma, target velocity) for one sample."""
        sched, device = self.sched, x0_1CFHW.device
        f0, f1 = units[u]
        x_unit = x0_1CFHW[:, :, f0:f1]
        noise = torch.randn(x_unit.shape, generator=g).to(device)
        s0, s1 = sched.window(k)
        start, end = stage_endpoints(x_unit, noise, k, sched)
        sigma = s1 + lam * (s0 - s1)
        x_sigma = interpolate(start, end, torch.tensor(sigma, dtype=torch.float64), s0, s1).float()
        segments = []
        for j, stage_j in history_stages(k, u, self.cfg.max_history_units):
            h0, h1 = units[u - j]
            h = down(x0_1CFHW[:, :, h0:h1], sched.level(stage_j))
            h = (1.0 - sigma_hist) * h + sigma_hist * torch.randn(h.shape, generator=g).to(device)
            segments.append(Segment(h, h0, sched.level(stage_j)))
        segments.append(Segment(x_sigma, f0, sched.level(k)))
        return segments, sigma, velocity(start, end, s0, s1)

    def loss(self, batch, generator, phase="train"):
        x0 = batch["latents"].float()
        embeds, mask = batch["prompt_embeds"], batch.get("prompt_attention_mask")
        model = self.model
        p = model.config.patch_size
        b, _, frames, height, width = x0.shape
        mult = p * 2 ** (self.sched.num_stages - 1)
        if height % mult or width % mult:
            raise ValueError(f"latent {height}x{width} must be divisible by patch_size * 2^(stages-1) = {mult} "
                             f"(every pyramid stage is patchified)")
        units = self.units(frames)
        d = self.draw(b, len(units), generator)
        if bool(d.drop_text_B.any()):
            keep = ~d.drop_text_B.to(embeds.device)
            mask = (torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None
                    else mask.bool()) & keep[:, None]
            embeds = embeds * keep[:, None, None].to(embeds.dtype)
        seqs, sigmas, targets = [], [], []
        for i in range(b):
            segments, sigma, target = self.sample_sequence(x0[i:i + 1], units, int(d.stage_B[i]), int(d.unit_B[i]),
                                                           float(d.lam_B[i]), float(d.sigma_hist_B[i]), generator)
            seqs.append(pack(segments, p))
            sigmas.append(sigma)
            targets.append(target)
        packed = pad_batch(seqs)
        sigma_B = torch.tensor(sigmas, dtype=torch.float32, device=x0.device)
        out = forward_packed(model, packed, 1000.0 * sigma_B, embeds, mask)
        preds = unpack_segment(out, packed, -1, p)  # the current unit of every sample, at its own resolution
        per_sample = torch.stack([((pr.float() - tg) ** 2).mean() for pr, tg in zip(preds, targets)])
        loss = per_sample.mean()
        return loss, {"stage_mean": d.stage_B.float().mean(), "sigma_mean": sigma_B.mean(),
                      "unit_mean": d.unit_B.float().mean(), "seq_len": float(packed.tokens.shape[1])}


RECIPE = PyramidFlow
