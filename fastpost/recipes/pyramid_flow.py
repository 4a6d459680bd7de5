"""Pyramidal flow matching (Jin et al. 2024) for the `pyramid` model family; the math is in
fastpost/models/pyramid/pyramid.py and docs/pyramid.md. Per sample, drawn from the step's generator only (so the
ranks of an SP group, which share it, build the same sequence):

    k ~ Categorical(stage_weights)                     spatial stage (resolution 1/2^(K-1-k))
    u ~ U{0 .. units-1}                                 current autoregressive unit (unit 0 = first frame)
    lam ~ U(0, 1) (or logit-normal; the family's schedule may discretise it), sigma = sigma_end_k + lam (...)
    x_sigma = end_k + lam (start_k - end_k),           target v = target_scale_k (start_k - end_k)
    history: units j < u, unit u-i at stage max(k+1-i, 0) (temporal pyramid), clean latents corrupted as
             (1 - sigma_h) h + sigma_h n,  sigma_h ~ U(0, corrupt_ratio)
    c_b = the empty prompt (zero embeddings, all-false mask) with probability caption_dropout, else the prompt
    loss = mean_b || v_theta([history_b ; x_sigma,b], t_k(lam_b), c_b)[current unit] - v_b ||^2

The conventions (t_k, target_scale_k, the windows, positions, the null prompt, stage weights) are the family's
schedule (ModelFamily.pyramid): fastpost's own model has t = 1000 sigma and target_scale = 1 / (sigma_start -
sigma_end) (d x / d sigma); pyramid_flux has the released miniflux's (models/pyramid_flux.py MinifluxSchedule).

Only the current unit is supervised; the history is context under the block-causal mask. With
temporal_pyramid=False the whole clip is one unit (full-sequence pyramidal flow matching, no history). Samples of a
batch get different stages and units, hence sequences of different lengths and resolutions: they are packed into
one right-padded batch (padding masked out of attention) and run in a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastpost.data.shards import read_empty_prompt
from fastpost.models.pyramid.packing import Segment, pack, pad_batch, unpack_segment
from fastpost.models.pyramid.pyramid import PAPER_STAGE_RANGE, down, frame_units, history_stages, stage_endpoints
from fastpost.recipes import Recipe, RecipeContext, Trainable


@dataclass
class PyramidFlowConfig:
    stage_range: tuple[float, ...] = PAPER_STAGE_RANGE  # K + 1 stage boundaries in tau = 1 - sigma (paper: thirds)
    stage_weights: tuple[float, ...] | None = None  # how often each stage is trained; None: the family's default
    gamma: float = 1.0 / 3.0  # block-noise correlation of the renoise correction (paper: 1/3)
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # lam within the stage window
    logit_mean: float = 0.0
    logit_std: float = 1.0
    temporal_pyramid: bool = True  # autoregressive units with a compressed history; False: whole clip at once
    frame_per_unit: int = 1  # latent frames per unit after the first-frame unit
    max_history_units: int | None = None  # keep only the newest history units (None: all)
    corrupt_ratio: float = 1.0 / 3.0  # history noise level sigma_h ~ U(0, corrupt_ratio)
    caption_dropout: float = 0.0  # train the empty prompt for CFG sampling (the family's null text)


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
        self.spec = ctx.family.pyramid
        if self.spec is None:
            raise ValueError(f"recipe pyramid_flow trains pyramidal families (ModelFamily.pyramid: 'pyramid', "
                             f"'pyramid_flux'), not {ctx.family.name!r}; use recipe: finetune for other families")
        self.model = ctx.build(ctx.spec)
        # the family's conventions (timesteps, targets, positions, null text), on the configured stage boundaries
        self.sched = self.spec.schedule(tuple(cfg.stage_range), cfg.gamma)
        k = self.sched.num_stages
        weights = cfg.stage_weights or self.sched.default_stage_weights or (1.0,) * k
        if len(weights) != k or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"stage_weights must be {k} non-negative numbers, not all zero; got {list(weights)}")
        self.stage_probs = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        for name in ("corrupt_ratio", "caption_dropout"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
        self.empty = None  # the encoding of "" (family null_text "empty_prompt"): read from the shards
        if cfg.caption_dropout > 0 and self.sched.null_text == "empty_prompt":
            root = getattr(getattr(ctx.train_cfg, "data", None), "path", None)
            if not root:
                raise ValueError("caption_dropout for this family drops to the stored encoding of \"\"; it needs "
                                 "data.path (a shard folder with empty_prompt.safetensors)")
            self.empty = read_empty_prompt(root, with_pooled=True)

    def trainables(self):
        return {"model": Trainable(self.model)}

    def units(self, num_frames: int) -> list[tuple[int, int]]:
        return frame_units(num_frames, self.cfg.frame_per_unit) if self.cfg.temporal_pyramid else [(0, num_frames)]

    def draw(self, batch_size: int, n_units: int, g: torch.Generator) -> SampleDraw:
        stage = torch.multinomial(self.stage_probs, batch_size, replacement=True, generator=g)
        unit = torch.randint(n_units, (batch_size,), generator=g)
        if self.cfg.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(batch_size, generator=g))
        else:
            u = torch.rand(batch_size, generator=g)
        sigma_hist = torch.rand(batch_size, generator=g) * self.cfg.corrupt_ratio
        drop = torch.rand(batch_size, generator=g) < self.cfg.caption_dropout
        return SampleDraw(stage, unit, self.sched.lam_from_uniform(u), sigma_hist, drop)

    def sample_sequence(self, x0_1CFHW: torch.Tensor, units: list[tuple[int, int]], k: int, u: int, lam: float,
                        sigma_hist: float, g: torch.Generator):
        """(segments [history..., x_lam], target) for one sample: x = end + lam (start - end) on the stage's
        straight path, target = target_scale * (start - end) (the family's convention)."""
        sched, device = self.sched, x0_1CFHW.device
        f0, f1 = units[u]
        x_unit = x0_1CFHW[:, :, f0:f1]
        noise = torch.randn(x_unit.shape, generator=g).to(device)
        start, end = stage_endpoints(x_unit, noise, k, sched)
        x_sigma = (end + lam * (start - end)).float()
        segments = []
        for j, stage_j in history_stages(k, u, self.cfg.max_history_units):
            h0, h1 = units[u - j]
            h = down(x0_1CFHW[:, :, h0:h1], sched.level(stage_j))
            h = (1.0 - sigma_hist) * h + sigma_hist * torch.randn(h.shape, generator=g).to(device)
            segments.append(Segment(h, h0, sched.level(stage_j)))
        segments.append(Segment(x_sigma, f0, sched.level(k)))
        return segments, sched.target_scale(k) * (start - end)

    def loss(self, batch, generator, phase="train"):
        x0 = batch["latents"].float()
        embeds, mask, pooled = batch["prompt_embeds"], batch.get("prompt_attention_mask"), \
            batch.get("pooled_prompt_embeds")
        model = self.model
        p = self.spec.patch_size(model)
        b, _, frames, height, width = x0.shape
        mult = p * 2 ** (self.sched.num_stages - 1)
        if height % mult or width % mult:
            raise ValueError(f"latent {height}x{width} must be divisible by patch_size * 2^(stages-1) = {mult} "
                             f"(every pyramid stage is patchified)")
        units = self.units(frames)
        d = self.draw(b, len(units), generator)
        if bool(d.drop_text_B.any()):
            embeds, mask, pooled = self.drop_text(d.drop_text_B, embeds, mask, pooled)
        seqs, times, sigmas, targets = [], [], [], []
        for i in range(b):
            k, lam = int(d.stage_B[i]), float(d.lam_B[i])
            segments, target = self.sample_sequence(x0[i:i + 1], units, k, int(d.unit_B[i]), lam,
                                                    float(d.sigma_hist_B[i]), generator)
            seqs.append(pack(segments, p, self.sched))
            times.append(self.sched.model_timestep(k, lam))
            sigmas.append(self.sched.sigma_of(k, lam))
            targets.append(target)
        packed = pad_batch(seqs)
        t_B = torch.tensor(times, dtype=torch.float32, device=x0.device)
        text = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}
        out = self.spec.forward(model, packed, t_B, text)
        preds = unpack_segment(out, packed, -1, p)  # the current unit of every sample, at its own resolution
        per_sample = torch.stack([((pr.float() - tg) ** 2).mean() for pr, tg in zip(preds, targets)])
        loss = per_sample.mean()
        return loss, {"stage_mean": d.stage_B.float().mean(), "sigma_mean": torch.tensor(sigmas).float().mean(),
                      "unit_mean": d.unit_B.float().mean(), "seq_len": float(packed.tokens.shape[1])}

    def drop_text(self, drop_B: torch.Tensor, embeds, mask, pooled):
        """The family's unconditional prompt where drop_B: zeros + all-false mask, or the stored encoding of ""."""
        drop = drop_B.to(embeds.device)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        if self.empty is None:  # fastpost's own: zero embeddings, all-false mask
            keep = ~drop
            return embeds * keep[:, None, None].to(embeds.dtype), mask & keep[:, None], pooled
        e_TD, m_T, p_D = self.empty
        if e_TD.shape != embeds.shape[1:] or (pooled is not None and p_D is not None and p_D.shape != pooled.shape[1:]):
            raise ValueError(f"the stored encoding of \"\" has shape {list(e_TD.shape)}, the batch's prompts "
                             f"{list(embeds.shape[1:])}: the shards were written with another text encoder")
        sel = drop[:, None, None]
        embeds = torch.where(sel, e_TD.to(embeds), embeds)
        mask = torch.where(drop[:, None], m_T.to(mask.device).bool(), mask)
        if pooled is not None:
            pooled = torch.where(drop[:, None], p_D.to(pooled), pooled)
        return embeds, mask, pooled


RECIPE = PyramidFlow
