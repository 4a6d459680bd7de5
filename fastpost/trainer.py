"""The trainer: a fixed build order and a plain loop. No model- or recipe-specific branches live here.

Build order (each step needs the ones before it):
  1. process group + ParallelDims (named meshes)
  2. model (pretrained weights or a seeded flavor; identical on every rank)
  3. LoRA injection (before sharding: FSDP must see the final parameter set)
  4. parallelize: SP processors + hooks -> activation checkpointing -> FSDP2
  5. optimizer over trainable parameters, LR schedule (counted in optimizer steps)
  6. recipe (the loss), EMA of trainable weights
  7. loader over latent shards (dp rank decides the samples; SP peers get the same ones)
  8. checkpoint manager; resume restores 4-7 exactly
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from fastpost.checkpoint import CheckpointConfig, CheckpointManager, resolve_resume
from fastpost.cluster import EXIT_DIVERGED, ClusterConfig, JobGuard, JobStop
from fastpost.config import from_dict, to_dict
from fastpost.data.loader import LoaderConfig, ShardLoader
from fastpost.distributed import ParallelDims, init_distributed
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.lora import LoRAConfig, export_lora, full_state_dict, inject_lora
from fastpost.metrics import MetricsLogger, clip_grad_norm, peak_memory_mib
from fastpost.models import get_family
from fastpost.recipes import RecipeContext, get_recipe


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1
    ulysses: int = 1
    ring: int = 1


@dataclass
class ModelConfig:
    family: str = "cogvideox"
    flavor: str | None = "debug"
    pretrained: str | None = None  # diffusers pipeline or transformer directory (or hub id)
    init_seed: int = 0  # seeds random init when there is no pretrained checkpoint
    attention_backend: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class LoggingConfig:
    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastpost"


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    steps: int = 100  # optimizer steps
    grad_accum: int = 1
    seed: int = 0  # noise / timestep sampling
    ema_decay: float | None = None  # EMA of trainable weights; exported to <out>/{lora,transformer}_ema when set
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated (skipped) before aborting
    recipe: str = "finetune"
    recipe_args: dict = field(default_factory=dict)  # the recipe's own Config, checked strictly
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ac: ACConfig = field(default_factory=ACConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(path=""))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def batch_generator(seed: int, global_batch_index: int) -> torch.Generator:
    """Noise for one batch depends only on (seed, its index in the epoch-global batch order), so SP peers draw
    identical noise and any dp x grad_accum layout with the same global batch draws the same noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + global_batch_index)


