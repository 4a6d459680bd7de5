"""Finetuning (full or LoRA) with the objective the model was pretrained with.

flow matching (Mochi):   x_s = (1 - s) x0 + s eps,           s ~ logit-normal (shifted)
                         loss = || v_theta(x_s, 1000 s, c) - (eps - x0) ||^2
v-prediction (CogVideoX): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,   t ~ U{0, ..., T-1}, a_t = alphas_cumprod[t]
                         loss = || v_theta(x_t, t, c) - (sqrt(a_t) eps - sqrt(1 - a_t) x0) ||^2
(diffusers' CogVideoX script minimises ||x0_hat - x0||^2 / (1 - a_t); substituting x0_hat = sqrt(a_t) x_t -
sqrt(1 - a_t) v_hat shows that is exactly the v-loss above.)

With learned_weighting (EDM2, Karras et al. 2024): a small net u(t) learns the log-variance of the loss at each
noise level, and the objective becomes  mean_i ( ||v_theta - target||^2_i / exp(u(t_i)) + u(t_i) ),
which balances noise levels automatically; u has its own optimizer ("weighting").

Two-expert models (Wan 2.2 A14B, model.expert=both): both experts train in one job, each with its own optimizer.
Each step draws one time s from the job's time distribution with a generator seeded by (seed, step), the same on
every rank, and that step trains only the expert owning s (high noise: s >= boundary_ratio, low noise: below).
So each step trains the high-noise expert with probability P(s >= boundary_ratio) under the time distribution and
the low-noise one otherwise, and the samples' times are that distribution conditioned on the expert's side: over
the run each expert sees exactly the times it would denoise in the pipeline, in their original proportions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpost.builder import expert_spec, pipeline_boundary_ratio
from fastpost.data.checks import objective_scheduler_config
from fastpost.data.shards import read_empty_prompt
from fastpost.noise import randn_on
from fastpost.recipes import Recipe, RecipeContext, Trainable


class CaptionDropout:
    """Replaces each sample's prompt by the encoding of "" with probability p, drawn from the batch generator (so
    SP peers and resumed runs drop the same samples). The "" encoding is the one preprocessing stored next to the
    shards (shards.EMPTY_PROMPT), read once at start-up so a folder without it fails before training."""

    def __init__(self, p: float, data_root: str | None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"recipe_args.caption_dropout must be a probability in [0, 1], got {p}")
        self.p = p
        self.empty = None
        if p > 0:
            if not data_root:
                raise ValueError("recipe_args.caption_dropout needs data.path (the shards hold the encoding of \"\")")
            self.empty = read_empty_prompt(data_root)

    def __call__(self, embeds_BTD: torch.Tensor, mask_BT: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.empty is None:
            return embeds_BTD, mask_BT
        drop_B = (torch.rand(embeds_BTD.shape[0], generator=generator) < self.p).to(embeds_BTD.device,
                                                                                    non_blocking=True)
        empty_embeds, empty_mask = self.empty
        if empty_embeds.shape != embeds_BTD.shape[1:]:
            raise ValueError(f"the stored encoding of \"\" has shape {list(empty_embeds.shape)}, the batch's prompts "
                             f"{list(embeds_BTD.shape[1:])}: they come from different preprocessing runs")
        empty_embeds = empty_embeds.to(embeds_BTD.device, embeds_BTD.dtype)
        empty_mask = empty_mask.to(mask_BT.device, mask_BT.dtype)
        return (torch.where(drop_B[:, None, None], empty_embeds, embeds_BTD),
                torch.where(drop_B[:, None], empty_mask, mask_BT))


@dataclass
class FinetuneConfig:
    # flow matching: how s is drawn. logit_normal = sigmoid(N(mean, std)) (SD3); shift > 1 moves mass to noise
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0
    learned_weighting: bool = False  # EDM2 uncertainty weighting u(t), trained by a second optimizer
    weighting_lr: float = 1e-2
    weighting_channels: int = 128
    # probability that a sample's caption is replaced by "" (its encoding is stored with the shards), so the
    # model keeps an unconditional prediction for classifier-free guidance
    caption_dropout: float = 0.0
    # image-to-video: probability that a sample's image conditioning is zeroed (diffusers' CogVideoX I2V trainer's
    # --noised_image_dropout, 0.05 there), so the model also learns to continue without the frame
    image_dropout: float = 0.0


def conditioning(batch, device) -> dict:
    """batch["cond"] (the shards' image-to-video tensors, fastpost.data.loader.collate) on the model's device."""
    return {k: v.to(device) for k, v in (batch.get("cond") or {}).items()}


def drop_conditioning(cond: dict, p: float, generator: torch.Generator) -> dict:
    """Each sample's conditioning tensors zeroed with probability p (drawn from the batch generator, so SP peers
    drop the same samples); p = 0 draws nothing."""
    if not cond or p <= 0:
        return cond
    batch = next(iter(cond.values())).shape[0]
    keep_B = (torch.rand(batch, generator=generator) >= p)
    return {k: v * keep_B.to(v.device, v.dtype).view(-1, *[1] * (v.dim() - 1)) for k, v in cond.items()}


class LossWeighting(nn.Module):
    """u(c) for c = model timestep / 1000 in [0, 1]: fixed random Fourier features -> one linear unit, zero
    initialised (so training starts with the plain loss)."""

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_B: torch.Tensor) -> torch.Tensor:
        features = torch.cos(2 * math.pi * (c_B[:, None].float() * self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(features).squeeze(-1)


class Finetune(Recipe):
    Config = FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, ctx: RecipeContext):
        super().__init__(cfg, ctx)
        self.family = ctx.family
        # model.expert=both: the high-noise expert (transformer/) is `model`, the low-noise one (transformer_2/)
        # `model_2`; otherwise one model
        self.both = bool(getattr(ctx.spec, "both_experts", False))
        self.model = ctx.build(expert_spec(ctx.spec, "high_noise") if self.both else ctx.spec)
        self.model_2 = ctx.build(expert_spec(ctx.spec, "low_noise")) if self.both else None
        self.boundary = pipeline_boundary_ratio(ctx.spec.pretrained) if self.both else None
        self.weighting = None
        if cfg.learned_weighting:
            self.weighting = ctx.build_module(LossWeighting(cfg.weighting_channels))
        # the objective the checkpoint was trained with: its own scheduler/ config when it has one (a flavor that
        # contradicts it raises)
        self.noise = self.family.noise_schedule(objective_scheduler_config(
            self.family, ctx.spec.pretrained if ctx.spec is not None else None,
            ctx.train_cfg.model.flavor if ctx.train_cfg is not None else None))
        self.dropout = CaptionDropout(cfg.caption_dropout, ctx.train_cfg.data.path if ctx.train_cfg else None)
        if not 0.0 <= cfg.image_dropout <= 1.0:
            raise ValueError(f"recipe_args.image_dropout must be a probability in [0, 1], got {cfg.image_dropout}")
        self.expert_range = getattr(ctx.spec, "expert_range", None)
        if self.expert_range is not None and self.noise.prediction_type != "flow_matching":
            raise ValueError("model.expert (one expert of a two-expert model) needs a flow-matching family")
        if self.both:
            if self.noise.prediction_type != "flow_matching":
                raise ValueError("model.expert=both (a two-expert model) needs a flow-matching family")
            if ctx.train_cfg is not None and ctx.train_cfg.ema_decay:
                raise ValueError("ema_decay follows one model; with model.expert=both train without it (or one "
                                 "expert per job: model.expert high_noise / low_noise)")
            if ctx.train_cfg is not None and ctx.train_cfg.validation.every_steps:
                raise ValueError("validation samples one model; with model.expert=both set validation.every_steps "
                                 "to 0 and sample the exports (lora/ and lora_transformer_2/) afterwards")
        self.seed = getattr(ctx.train_cfg, "seed", 0)

    def trainables(self):
        out = {"model": Trainable(self.model)}
        if self.both:
            out["model_2"] = Trainable(self.model_2)
        if self.weighting is not None:
            out["weighting"] = Trainable(self.weighting, {"lr": self.cfg.weighting_lr, "weight_decay": 0.0})
        return out

    # ---- model.expert=both: one phase per step, named after the expert that owns the step's drawn time ----------
    EXPERT_MODELS = {"high_noise": "model", "low_noise": "model_2"}

    def phases(self, step):
        if not self.both:
            return ["train"]
        # seeded by (seed, step) only: every rank (and a resumed run) trains the same expert at this step; the
        # offset keeps it off the stream of batch `step`'s noise (trainer.batch_generator)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7919)
        s = self.noise.sample_times(1, g, self.cfg)
        return ["high_noise" if float(s[0]) >= self.boundary else "low_noise"]

    def phase_trainables(self, phase):
        names = list(self.trainables())
        if not self.both:
            return names
        other = self.EXPERT_MODELS["low_noise" if phase == "high_noise" else "high_noise"]
        return [n for n in names if n != other]

    def extra_exports(self):
        # the low-noise expert, loadable with WanPipeline.load_lora_weights(..., load_into_transformer_2=True)
        return {"transformer_2": self.model_2} if self.both else {}

    def _times_on_side(self, n, generator, phase):
        """n times from the job's time distribution conditioned on the phase's expert's side of the boundary, by
        rejection on the host (no device sync; deterministic in the generator, so SP peers and resumes agree)."""
        kept, count = [], 0
        for _ in range(10_000):
            s = self.noise.sample_times(max(64, n), generator, self.cfg)
            s = s[s >= self.boundary] if phase == "high_noise" else s[s < self.boundary]
            kept.append(s)
            count += len(s)
            if count >= n:
                return torch.cat(kept)[:n]
        raise ValueError(f"the time distribution (recipe_args) puts almost no mass on the {phase} expert's side of "
                         f"boundary_ratio {self.boundary}: widen logit_std or change flow_shift")

    def loss(self, batch, generator, phase="train"):
        # Randomness comes from the CPU generator (identical on SP peers): the noise is drawn on the device from a
        # seed it gives, the few times are drawn on the host and copied without blocking.
        x0 = batch["latents"].float()
        eps = randn_on(x0.shape, generator, x0.device)
        if self.both:
            if phase not in self.EXPERT_MODELS:
                raise ValueError(f"model.expert=both trains phases {list(self.EXPERT_MODELS)}, got {phase!r}")
            t = self._times_on_side(x0.shape[0], generator, phase).to(x0.device, non_blocking=True)
        else:
            t = self.noise.sample_times(x0.shape[0], generator, self.cfg).to(x0.device, non_blocking=True)
        if self.expert_range is not None:  # one expert of a two-expert model: its noise levels only
            lo, hi = self.expert_range
            t = lo + (hi - lo) * t  # the job's time distribution, mapped onto the expert's interval
        x_t = self.noise.add_noise(x0, eps, t)
        timestep = self.noise.model_timestep(t)
        # drawn after the noise and times, so caption_dropout=0 leaves every earlier draw as it was
        embeds, mask = self.dropout(batch["prompt_embeds"], batch["prompt_attention_mask"], generator)
        # image-to-video: the first frame's conditioning (empty for text-to-video shards)
        cond = drop_conditioning(conditioning(batch, x0.device), self.cfg.image_dropout, generator)
        model = self.model_2 if phase == "low_noise" else self.model
        pred = self.family.predict(model, x_t, timestep, embeds, mask, **({"cond": cond} if cond else {}))
        target = self.noise.target(x0, eps, t)
        c = timestep.float() / 1000  # the noise level in [0, 1]
        if self.weighting is None:
            return F.mse_loss(pred.float(), target), {"t_mean": c}
        mse_B = (pred.float() - target).pow(2).flatten(1).mean(dim=1)
        u_B = self.weighting(c)
        return (mse_B / u_B.exp() + u_B).mean(), {"t_mean": c, "mse": mse_B.detach().mean()}


RECIPE = Finetune
