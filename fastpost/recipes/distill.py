"""Phased consistency distillation (PCM; M = 1 is latent-consistency / LCD style) for flow-matching and
v-prediction teachers.

Notation. The teacher's ODE is discretised on a grid of N+1 points i = 0 (pure noise) ... N (clean data). At
point i a noisy latent is x_i = a_i x0 + b_i eps (flow matching: a = 1 - sigma, b = sigma; v-prediction/VP:
a = sqrt(alphabar), b = sqrt(1 - alphabar)). A model prediction at point i gives estimates (x0_hat, eps_hat),
and one deterministic DDIM step to point j is
    ddim(x, pred, i -> j) = a_j x0_hat + b_j eps_hat          (for flow matching: x + (sigma_j - sigma_i) v).
The grid is cut into M phases at edges e_0 = 0 < e_1 < ... < e_M = N. Inside phase m the consistency function
maps any point to the phase's end:  f_theta(x_i, i) = ddim(x_i, v_theta(x_i, i), i -> e_{m+1}),
so f(x, e_{m+1}) = x holds by construction (the boundary condition).

Training step, for data x0, noise eps, a grid index n ~ U{0..N-1} in phase m, skip k:
    x_n        = a_n x0 + b_n eps
    x_hat      = ddim(x_n, v_teacher^w(x_n, n), n -> n'),   n' = min(n + k, e_{m+1})   (teacher, CFG scale w)
    target     = f_{theta^-}(x_hat, n')                     (theta^- = EMA of theta, or theta without grad)
    loss       = pseudo_huber(f_theta(x_n, n), target, c)  = sqrt(mean((f - target)^2) + c^2) - c  per sample
Sampling with the student is the same DDIM map from edge to edge (`phased_sample`), M steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from fastpost.data.checks import objective_scheduler_config
from fastpost.data.shards import read_empty_prompt
from fastpost.distributed.fsdp import reshard_all
from fastpost.noise import OdeGrid, even_edges, linear_quadratic_sigmas, make_grid, phase_edges  # noqa: F401
from fastpost.recipes import Recipe, RecipeContext, Trainable
from fastpost.recipes.finetune import CaptionDropout


@dataclass
class DistillConfig:
    teacher: str | None = None  # teacher weights (diffusers dir); None: the student's starting model
    num_teacher_steps: int = 50  # N, the teacher ODE grid
    phases: int = 4  # M; 1 = single-phase consistency (LCD)
    skip_steps: int = 1  # k, grid steps per teacher solver step
    schedule: Literal["uniform", "linear_quadratic"] = "uniform"  # flow matching grid; VP uses even DDPM steps
    lq_threshold: float = 0.025  # linear-quadratic: sigma reached at the end of the linear part
    lq_linear_steps: int | None = None  # linear part length (default N // 2), as in Mochi's sampler
    huber_c: float = 1e-3
    target: Literal["ema", "student"] = "ema"
    ema_decay: float = 0.95
    guidance_min: float = 1.0  # teacher CFG scale w ~ U[min, max] per batch; 1.0 = no guidance
    guidance_max: float = 1.0
    # the unconditional branch of the teacher's guidance is the encoding of "" (as CogVideoX / Mochi pipelines
    # encode it), stored with the shards by preprocessing; a text encoder folder here re-encodes "" instead
    negative_text_encoder: str | None = None
    caption_dropout: float = 0.0  # probability a sample's caption is replaced by "" (student, teacher and target)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(mean((x - y)^2) + c^2) - c, averaged over the batch (mean, so c is size-independent)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return ((mse + c * c).sqrt() - c).mean()


# ---- model calls -------------------------------------------------------------------------------------------------
def guided_prediction(family, model, grid: OdeGrid, x, idx, embeds, mask, w: float, neg=None):
    """Model prediction at grid points idx; with w != 1 the classifier-free-guided one (one batched pass)."""
    t = grid.model_t[idx].to(x.device, torch.float32 if grid.prediction_type == "flow_matching" else torch.int64)
    if w == 1.0:
        return family.predict(model, x.float(), t, embeds, mask).double()
    neg_embeds, neg_mask = neg
    out = family.predict(model, torch.cat([x, x]).float(), torch.cat([t, t]), torch.cat([neg_embeds, embeds]),
                         torch.cat([neg_mask, mask]))
    uncond, cond = out.double().chunk(2)
    return uncond + w * (cond - uncond)


@torch.no_grad()
def phased_sample(family, model, grid: OdeGrid, edges: torch.Tensor, noise: torch.Tensor, embeds, mask,
                  w: float = 1.0, neg=None) -> torch.Tensor:
    """Deterministic multi-phase sampler: one DDIM jump per phase, from grid point edges[0]=0 to edges[-1]=N.

    With the student it is the few-step sampler; with the teacher and edges = 0..N it is its N-step DDIM/Euler.
    """
    x = grid.b[0] * noise.double()  # point 0 is (almost) pure noise: a_0 = 0 for flow and zero-terminal-SNR VP
    for src, dst in zip(edges[:-1].tolist(), edges[1:].tolist()):
        idx = torch.full((x.shape[0],), src)
        pred = guided_prediction(family, model, grid, x, idx, embeds, mask, w, neg)
        x = grid.ddim(x, pred, idx, torch.full((x.shape[0],), dst))
    return x.float()


# ---- the recipe --------------------------------------------------------------------------------------------------
class Distill(Recipe):
    """Models: the student (trained); the teacher (frozen); the consistency target theta^- (EMA of the student).
    With LoRA and the student's own base as teacher, neither costs a copy of the model: the teacher is the
    student with its adapters switched off, and the target is the student with the EMA adapter weights swapped
    in. Otherwise each is a frozen model from the builder, sharded like the student."""

    Config = DistillConfig

    def __init__(self, cfg: DistillConfig, ctx: RecipeContext):
        super().__init__(cfg, ctx)
        if getattr(ctx.spec, "expert_range", None) is not None:
            raise ValueError("recipe distill learns the whole trajectory with one student; model.expert (one expert of "
                             "a two-expert model such as Wan 2.2 A14B) is supported by recipe finetune")
        if cfg.skip_steps < 1:
            raise ValueError(f"recipe_args.skip_steps must be >= 1, got {cfg.skip_steps}")
        if not 1.0 <= cfg.guidance_min <= cfg.guidance_max:
            raise ValueError(f"need 1 <= guidance_min <= guidance_max, got {cfg.guidance_min}, {cfg.guidance_max}")
        spec = ctx.spec
        self.family = ctx.family
        # the teacher's schedule: the checkpoint's own scheduler/ (a contradicting flavor raises), as finetuning
        teacher_ckpt = cfg.teacher or spec.pretrained
        self.grid = make_grid(self.family, None, cfg.num_teacher_steps, cfg.schedule, cfg.lq_threshold,
                              cfg.lq_linear_steps, scheduler_config=objective_scheduler_config(
                                  self.family, teacher_ckpt, ctx.train_cfg.model.flavor))
        self.data_root = ctx.train_cfg.data.path if ctx.train_cfg is not None else None
        self.dropout = CaptionDropout(cfg.caption_dropout, self.data_root)
        self.edges = phase_edges(cfg.num_teacher_steps, cfg.phases)
        # phase_end[i] = the edge that ends the phase containing grid point i
        self.phase_end = torch.tensor([int(self.edges[self.edges > i].min()) for i in range(cfg.num_teacher_steps)])
        self.student = ctx.build(spec)
        self.trainable = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        self.lora = spec.lora is not None and spec.lora.enabled
        own_base = cfg.teacher is None or cfg.teacher == spec.pretrained
        self.teacher = None if self.lora and own_base else ctx.build(
            spec.with_(pretrained=cfg.teacher or spec.pretrained, lora=None, trainable=False))
        self.target = None  # a separate target model (full finetune)
        self.target_params: dict[str, torch.Tensor] = {}
        if cfg.target == "ema" and self.lora:
            self.target_params = {n: p.detach().clone() for n, p in self.trainable.items()}
        elif cfg.target == "ema":
            self.target = ctx.build(spec.with_(trainable=False))
            self.target_params = {n: p for n, p in self.target.named_parameters() if n in self.trainable}
            with torch.no_grad():
                for n, p in self.target_params.items():
                    p.copy_(self.trainable[n])
        self._neg = None

    def trainables(self):
        return {"model": Trainable(self.student)}

    @contextlib.contextmanager
    def _as_teacher(self):
        """The teacher network: a model of its own, or the student with its LoRA adapters off."""
        if self.teacher is not None:
            yield self.teacher
            return
        # the flag alone: peft's enable_adapters() also flips requires_grad, which FSDP2 has already captured
        # in its unsharded parameters (the student would then train nothing)
        layers = _lora_layers(self.student)
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield self.student
        finally:
            for layer in layers:
                layer._disable_adapters = False

    @contextlib.contextmanager
    def _as_target(self):
        """theta^-: the EMA model, or the student with the EMA adapter weights swapped in (FSDP's gathered copies
        are dropped around the swap so the forward sees the swapped shards)."""
        if self.target is not None or self.cfg.target != "ema":
            yield self.target if self.target is not None else self.student
            return
        with torch.no_grad():
            live = {n: p.detach().clone() for n, p in self.trainable.items()}
            reshard_all(self.student)
            for n, p in self.trainable.items():
                p.copy_(self.target_params[n])
        try:
            yield self.student
        finally:
            with torch.no_grad():
                reshard_all(self.student)
                for n, p in self.trainable.items():
                    p.copy_(live[n])

    def negative(self, embeds: torch.Tensor, mask: torch.Tensor):
        """Unconditional embeddings for CFG: the encoding of "" that preprocessing stored with the shards (or that
        negative_text_encoder gives), as the pipelines' negative prompt; broadcast over the batch."""
        if self._neg is None:
            if self.cfg.negative_text_encoder:
                from fastpost.data.text import TextEncoder

                enc = TextEncoder.from_pretrained(self.cfg.negative_text_encoder, family=self.family)
                self._neg = enc.encode([""], embeds.shape[1])
            elif self.data_root:
                e, m = read_empty_prompt(self.data_root)
                self._neg = (e[None], m[None])
            else:
                raise ValueError("guidance needs the encoding of \"\": set data.path (shards from `fastpost "
                                 "preprocess`) or recipe_args.negative_text_encoder")
            if self._neg[0].shape[1:] != embeds.shape[1:]:
                raise ValueError(f"the encoding of \"\" has shape {list(self._neg[0].shape[1:])}, the batch's prompts "
                                 f"{list(embeds.shape[1:])}: they come from different text encoders or lengths")
        e, m = self._neg
        return e.to(embeds.device, embeds.dtype).expand_as(embeds), m.to(mask.device, mask.dtype).expand_as(mask)

    def loss(self, batch, generator, phase="train"):
        cfg, grid = self.cfg, self.grid
        x0 = batch["latents"].double()
        embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
        bsz = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        n = torch.randint(0, cfg.num_teacher_steps, (bsz,), generator=generator)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand((), generator=generator).item()
        embeds, mask = self.dropout(embeds, mask, generator)  # after the draws above: p = 0 changes none of them
        edge = self.phase_end[n]
        n_next = torch.minimum(n + cfg.skip_steps, edge)
        a, b = grid.coeffs(n, x0)
        x_n = a * x0 + b * eps
        neg = self.negative(embeds, mask) if w != 1.0 else None
        with torch.no_grad():
            with self._as_teacher() as teacher:
                teacher_pred = guided_prediction(self.family, teacher, grid, x_n, n, embeds, mask, w, neg)
            x_hat = grid.ddim(x_n, teacher_pred, n, n_next)
            with self._as_target() as target_model:
                target_pred = guided_prediction(self.family, target_model, grid, x_hat, n_next, embeds, mask, 1.0)
            target = grid.ddim(x_hat, target_pred, n_next, edge)  # == x_hat where n_next is the edge
        # FSDP keeps a forward-only model's root gathered; drop it so the EMA update below is seen next step
        for frozen in (self.teacher, self.target):
            if frozen is not None:
                reshard_all(frozen)
        student_pred = guided_prediction(self.family, self.student, grid, x_n, n, embeds, mask, 1.0)
        f = grid.ddim(x_n, student_pred, n, edge)
        return pseudo_huber(f, target, cfg.huber_c), {"grid_index": n.float().mean(), "w": w}

    @torch.no_grad()
    def after_optimizer_step(self, phase: str, step: int) -> None:
        for n, p in self.target_params.items():
            p.lerp_(self.trainable[n].detach(), 1 - self.cfg.ema_decay)

    def state_tensors(self):
        return {"target": self.target_params} if self.target_params else {}


def _lora_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


RECIPE = Distill