class EMA:
    """Exponential moving average of the trainable parameters (local shards under FSDP)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay, self.params = decay, params
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily give the model the EMA weights (for export or evaluation); the trained ones come back."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # 1. process group and meshes
        self.rank, world = init_distributed()
        self.dims = ParallelDims(world_size=world, **to_dict(cfg.parallel))
        self.dims.build_mesh()
        # parallelize() puts the model on the mesh's device; batches follow it there (CPU: gloo, GPU: nccl)
        self.device = torch.device(self.dims.mesh.device_type if self.dims.mesh is not None else "cpu")
        self.out = Path(cfg.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.guard = JobGuard(cfg.cluster, self.out, self.rank, self.device)  # output lock, die with launcher, signals
        # 2. model, identical on every rank
        self.family = get_family(cfg.model.family)
        torch.manual_seed(cfg.model.init_seed)
        model = self.family.load(cfg.model.pretrained, cfg.model.flavor)
        mc = model.config  # for tokens/s: latent voxels per token
        self._voxels_per_token = (getattr(mc, "patch_size_t", None) or 1) * mc.patch_size ** 2
        # 3. LoRA
        if cfg.lora.enabled:
            inject_lora(model, cfg.lora)
        # 4. SP -> AC -> FSDP
        self.model = self.family.parallelize(model, self.dims, cfg.ac, cfg.fsdp, cfg.model.attention_backend)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # 5. optimizer and schedule
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, cfg.steps))
        # 6. recipe, EMA
        recipe_cls = get_recipe(cfg.recipe)
        recipe_cfg = from_dict(recipe_cls.Config, cfg.recipe_args, where="recipe_args")
        self.recipe = recipe_cls(recipe_cfg, RecipeContext(self.family, self.model, self.dims, cfg))
        self.ema = EMA(self.trainable, cfg.ema_decay) if cfg.ema_decay else None
        # 7. data
        if not cfg.data.path:
            raise ValueError("data.path is empty: point it at a latent shard folder written by `fastpost preprocess`")
        self.loader = self.guard.checked(lambda: ShardLoader.from_config(cfg.data, self.dims))  # collective
        # 8. checkpoints
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.step = 0
        self.bad_steps = 0
        resume = resolve_resume(self.ckpt.root, cfg.checkpoint.resume)
        if resume is not None:
            self._load(resume)
        self.metrics = MetricsLogger(self.out, cfg.logging, self.rank, to_dict(cfg))

    # ---- checkpoint state ------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Any]:
        tensors = {"recipe": self.recipe.state_tensors()}
        if self.ema is not None:
            tensors["ema"] = self.ema.shadow
        return tensors

    def save(self) -> Path:
        extra = {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "bad_steps": self.bad_steps}
        return self.ckpt.save(self.step, self.model, self.optimizer, self._tensors(), extra)

    def _load(self, path: Path) -> None:
        extra = self.ckpt.load(path, self.model, self.optimizer, self._tensors())
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(extra["loader"])
        self.step, self.bad_steps = extra["step"], extra["bad_steps"]
        if self.rank == 0:
            print(f"[fastpost] resumed from {path} at step {self.step}", flush=True)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)  # nccl reduces device tensors only
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _mean_over_dp(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t)  # every SP peer holds the same value, so the world mean is the dp mean
            t /= dist.get_world_size()
        return t.item()

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches: loss, backward, clip, step."""
        cfg, dims = self.cfg, self.dims
        total_loss, samples, tokens, extra = 0.0, 0, 0, {}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in next(batches).items()}
            index = (self.step * cfg.grad_accum + micro) * dims.dp + dims.dp_rank  # global batch index
            loss, extra = self.recipe.loss(batch, batch_generator(cfg.seed, index))
            (loss / cfg.grad_accum).backward()
            total_loss += loss.item() / cfg.grad_accum
            samples += batch["latents"].shape[0]
            tokens += batch["latents"][:, 0].numel() // self._voxels_per_token  # video tokens in this batch
        grad_norm = clip_grad_norm(list(self.trainable.values()), cfg.optim.grad_clip)
        finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
        if self._any_rank(not finite):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps > cfg.max_bad_steps:
                raise JobStop(EXIT_DIVERGED,
                    f"{self.bad_steps} consecutive steps with a non-finite loss or gradient (last loss {total_loss}); "
                    f"lower optim.lr, check the data, or raise max_bad_steps", "diverged")
            return {"skipped": 1.0, "bad_steps": float(self.bad_steps)}
        self.bad_steps = 0
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.recipe.after_optimizer_step(self.step)
        return {"loss": self._mean_over_dp(total_loss), "lr": lr, "grad_norm": grad_norm,
                "samples": samples * dims.dp, "tokens": tokens * dims.dp, **extra}

    def fit(self) -> list[float]:
        cfg = self.cfg
        batches = self.loader.forever()
        losses = []
        t_last = time.perf_counter()
        while self.step < cfg.steps:
            # collective: a stop signal on any rank, or a bad shard among the next step's samples on any rank
            if self.guard.should_stop(lambda: self.loader.check_next(cfg.grad_accum)):
                path = self.save()
                self.metrics.close()
                raise self.guard.preempted(self.step, path)
            metrics = self.train_step(batches)
            self.step += 1
            if "loss" in metrics:
                losses.append(metrics["loss"])
            now = time.perf_counter()
            metrics.update(step_time_s=now - t_last, peak_mem_mib=peak_memory_mib())
            t_last = now
            self.metrics.log(self.step, metrics)
            if (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.steps
                    and self.bad_steps == 0):  # saving mid-streak could rotate the last good checkpoint out
                self.save()
        self.save()
        self.export()
        self.metrics.close()
        return losses

    # ---- export -------------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """LoRA runs: diffusers-format LoRA weights (<out>/lora); full runs: a diffusers save_pretrained folder
        (<out>/transformer). With ema_decay set, the EMA weights go to <out>/lora_ema or <out>/transformer_ema."""
        path = self._export("")
        if self.ema is not None:
            with self.ema.swapped():
                self._export("_ema")
        return path

    def _export(self, suffix: str) -> Path:
        if self.cfg.lora.enabled:
            path = self.out / f"lora{suffix}"
            export_lora(self.model, path, self.family.pipeline_class)
        else:
            path = self.out / f"transformer{suffix}"
            state = full_state_dict(self.model)
            if self.rank == 0:
                plain = self.family.load(self.cfg.model.pretrained, self.cfg.model.flavor)
                plain.load_state_dict(state)
                plain.save_pretrained(path)
        if dist.is_initialized():
            dist.barrier()
        return path

    def close(self) -> None:
        self.guard.close()
        if dist.is_initialized():
            dist.destroy_process_group()
