"""Finetuning (full or LoRA) with the objective the model was pretrained with.

flow matching (Mochi):   x_s = (1 - s) x0 + s eps,           s ~ logit-normal (shifted)
                         loss = || v_theta(x_s, 1000 s, c) - (eps - x0) ||^2
v-prediction (CogVideoX): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,   t ~ U{0, ..., T-1}, a_t = alphas_cumprod[t]
                         loss = || v_theta(x_t, t, c) - (sqrt(a_t) eps - sqrt(1 - a_t) x0) ||^2
(diffusers' CogVideoX script minimises ||x0_hat - x0||^2 / (1 - a_t); substituting x0_hat = sqrt(a_t) x_t -
sqrt(1 - a_t) v_hat shows that is exactly the v-loss above.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fastpost.recipes import Recipe, RecipeContext


@dataclass
class FinetuneConfig:
    # flow matching: how s is drawn. logit_normal = sigmoid(N(mean, std)) (SD3); shift > 1 moves mass to noise
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Mochi-style resolution shift of flow-matching times: s' = shift s / (1 + (shift - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


def sample_flow_times(n: int, cfg: FinetuneConfig, g: torch.Generator) -> torch.Tensor:
    if cfg.timestep_sampling == "logit_normal":
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=g))
    else:
        s = torch.rand(n, generator=g)
    return shift_sigmas(s, cfg.flow_shift)


def _bcast(x_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x_B.view(-1, *([1] * (like.dim() - 1)))


class Finetune(Recipe):
    Config = FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, ctx: RecipeContext):
        super().__init__(cfg, ctx)
        self.family = ctx.family
        if self.family.prediction_type == "v_prediction":
            scheduler = self.family.make_scheduler(ctx.train_cfg.model.flavor)
            self.alphas_cumprod = scheduler.alphas_cumprod.float()

    def loss(self, batch, generator):
        # Randomness comes from the CPU generator (identical on SP peers, any device), then moves to the data.
        x0 = batch["latents"].float()
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
        if self.family.prediction_type == "flow_matching":
            s = sample_flow_times(x0.shape[0], self.cfg, generator).to(x0.device)
            x_s = (1 - _bcast(s, x0)) * x0 + _bcast(s, x0) * eps
            target = eps - x0
            pred = self.family.predict(self.ctx.model, x_s, s * 1000, embeds, mask)
            t_mean = s.mean().item()
        else:
            t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator)
            a = _bcast(self.alphas_cumprod[t], x0).to(x0.device)
            t = t.to(x0.device)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            target = a.sqrt() * eps - (1 - a).sqrt() * x0
            pred = self.family.predict(self.ctx.model, x_t, t, embeds, mask)
            t_mean = t.float().mean().item()
        loss = F.mse_loss(pred.float(), target)
        return loss, {"t_mean": t_mean}


RECIPE = Finetune
