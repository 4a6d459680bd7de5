"""Motion consistency model (MCM, Zhai et al. 2024): phased/latent consistency distillation of a video teacher
with motion and appearance disentangled.

Motion: the consistency loss of recipes/distill.py (same grid, phases, teacher solver step, EMA target) is taken
on a motion representation of the latents, their temporal differences phi(x)_f = x_{f+1} - x_f:
    L_motion = pseudo_huber(phi(f_theta(x_n, n)), phi(target), c)   [+ raw_weight * pseudo_huber(f, target, c)]
Appearance: frames of the student's clean estimate x0_hat(x_n, n) are pushed towards the frames of a separate
image dataset (latent shards, e.g. high-quality stills encoded by the same VAE) by a discriminator D with its own
optimizer (non-saturating GAN):
    L_student = L_motion + adv_weight * mean softplus(-D(frames(x0_hat)))
    L_D       = image_mix * softplus(-D(image frames)) + (1 - image_mix) * softplus(-D(video frames))
                + softplus(D(sg(frames(x0_hat))))
`image_mix` sets how the discriminator's real side mixes the two shard folders (1 = images only). D is a small
trainable network on latent frames, or a `transformers` vision backbone (frozen, as the paper's DINOv2/CLIP) with
a trainable latent-to-RGB adapter and head. The image set is read by a second loader the trainer builds and
checkpoints like its own (`ctx.open_loader`): dp ranks read disjoint image batches, SP peers the same ones.
Sampling is the phased sampler of the distilled student (`sampler: phased`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpost.data.loader import LoaderConfig
from fastpost.recipes import RecipeContext, Trainable
from fastpost.recipes.distill import Distill, DistillConfig, guided_prediction, pseudo_huber


@dataclass
class MCMConfig(DistillConfig):
    images: str = ""  # the image set: a latent shard folder (single-frame latents) from `fastpost preprocess`
    image_batch_size: int = 4  # images per discriminator update per dp rank
    image_mix: float = 1.0  # share of the discriminator's real frames from the image set (rest: video frames)
    adv_weight: float = 0.1  # the student's adversarial (appearance) loss weight
    raw_weight: float = 0.0  # a consistency term on the raw latents too (0: motion only, as the paper)
    disc_updates: int = 1  # discriminator updates per student update
    discriminator: Literal["latent_cnn", "transformers"] = "latent_cnn"
    disc_width: int = 32  # latent_cnn channels
    # transformers backbone: a local pretrained folder, or a config dict for a random one (e.g. {"model_type":
    # "dinov2", "hidden_size": 32, ...}); frozen. The latent frames are mapped to RGB by a trainable 1x1 conv
    backbone: str | None = None
    backbone_config: dict = field(default_factory=dict)
    disc_optim: dict = field(default_factory=lambda: {"lr": 2e-4, "betas": (0.0, 0.99)})


def motion(x_BCFHW: torch.Tensor) -> torch.Tensor:
    """The motion representation: temporal differences of the latent frames."""
    return x_BCFHW[:, :, 1:] - x_BCFHW[:, :, :-1]


def frames(x_BCFHW: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W]: every latent frame as an image."""
    b, c, f, h, w = x_BCFHW.shape
    return x_BCFHW.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class LatentFrameDiscriminator(nn.Module):
    """A small trainable network on latent frames: conv, conv (stride 2), mean pool, linear -> logit."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Linear(width, 1)

    def forward(self, frames_NCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(frames_NCHW.float()).mean(dim=(2, 3))).squeeze(-1)


class BackboneDiscriminator(nn.Module):
    """A frozen `transformers` vision backbone (DINOv2, CLIP vision, ViT, ...) under a trainable latent -> RGB
    1x1 conv and a linear head on its mean token feature."""

    def __init__(self, channels: int, backbone: str | None, backbone_config: dict):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if backbone:
            self.backbone = AutoModel.from_pretrained(backbone)
        elif backbone_config:
            config = dict(backbone_config)
            model_type = config.pop("model_type", None)
            if model_type is None:
                raise ValueError("recipe_args.backbone_config needs a model_type (e.g. 'dinov2', 'clip_vision_model')")
            self.backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
        else:
            raise ValueError("discriminator: transformers needs recipe_args.backbone (a local folder) or "
                             "backbone_config (a config dict)")
        self.backbone.requires_grad_(False)
        cfg = self.backbone.config
        self.image_size = cfg.image_size
        self.in_channels = getattr(cfg, "num_channels", 3)
        self.to_rgb = nn.Conv2d(channels, self.in_channels, 1)
        self.head = nn.Linear(cfg.hidden_size, 1)

    def forward(self, frames_NCHW: torch.Tensor) -> torch.Tensor:
        rgb = F.interpolate(self.to_rgb(frames_NCHW.float()), size=(self.image_size, self.image_size),
                            mode="bilinear", align_corners=False)
        hidden = self.backbone(pixel_values=rgb).last_hidden_state  # frozen weights, gradients still reach rgb
        return self.head(hidden.mean(dim=1)).squeeze(-1)


class MCM(Distill):
    Config = MCMConfig

    def __init__(self, cfg: MCMConfig, ctx: RecipeContext):
        super().__init__(cfg, ctx)
        if not cfg.images:
            raise ValueError("recipe mcm needs recipe_args.images: a folder of image latent shards")
        if not 0.0 <= cfg.image_mix <= 1.0:
            raise ValueError(f"recipe_args.image_mix must be in [0, 1], got {cfg.image_mix}")
        if ctx.open_loader is None:
            raise ValueError("recipe mcm needs a trainer that opens its image loader (RecipeContext.open_loader)")
        seed = ctx.train_cfg.data.seed if ctx.train_cfg is not None else 0
        self.images = ctx.open_loader("images", LoaderConfig(path=cfg.images, batch_size=cfg.image_batch_size,
                                                             seed=seed))
        self._image_batches = None  # started on first use: a resumed loader's position is loaded by then
        self.channels = channels = self.student.config.get("out_channels") or self.student.config["in_channels"]
        torch.manual_seed(ctx.spec.init_seed + 1)  # the same discriminator on every rank
        if cfg.discriminator == "latent_cnn":
            disc = LatentFrameDiscriminator(channels, cfg.disc_width)
        else:
            disc = BackboneDiscriminator(channels, cfg.backbone, cfg.backbone_config)
        self.disc = ctx.build_module(disc)

    def trainables(self):
        return {"model": Trainable(self.student), "discriminator": Trainable(self.disc, dict(self.cfg.disc_optim))}

    def phases(self, step: int) -> list[str]:
        return ["disc"] * self.cfg.disc_updates + ["student"]

    def phase_trainables(self, phase: str) -> list[str]:
        return ["discriminator"] if phase == "disc" else ["model"]

    def _next_images(self, device) -> torch.Tensor:
        if self._image_batches is None:
            self._image_batches = self.images.forever()
        latents = next(self._image_batches)["latents"].to(device)
        if latents.shape[1] != self.channels:
            raise ValueError(f"recipe_args.images {self.cfg.images!r} holds latents of {latents.shape[1]} channels, "
                             f"the model {self.channels}: encode the image set with the same VAE as the videos")
        return frames(latents)

    def loss(self, batch, generator, phase="student"):
        cfg = self.cfg
        if phase == "disc":
            return self._disc_loss(batch, generator)
        f, target, parts = self.consistency(batch, generator)
        loss_motion = pseudo_huber(motion(f), motion(target), cfg.huber_c)
        loss = loss_motion + (cfg.raw_weight * pseudo_huber(f, target, cfg.huber_c) if cfg.raw_weight else 0.0)
        x0_hat = self.grid.estimates(parts["x_n"], parts["pred"], parts["n"])[0]
        adv = F.softplus(-self.disc(frames(x0_hat))).mean()
        return loss + cfg.adv_weight * adv, {"motion": loss_motion.detach(), "adv": adv.detach(),
                                             "grid_index": parts["n"].float().mean()}

    def _disc_loss(self, batch, generator):
        cfg, grid = self.cfg, self.grid
        x0 = batch["latents"].double()
        embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        n = torch.randint(0, cfg.num_teacher_steps, (x0.shape[0],), generator=generator)
        a, b = grid.coeffs(n, x0)
        x_n = a * x0 + b * eps
        with torch.no_grad():
            pred = guided_prediction(self.family, self.student, grid, x_n, n, embeds, mask, 1.0)
            fake = frames(grid.estimates(x_n, pred, n)[0])
        from fastpost.distributed.fsdp import reshard_all

        reshard_all(self.student)
        real_images = self._next_images(x0.device)
        loss_fake = F.softplus(self.disc(fake)).mean()
        loss_real = torch.zeros((), device=x0.device)
        if cfg.image_mix > 0:
            loss_real = loss_real + cfg.image_mix * F.softplus(-self.disc(real_images)).mean()
        if cfg.image_mix < 1:
            loss_real = loss_real + (1 - cfg.image_mix) * F.softplus(-self.disc(frames(x0))).mean()
        return loss_real + loss_fake, {"d_real": loss_real.detach(), "d_fake": loss_fake.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, phase: str, step: int) -> None:
        if phase == "student":  # the EMA target follows the student, not the discriminator's updates
            super().after_optimizer_step(phase, step)


RECIPE = MCM
