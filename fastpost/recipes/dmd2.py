"""Distribution matching distillation, DMD2 (Yin et al. 2024), for flow-matching and v-prediction teachers.

Models: the generator G (few-step student, initialised from the teacher, full or LoRA), the real score (the
frozen teacher, with classifier-free guidance w) and the fake score (the critic, trainable, initialised from the
teacher, full or LoRA), plus an optional GAN classification head on the critic's output.

Notation as in recipes/distill.py: an ODE grid of N+1 points (0 = noise ... N = data), x_i = a_i x0 + b_i eps. The
generator runs K steps at the grid points s_0 = 0 < s_1 < ... < s_{K-1} (even edges); between steps its clean
estimate is re-noised to the next point with fresh noise (the DMD2 sampler; `renoise: ddim` uses eps_hat instead).

One generator update, data x0, a step s = s_k (k ~ U{0..K-1}):
    x_s   = a_s x0 + b_s eps                       (backward_simulation: G's own rollout from noise to s instead)
    x_g   = x0_hat(G(x_s, s))                      the generator's sample
    t ~ U[t_min, t_max] on a fine grid of the training schedule,  x_t = a_t x_g + b_t eps'
    real  = x0_hat(teacher^w(x_t, t)),  fake = x0_hat(critic(x_t, t))          (no gradient)
    grad  = (fake - real) / mean(|x_g - real|)                                 (DMD's per-sample normaliser)
    loss  = dmd_weight 0.5 ||x_g - sg(x_g - grad)||^2  [+ gan_weight * softplus(-D(critic(x_t(x_g), t)))]
            [+ regression_weight ||x0_hat(G(x_{s_k}(z), s_k)) - ODE_teacher^w(z)||^2]   (DMD v1's paired loss)
whose gradient with respect to x_g is the DMD gradient: the difference of the two scores. Then `critic_updates`
critic updates, each on a fresh generator sample (no gradient into G):
    loss  = ||critic(x_t, t) - target(x_g, eps', t)||^2   (the family's own denoising objective)
            [+ gan_critic_weight * (softplus(-D(critic(x_t(x0_data)))) + softplus(D(critic(x_t(x_g))))) ]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpost.data.checks import objective_scheduler_config
from fastpost.data.shards import read_empty_prompt
from fastpost.distributed.fsdp import reshard_all
from fastpost.lora import LoRAConfig, set_active_adapter
from fastpost.noise import OdeGrid, make_grid, phase_edges
from fastpost.recipes import Recipe, RecipeContext, Trainable
from fastpost.recipes.distill import _lora_layers, guided_prediction, phased_sample


CRITIC = "critic"  # the critic's adapter name when it shares the generator's frozen base


@dataclass
class DMD2Config:
    teacher: str | None = None  # teacher weights (diffusers dir); None: the generator's starting model
    num_teacher_steps: int = 50  # the grid the generator's steps sit on (and its sampler's)
    generator_steps: int = 4  # K few-step sampling steps
    renoise: Literal["fresh", "ddim"] = "fresh"  # between generator steps: fresh noise (DMD2) or the DDIM step
    critic_updates: int = 2  # critic (fake score) updates per generator update (two time-scale rule)
    critic: Literal["full", "lora"] = "full"
    critic_lora: dict = field(default_factory=lambda: {"rank": 16, "alpha": 16.0})  # fastpost.lora.LoRAConfig keys
    critic_optim: dict = field(default_factory=dict)  # optim overrides for the critic (and GAN head), e.g. lr
    real_guidance: float = 1.0  # CFG scale of the real score; 1.0 = none
    score_grid_steps: int = 1000  # the fine grid the DMD / critic noise levels are drawn from
    t_min: float = 0.02  # noise levels drawn from [t_min, t_max] of that grid (0 = noise end excluded at t_max < 1)
    t_max: float = 0.98
    gan_weight: float = 0.0  # > 0: a GAN head on the critic's output; generator's adversarial loss weight
    gan_critic_weight: float = 0.0  # the head's (and critic's) classification loss weight
    backward_simulation: bool = False  # generator inputs from its own rollout (no grad) instead of noised data
    dmd_weight: float = 1.0  # weight of the distribution-matching loss (0: regression only)
    # > 0: DMD (v1)'s regression loss: from noise z, the teacher's num_teacher_steps-step ODE output (real score,
    # no grad) is the target of the generator's clean estimate at its own rollout from the same z
    regression_weight: float = 0.0
    negative_text_encoder: str | None = None  # re-encode "" for CFG instead of the shards' stored encoding


class GanHead(nn.Module):
    """Real/fake logit from the critic's clean estimate [B, C, F, H, W]: two 3-D convs, mean-pooled."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv3d(width, width, 3, padding=1, stride=(1, 2, 2)), nn.SiLU())
        self.out = nn.Linear(width, 1)

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x_BCFHW.float()).mean(dim=(2, 3, 4))).squeeze(-1)


class NegativePrompt:
    """The unconditional embedding for CFG: the encoding of "" stored with the shards (or re-encoded), cached."""

    def __init__(self, family, data_root: str | None, text_encoder: str | None):
        self.family, self.data_root, self.text_encoder, self.cached = family, data_root, text_encoder, None

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor):
        if self.cached is None:
            if self.text_encoder:
                from fastpost.data.text import TextEncoder

                self.cached = TextEncoder.from_pretrained(self.text_encoder, family=self.family).encode(
                    [""], embeds.shape[1])
            elif self.data_root:
                e, m = read_empty_prompt(self.data_root)
                self.cached = (e[None], m[None])
            else:
                raise ValueError("guidance needs the encoding of \"\": set data.path (shards from `fastpost "
                                 "preprocess`) or recipe_args.negative_text_encoder")
        e, m = self.cached
        if e.shape[1:] != embeds.shape[1:]:
            raise ValueError(f"the encoding of \"\" has shape {list(e.shape[1:])}, the batch's prompts "
                             f"{list(embeds.shape[1:])}: they come from different text encoders or lengths")
        return e.to(embeds.device, embeds.dtype).expand_as(embeds), m.to(mask.device, mask.dtype).expand_as(mask)


def generator_edges(num_teacher_steps: int, steps: int) -> torch.Tensor:
    """Grid points of the K generator steps and the clean end: [s_0 = 0, ..., s_{K-1}, N]."""
    return phase_edges(num_teacher_steps, steps)


def renoise(grid: OdeGrid, x, pred, src: int, dst: int, mode: str, generator: torch.Generator | None):
    """From point src to dst given the model's prediction: fresh noise around the clean estimate, or DDIM."""
    b = x.shape[0]
    z = None if mode == "ddim" else torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return grid.renoise(x, pred, torch.full((b,), src), torch.full((b,), dst), z)


@torch.no_grad()
def dmd_sample(family, model, grid: OdeGrid, edges: torch.Tensor, noise, embeds, mask, mode: str = "fresh",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The generator's few-step sampler (also `sampler: dmd` in fastpost sample): predict, re-noise, repeat."""
    x = grid.b[0] * noise.double()
    for src, dst in zip(edges[:-1].tolist(), edges[1:].tolist()):
        pred = guided_prediction(family, model, grid, x, torch.full((x.shape[0],), src), embeds, mask, 1.0)
        x = renoise(grid, x, pred, src, dst, mode, generator) if dst < grid.steps else \
            grid.estimates(x, pred, torch.full((x.shape[0],), src))[0]
    return x.float()


class DMD2(Recipe):
    Config = DMD2Config

    def __init__(self, cfg: DMD2Config, ctx: RecipeContext):
        super().__init__(cfg, ctx)
        if cfg.critic_updates < 0 or cfg.generator_steps < 1:
            raise ValueError("recipe_args.critic_updates must be >= 0 and generator_steps >= 1")
        if cfg.dmd_weight < 0 or cfg.regression_weight < 0 or cfg.dmd_weight + cfg.regression_weight == 0:
            raise ValueError(f"recipe_args.dmd_weight ({cfg.dmd_weight}) and regression_weight "
                             f"({cfg.regression_weight}) must be >= 0, one of them > 0")
        if not 0.0 <= cfg.t_min < cfg.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {cfg.t_min}, {cfg.t_max}")
        spec, self.family = ctx.spec, ctx.family
        teacher_ckpt = cfg.teacher or spec.pretrained
        sched = objective_scheduler_config(self.family, teacher_ckpt,
                                           ctx.train_cfg.model.flavor if ctx.train_cfg is not None else None)
        self.grid = make_grid(self.family, None, cfg.num_teacher_steps, scheduler_config=sched)
        self.fine = make_grid(self.family, None, cfg.score_grid_steps, scheduler_config=sched)
        self.edges = generator_edges(cfg.num_teacher_steps, cfg.generator_steps)
        data_root = ctx.train_cfg.data.path if ctx.train_cfg is not None else None
        self.negative = NegativePrompt(self.family, data_root, cfg.negative_text_encoder)
        self.lora = spec.lora is not None and spec.lora.enabled
        own_base = cfg.teacher is None or cfg.teacher == spec.pretrained
        critic_lora = None
        if cfg.critic == "lora":
            from fastpost.config import from_dict

            critic_lora = from_dict(LoRAConfig, {**cfg.critic_lora, "enabled": True}, where="recipe_args.critic_lora")
        # LoRA generator and LoRA critic on the teacher's own weights: ONE frozen base holds both adapters
        # ("default" = generator, "critic"), and the teacher is that base with adapters off
        self.shared = self.lora and own_base and critic_lora is not None
        self.generator = ctx.build(spec.with_(extra_adapters=((CRITIC, critic_lora),)) if self.shared else spec)
        # with a LoRA generator on the teacher's own weights the teacher is the generator with its adapters off
        self.teacher = None if self.lora and own_base else ctx.build(
            spec.with_(pretrained=teacher_ckpt, lora=None, trainable=False))
        # otherwise the critic is a model of its own with the teacher's weights (pretrained, or the same seeded
        # random init), full or LoRA
        self.critic = self.generator if self.shared else ctx.build(
            spec.with_(pretrained=teacher_ckpt, lora=critic_lora, trainable=True))
        self.head = None
        if cfg.gan_weight > 0 or cfg.gan_critic_weight > 0:
            channels = self.critic.config.get("out_channels") or self.critic.config["in_channels"]
            torch.manual_seed(spec.init_seed + 2)  # the same head on every rank
            self.head = ctx.build_module(GanHead(channels))

    def trainables(self):
        if self.shared:  # one module, two adapters: each optimizer owns its adapter's weights
            out = {"generator": Trainable(self.generator, owns=lambda n: f".{CRITIC}." not in n),
                   "critic": Trainable(self.critic, dict(self.cfg.critic_optim), owns=lambda n: f".{CRITIC}." in n)}
        else:
            out = {"generator": Trainable(self.generator),
                   "critic": Trainable(self.critic, dict(self.cfg.critic_optim))}
        if self.head is not None:
            out["gan_head"] = Trainable(self.head, dict(self.cfg.critic_optim))
        return out

    def phases(self, step: int) -> list[str]:
        return ["critic"] * self.cfg.critic_updates + ["generator"]

    def phase_trainables(self, phase: str) -> list[str]:
        if phase == "generator":
            return ["generator"]
        return ["critic"] + (["gan_head"] if self.head is not None else [])

    @contextlib.contextmanager
    def _as_teacher(self):
        """The frozen teacher, or the generator with its LoRA adapters switched off (the flag only: peft's
        enable_adapters() also flips requires_grad, which FSDP2 has already captured)."""
        if self.teacher is not None:
            yield self.teacher
            return
        layers = _lora_layers(self.generator)
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield self.generator
        finally:
            for layer in layers:
                layer._disable_adapters = False

    @contextlib.contextmanager
    def _as_critic(self):
        """The critic: a model of its own, or the shared base with the critic adapter switched in."""
        if not self.shared:
            yield self.critic
            return
        set_active_adapter(self.generator, CRITIC)
        try:
            yield self.critic
        finally:
            set_active_adapter(self.generator, "default")

    # ---- pieces of the math -------------------------------------------------------------------------------------
    def _x0(self, model, grid: OdeGrid, x, idx, embeds, mask, w: float = 1.0, neg=None):
        pred = guided_prediction(self.family, model, grid, x, idx, embeds, mask, w, neg)
        return grid.estimates(x, pred, idx)[0]

    def generate(self, x0_data, embeds, mask, generator: torch.Generator, grad: bool) -> torch.Tensor:
        """A generator sample x_g: one step from point s_k (k ~ U{0..K-1} per sample) of noised data, or of G's
        own rollout from noise. The rollout always runs all K-1 no-grad steps and each sample picks its point, so
        every dp rank runs the same forwards (FSDP's gathers must match across ranks)."""
        bsz, grid = x0_data.shape[0], self.grid
        k = torch.randint(0, self.cfg.generator_steps, (bsz,), generator=generator)
        eps = torch.randn(x0_data.shape, generator=generator, dtype=torch.float64).to(x0_data.device)
        s = self.edges[k]
        if self.cfg.backward_simulation:
            x = self._rollout(eps, k, embeds, mask, generator)
        else:
            a, b = grid.coeffs(s, x0_data)
            x = a * x0_data.double() + b * eps
        with torch.set_grad_enabled(grad):
            x_g = self._x0(self.generator, grid, x, s, embeds, mask)
        if not grad:
            reshard_all(self.generator)
        return x_g

    @torch.no_grad()
    def _rollout(self, eps, k, embeds, mask, generator: torch.Generator) -> torch.Tensor:
        """G's own sampler from noise eps to its step s_k (per sample); all K-1 steps run on every rank."""
        grid, bsz = self.grid, eps.shape[0]
        x = grid.b[0] * eps
        pick = x.clone()
        for j in range(1, self.cfg.generator_steps):
            src, dst = int(self.edges[j - 1]), int(self.edges[j])
            pred = guided_prediction(self.family, self.generator, grid, x, torch.full((bsz,), src), embeds, mask, 1.0)
            x = renoise(grid, x, pred, src, dst, self.cfg.renoise, generator)
            pick = torch.where((k == j).view(-1, 1, 1, 1, 1).to(x.device), x, pick)
        reshard_all(self.generator)
        return pick

    def _regression_loss(self, x0, embeds, mask, generator: torch.Generator) -> torch.Tensor:
        """DMD (v1)'s regression: the generator's clean estimate at its rollout from noise z, against the teacher's
        N-step ODE output from the same z (the real score's guidance; computed here, no grad, no stored pairs)."""
        cfg, grid, bsz = self.cfg, self.grid, x0.shape[0]
        k = torch.randint(0, cfg.generator_steps, (bsz,), generator=generator)
        z = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        w = cfg.real_guidance
        with self._as_teacher() as teacher:
            y = phased_sample(self.family, teacher, grid, torch.arange(grid.steps + 1), z, embeds, mask, w,
                              self.negative(embeds, mask) if w != 1 else None)
            if teacher is not self.generator:
                reshard_all(teacher)
        x = self._rollout(z, k, embeds, mask, generator)
        x_reg = self._x0(self.generator, grid, x, self.edges[k], embeds, mask)
        return F.mse_loss(x_reg.float(), y.float())

    def _noising(self, x: torch.Tensor, generator: torch.Generator):
        """(t, eps, a, b) for noising generator samples x to x_t = a x + b eps at a random level (same draws, same
        order, for the generator's and the critic's loss)."""
        t = self._noise_level(x.shape[0], generator)
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        return (t, eps, *self.fine.coeffs(t, x))

    def _noise_level(self, bsz: int, generator: torch.Generator) -> torch.Tensor:
        n = self.fine.steps
        lo, hi = round(self.cfg.t_min * n), max(round(self.cfg.t_min * n) + 1, round(self.cfg.t_max * n))
        # grid index 0 is noise, n is data: t_max (noisiest) maps to the low indices
        return n - torch.randint(lo, hi, (bsz,), generator=generator)

    def loss(self, batch, generator, phase="generator"):
        x0 = batch["latents"].double()
        embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
        if phase == "generator":
            return self._generator_loss(x0, embeds, mask, generator)
        return self._critic_loss(x0, embeds, mask, generator)

    def _generator_loss(self, x0, embeds, mask, generator):
        cfg, fine = self.cfg, self.fine
        x_g = self.generate(x0, embeds, mask, generator, grad=True)
        t, eps, a, b = self._noising(x_g, generator)
        x_t = a * x_g.detach() + b * eps
        w = cfg.real_guidance
        with torch.no_grad():
            with self._as_teacher() as teacher:
                real = self._x0(teacher, fine, x_t, t, embeds, mask, w, self.negative(embeds, mask) if w != 1 else None)
            with self._as_critic() as critic:
                fake = self._x0(critic, fine, x_t, t, embeds, mask)
            grad = (fake - real) / (x_g.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-8).view(-1, 1, 1, 1, 1)
        for frozen in (self.teacher, self.critic):
            if frozen is not None and frozen is not self.generator:  # G's own forward above has a backward
                reshard_all(frozen)
        dmd = 0.5 * F.mse_loss(x_g.float(), (x_g - grad).detach().float())
        loss = cfg.dmd_weight * dmd
        metrics = {"dmd": dmd.detach(), "dmd_grad_abs": grad.abs().mean()}
        if cfg.regression_weight > 0:
            reg = self._regression_loss(x0, embeds, mask, generator)
            loss = loss + cfg.regression_weight * reg
            metrics["regression"] = reg.detach()
        if cfg.gan_weight > 0:
            # the critic as the discriminator's feature extractor: gradients flow through it into x_g only
            with self._as_critic() as critic:
                logits = self.head(self._x0(critic, fine, a * x_g + b * eps, t, embeds, mask))
            gan = F.softplus(-logits).mean()
            loss = loss + cfg.gan_weight * gan
            metrics["gan_g"] = gan.detach()
        return loss, metrics

    def _critic_loss(self, x0, embeds, mask, generator):
        cfg, fine = self.cfg, self.fine
        x_g = self.generate(x0, embeds, mask, generator, grad=False)
        t, eps, a, b = self._noising(x_g, generator)
        x_t = a * x_g + b * eps
        with self._as_critic() as critic:
            pred = guided_prediction(self.family, critic, fine, x_t, t, embeds, mask, 1.0)
            loss = F.mse_loss(pred.float(), fine.target(x_g, eps, t).float())
            metrics = {"denoise": loss.detach()}
            if self.head is not None and cfg.gan_critic_weight > 0:
                fake_logits = self.head(fine.estimates(x_t, pred, t)[0])
                real_logits = self.head(self._x0(critic, fine, a * x0 + b * eps, t, embeds, mask))
                gan = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
                loss = loss + cfg.gan_critic_weight * gan
                metrics["gan_d"] = gan.detach()
        return loss, metrics

    def export_model(self) -> nn.Module:
        return self.generator


RECIPE = DMD2
