"""The trainer: a fixed build order and a plain loop. No model- or recipe-specific branches live here.

Build order (each step needs the ones before it):
  1. process group (collective timeout, nccl + gloo on GPU) + ParallelDims (named meshes); the job guard
  2. loader over latent shards (dp rank decides the samples; SP peers get the same ones), checked against the
     model's config before any weight is read
  3. recipe: declares its models; each is made by the one model builder (meta init -> LoRA -> SP -> AC ->
     compile -> FSDP2 -> each rank loads its own slices of the checkpoint), and its trainable modules
  4. one optimizer (optim.name, fastpost/optim.py) + LR schedule per trainable module (the recipe may override
     optim keys per module)
  5. EMA of the exported model's trainable weights
  6. checkpoint manager; resume restores 2-6 exactly, also at another world size or layout
  7. validation (optional): fastpost.sampling's sampler over the trained model itself, at step 0 and every N
The step: for each phase the recipe names, grad_accum micro-batches of loss + backward, then per optimizer
clip, a collective non-finite check (skip the update everywhere), step. Noise is keyed by the global batch index.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from fastpost.builder import ModelSpec, build_model, expert_spec, model_config
from fastpost.checkpoint import CheckpointConfig, CheckpointManager, resolve_resume
from fastpost.cluster import EXIT_DIVERGED, ClusterConfig, JobGuard, JobStop
from fastpost.config import from_dict, to_dict
from fastpost.data.checks import check_shards_for_model, pretrained_vae_config
from fastpost.data.loader import LoaderConfig, ShardLoader
from fastpost.data.text import with_id_token
from fastpost.distributed import ParallelDims, init_distributed
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.compile import CompileConfig
from fastpost.distributed.fsdp import FSDPConfig, apply_fsdp
from fastpost.distributed.offload import OffloadConfig
from fastpost.export import COMFY_LORA_FILE, export_lora, save_comfy_lora, save_transformer
from fastpost.lora import LoRAConfig
from fastpost.metrics import MetricsLogger, clip_grad_norm, peak_memory_mib
from fastpost.models import get_family
from fastpost.optim import build_optimizer
from fastpost.plan import PlanConfig
from fastpost.recipes import RecipeContext, get_recipe
from fastpost.validation import ValidationConfig, Validator


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1
    ulysses: int = 1
    ring: int = 1
    timeout_s: float = 1800.0  # collective timeout: a rank stuck this long fails the job instead of hanging it


@dataclass
class ModelConfig:
    family: str = "cogvideox"
    # random init only (no pretrained; None: the family's default, its tiny "debug" config). With pretrained the
    # checkpoint's own config.json and scheduler/ are the truth; a flavor that contradicts them is an error
    flavor: str | None = None
    pretrained: str | None = None  # local diffusers pipeline or transformer directory
    init_seed: int = 0  # seeds random init when there is no pretrained checkpoint (and the LoRA init)
    attention_backend: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # stored weights (fsdp.param_dtype computes)
    variant: str | None = None  # diffusers weight variant, e.g. fp16 -> diffusion_pytorch_model.fp16.safetensors
    allow_pickle: bool = False  # accept pickled .bin weights (they can run code when loaded)
    # two-expert pipelines (Wan 2.2 A14B): the expert this job trains, high_noise (transformer/) or low_noise
    # (transformer_2/); training times are drawn only from its noise levels. both: one job trains both, each step
    # the expert that owns that step's drawn time (recipe finetune)
    expert: Literal["high_noise", "low_noise", "both"] | None = None
    # LoRA: the frozen block linears stored in float8_e4m3fn / float8_e5m2 / bfloat16, upcast per layer to
    # fsdp.param_dtype (fastpost/storage.py); None: stored in dtype
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2", "bfloat16"] | None = None

    def spec(self, lora: LoRAConfig | None = None) -> ModelSpec:
        spec = ModelSpec(pretrained=self.pretrained, flavor=self.flavor, init_seed=self.init_seed, dtype=self.dtype,
                         variant=self.variant, lora=lora if lora is not None and lora.enabled else None,
                         allow_pickle=self.allow_pickle, storage_dtype=self.storage_dtype)
        return expert_spec(spec, self.expert)


@dataclass
class OptimConfig:
    # adamw | adamw8bit (8-bit moments) | prodigy (lr-free: set lr 1.0) | adamw_offload (moments on the host);
    # fastpost/optim.py
    name: Literal["adamw", "adamw8bit", "prodigy", "adamw_offload"] = "adamw"
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
    # the LoRA's identifier token the shards' captions were prepended with (preprocess `id_token`; checked against
    # their manifest); validation / sample prompts of this LoRA get it too: fastpost.data.text.with_id_token
    id_token: str | None = None
    recipe: str = "finetune"
    recipe_args: dict = field(default_factory=dict)  # the recipe's own Config, checked strictly
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ac: ACConfig = field(default_factory=ACConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)  # one GPU: block weights / block inputs on host
    compile: CompileConfig = field(default_factory=CompileConfig)  # regional torch.compile of the blocks
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(path=""))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # `fastpost plan`: target GPUs and clip size
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # sample videos during training


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
    def update(self, weight: torch.Tensor | float = 1.0) -> None:
        """shadow += (1 - decay) * weight * (p - shadow); weight 0 (a skipped step) leaves it, on the device."""
        from torch.distributed.tensor.experimental import implicit_replication

        w = (1 - self.decay) * weight
        with implicit_replication():  # a plain 0-dim weight next to DTensor shards
            for n, p in self.params.items():
                shadow = self.shadow[n]
                shadow.lerp_(p.detach(), w.to(shadow.dtype) if isinstance(w, torch.Tensor) else w)

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


def check_id_token(data_path: str, id_token: str | None) -> None:
    """The job's id_token must be the one the shards' captions were preprocessed with (when they record one)."""
    from fastpost.data import shards

    if not data_path or not (Path(data_path) / shards.MANIFEST).is_file():
        return  # the loader reports a missing folder
    made = shards.read_manifest(data_path)[0].get("config")
    if isinstance(made, dict) and made.get("id_token") != id_token:
        raise ValueError(f"the shards in {data_path} were preprocessed with id_token {made.get('id_token')!r} but "
                         f"this job sets id_token {id_token!r}: set the preprocessing job's id_token here "
                         f"(validation prompts get it too)")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # 1. process group and meshes
        self.rank, world = init_distributed(timeout_s=cfg.parallel.timeout_s)
        self.dims = ParallelDims(world_size=world, **{k: v for k, v in to_dict(cfg.parallel).items()
                                                      if k != "timeout_s"})
        self.dims.build_mesh()
        # the builder puts models on the mesh's device; batches follow them there (CPU: gloo, GPU: nccl)
        self.device = torch.device(self.dims.mesh.device_type if self.dims.mesh is not None else "cpu")
        self.out = Path(cfg.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        check_id_token(cfg.data.path, cfg.id_token)  # before the guard takes the output dir and signals
        self.guard = JobGuard(cfg.cluster, self.out, self.rank, self.device)  # output lock, die with launcher, signals
        self.family = get_family(cfg.model.family)
        # 2. data, checked against the model's config before any weight is read: a mismatch (family, VAE,
        # channels, text width / length / mask, frames) is one line in seconds, not after loading a 10B model
        if not cfg.data.path:
            raise ValueError("data.path is empty: point it at a latent shard folder written by `fastpost preprocess`")
        self.loader = self.guard.checked(lambda: ShardLoader.from_config(cfg.data, self.dims))  # collective
        check_shards_for_model(self.loader.dataset, self.family, model_config(self.family, cfg.model.spec()),
                               pretrained_vae_config(cfg.model.pretrained))
        # 3. recipe and its models (each through the one builder)
        recipe_cls = get_recipe(cfg.recipe)
        recipe_cfg = from_dict(recipe_cls.Config, cfg.recipe_args, where="recipe_args")
        self.extra_loaders: dict[str, ShardLoader] = {}  # a recipe's own loaders (ctx.open_loader), checkpointed
        ctx = RecipeContext(self.family, self.dims, cfg, build=self._build, spec=cfg.model.spec(cfg.lora),
                            build_module=self._build_module, open_loader=self._open_loader)
        self.recipe = recipe_cls(recipe_cfg, ctx)
        self.trainables = self.recipe.trainables()
        self.model = self.recipe.export_model()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # 4. one optimizer and LR schedule per trainable module
        self.optimizers, self.schedulers, self.params, self._clip = {}, {}, {}, {}
        for name, t in self.trainables.items():
            o = from_dict(OptimConfig, {**to_dict(cfg.optim), **t.optim}, where=f"optim ({name})")
            self.params[name] = list(t.parameters().values())
            if not self.params[name]:
                raise ValueError(f"recipe {cfg.recipe!r}: trainable {name!r} has no parameter that requires grad")
            self.optimizers[name] = build_optimizer(self.params[name], o)
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name], lr_lambda(o, cfg.steps))
            self._clip[name] = o.grad_clip
        # 5. EMA
        self.ema = EMA(self.trainable, cfg.ema_decay) if cfg.ema_decay else None
        # 6. checkpoints
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.step = 0
        self.bad_steps = 0
        self.batches_seen = 0  # global micro-batches consumed (all dp ranks): keys the noise of the next one
        resume = resolve_resume(self.ckpt.root, cfg.checkpoint.resume)
        if resume is not None:
            self._load(resume)
        self.metrics = MetricsLogger(self.out, cfg.logging, self.rank, to_dict(cfg))
        # 7. validation videos: the sampler over this very (sharded) model; VAE / text encoder only when used
        self.validator = None
        if cfg.validation.every_steps:
            # a LoRA trained on id_token-prefixed captions is validated on prompts that carry the token too
            prompts = [with_id_token(p, cfg.id_token) for p in cfg.validation.prompts]
            self.validator = Validator(replace(cfg.validation, prompts=prompts), family=self.family, model=self.model, out_dir=self.out,
                                       rank=self.rank, device=self.device, pretrained=cfg.model.pretrained,
                                       flavor=cfg.model.flavor, allow_pickle=cfg.model.allow_pickle,
                                       metrics=self.metrics, ema=self.ema)

    def _build(self, spec: ModelSpec):
        cfg = self.cfg
        model, _ = build_model(self.family, spec, self.dims, ac=cfg.ac, fsdp=cfg.fsdp,
                               attention_backend=cfg.model.attention_backend, device=self.device,
                               offload=cfg.offload, compile=cfg.compile)
        return model

    def _build_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A recipe's own small trainable module: fp32, sharded (so its gradients are averaged) on the mesh."""
        return apply_fsdp(module.to(self.device), [], self.dims, FSDPConfig())

    def _open_loader(self, name: str, loader_cfg: LoaderConfig) -> ShardLoader:
        """A recipe's second loader (e.g. an image set), sharded like the main one and resumed with it."""
        if name in self.extra_loaders or name == "loader":
            raise ValueError(f"the recipe opened two loaders named {name!r}; give each its own name")
        self.extra_loaders[name] = self.guard.checked(lambda: ShardLoader.from_config(loader_cfg, self.dims))
        return self.extra_loaders[name]

    # ---- checkpoint state ------------------------------------------------------------------------------------
    def _modules(self) -> dict[str, tuple]:
        return {name: (t.module, self.optimizers[name]) for name, t in self.trainables.items()}

    def _tensors(self) -> dict[str, Any]:
        tensors = {"recipe": self.recipe.state_tensors()}
        if self.ema is not None:
            tensors["ema"] = self.ema.shadow
        return tensors

    def save(self) -> Path:
        extra = {"schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                 "loader": self.loader.state_dict(), "bad_steps": self.bad_steps, "batches_seen": self.batches_seen}
        if self.extra_loaders:
            extra["recipe_loaders"] = {n: loader.state_dict() for n, loader in self.extra_loaders.items()}
        return self.ckpt.save(self.step, self._modules(), self._tensors(), extra)

    def _load(self, path: Path) -> None:
        extra = self.ckpt.load(path, self._modules(), self._tensors())
        for name, state in extra["schedulers"].items():
            self.schedulers[name].load_state_dict(state)
        self.loader.load_state_dict(extra["loader"])
        saved = extra.get("recipe_loaders", {})
        if set(saved) != set(self.extra_loaders):
            raise ValueError(f"checkpoint {path} holds the positions of recipe loaders {sorted(saved)}, this job opens "
                             f"{sorted(self.extra_loaders)}: resume with the recipe settings that wrote it")
        for name, loader in self.extra_loaders.items():
            loader.load_state_dict(saved[name])
        self.step, self.bad_steps, self.batches_seen = extra["step"], extra["bad_steps"], extra["batches_seen"]
        if self.rank == 0:
            print(f"[fastpost] resumed from {path} at step {self.step}", flush=True)

    # ---- the loop ---------------------------------------------------------------------------------------------
    # No host-device sync between logging steps: losses, norms and the non-finite flag stay device tensors; the
    # update of a non-finite step is skipped on the device (fused AdamW's found_inf: weights, moments and its step
    # count untouched; the EMA's weight is zeroed; optimizers without a device-side skip read the flag once), and the host reads all of it once per logging step (`_flush`),
    # where it counts consecutive skipped steps and aborts past max_bad_steps. A skipped step still advances the LR
    # schedule and the recipe's after-step hook (as with torch.amp's GradScaler).
    def _any_rank_nonfinite(self, values: list[torch.Tensor]) -> torch.Tensor:
        """1.0 on every rank if any value on any rank is NaN/inf, else 0.0 (a device tensor; no host sync)."""
        bad = torch.stack([(~torch.isfinite(v.detach().float())).any() for v in values]).any().float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # nccl reduces device tensors only
        return bad

    def _mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        t = value.detach().to(torch.float64).reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(t)  # every SP peer holds the same value, so the world mean is the dp mean
            t /= dist.get_world_size()
        return t[0]

    def _update(self, phase: str, batches) -> tuple[dict[str, Any], torch.Tensor]:
        """One update of the phase's optimizers over grad_accum micro-batches: (metrics, non-finite flag)."""
        cfg, dims = self.cfg, self.dims
        for optimizer in self.optimizers.values():  # a phase's loss may reach other modules' parameters
            optimizer.zero_grad(set_to_none=True)
        total, samples, tokens, extra = None, 0, 0, {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)  # pinned by the prefetching loader on CUDA: the copy below does not block
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            index = self.batches_seen + micro * dims.dp + dims.dp_rank  # this micro-batch's global index
            loss, extra = self.recipe.loss(batch, batch_generator(cfg.seed, index), phase)
            (loss / cfg.grad_accum).backward()
            part = loss.detach().float() / cfg.grad_accum
            total = part if total is None else total + part
            samples += batch["latents"].shape[0]
            tokens += batch["latents"].shape[0] * self.family.video_tokens(self.model, batch["latents"].shape)
        self.batches_seen += cfg.grad_accum * dims.dp
        names = self.recipe.phase_trainables(phase)
        norms = {n: clip_grad_norm(self.params[n], self._clip[n]) for n in names}
        bad = self._any_rank_nonfinite([total, *norms.values()])
        for n in names:
            optimizer = self.optimizers[n]
            if optimizer.defaults.get("fused"):
                optimizer.found_inf = bad  # fused AdamW skips the whole update on the device where this is 1
                optimizer.step()
            elif not bool(bad):  # optimizers that cannot skip on the device (8-bit, offloaded, prodigy): one read
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.recipe.after_optimizer_step(phase, self.step)
        key = "" if phase == "train" else f"_{phase}"
        out: dict[str, Any] = {f"loss{key}": self._mean_over_dp(total), "samples": samples * dims.dp,
                               "tokens": tokens * dims.dp}
        for n, norm in norms.items():
            out["grad_norm" if n == "model" else f"grad_norm_{n}"] = norm
        for k, v in extra.items():
            out[f"{k}{key}"] = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
        return out, bad

    def train_step(self, batches) -> dict[str, Any]:
        """One training step: every phase the recipe names, then the LR schedules and the EMA. Values may be
        device tensors (read at the next flush); "skipped" is 1 where a non-finite value skipped an update."""
        metrics: dict[str, Any] = {}
        lrs = {n: s.get_last_lr()[0] for n, s in self.schedulers.items()}
        flags = []
        for phase in self.recipe.phases(self.step):
            out, bad = self._update(phase, batches)
            flags.append(bad)
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0) + v if k in ("samples", "tokens") else v
        skipped = torch.stack(flags).max()
        for scheduler in self.schedulers.values():
            scheduler.step()
        if self.ema is not None:
            self.ema.update(weight=1 - skipped)
        metrics.update({"lr" if n == "model" else f"lr_{n}": lr for n, lr in lrs.items()})
        metrics["skipped"] = skipped
        return metrics

    def _flush(self) -> None:
        """The one host sync: read every pending step's device values at once, track the run of non-finite
        steps (abort past max_bad_steps, on every rank alike: the flags are all-reduced), log the records."""
        pending, self._pending = self._pending, []
        keys = [(i, k) for i, (_, m) in enumerate(pending) for k, v in m.items() if isinstance(v, torch.Tensor)]
        if keys:
            values = torch.stack([pending[i][1][k].to(torch.float64).reshape(()) for i, k in keys]).tolist()
            for (i, k), v in zip(keys, values):
                pending[i][1][k] = v
        for step, m in pending:
            if m["skipped"]:
                self.bad_steps += 1
                if self.bad_steps > self.cfg.max_bad_steps:  # this step stops the job: it is not logged
                    self.metrics.close()
                    raise JobStop(EXIT_DIVERGED,
                                  f"{self.bad_steps} consecutive steps with a non-finite loss or gradient (up to "
                                  f"step {step}); lower optim.lr, check the data, or raise max_bad_steps", "diverged")
                m = {"skipped": 1.0, "bad_steps": float(self.bad_steps), "lr": m.get("lr", 0.0),
                     **{k: m[k] for k in ("step_time_s", "peak_mem_mib") if k in m}}
            else:
                self.bad_steps = 0
                m.pop("skipped")
            self.metrics.log(step, m)
            if "loss" in m:
                self._losses.append(m["loss"])

    def fit(self) -> list[float]:
        cfg = self.cfg
        batches = self.loader.forever()
        self._losses: list[float] = []
        self._pending: list[tuple[int, dict[str, Any]]] = []
        t_last = time.perf_counter()
        if self.validator is not None and self.step == 0:
            self.validator.run(self.step)  # the base model, for comparison
            t_last = time.perf_counter()
        while self.step < cfg.steps:
            # collective: a stop signal on any rank, or a bad shard among the next step's samples on any rank
            if self.guard.should_stop(lambda: self.loader.check_next(cfg.grad_accum)):
                self._flush()
                path = self.save()
                self.metrics.close()
                raise self.guard.preempted(self.step, path)
            metrics = self.train_step(batches)
            self.step += 1
            now = time.perf_counter()
            metrics.update(step_time_s=now - t_last, peak_mem_mib=peak_memory_mib())
            t_last = now
            self._pending.append((self.step, metrics))
            saving = bool(cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
                          and self.step < cfg.steps)
            if saving or self.step % cfg.logging.every_steps == 0 or self.step == cfg.steps:
                self._flush()
            if saving and self.bad_steps == 0:  # saving mid-streak could rotate the last good checkpoint out
                self.save()
            if self.validator is not None and self.validator.due(self.step):
                self.validator.run(self.step)
                t_last = time.perf_counter()  # the next step's time is its own, not the validation's
        self._flush()
        self.save()
        self.export()
        self.metrics.close()
        return self._losses

    # ---- export -------------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """LoRA runs: diffusers-format LoRA weights (<out>/lora), and the same adapter for ComfyUI
        (<out>/lora/lora_comfyui.safetensors); full runs: a diffusers transformer folder
        (<out>/transformer), streamed tensor by tensor from the shards. With ema_decay set, the EMA weights go to
        <out>/lora_ema or <out>/transformer_ema."""
        path = self._export("")
        if self.ema is not None:
            with self.ema.swapped():
                self._export("_ema")
        return path

    def _export(self, suffix: str) -> Path:
        path = self._export_one(self.model, "lora", "transformer", suffix)
        # a recipe's further trained models (recipe.extra_exports(), e.g. a second expert): <out>/lora_<name> or
        # <out>/<name>, in the same formats
        for name, module in self.recipe.extra_exports().items():
            self._export_one(module, f"lora_{name}", name, suffix)
        return path

    def _export_one(self, model, lora_name: str, full_name: str, suffix: str) -> Path:
        if self.cfg.lora.enabled:
            path = self.out / f"{lora_name}{suffix}"
            export_lora(model, path, self.family.pipeline_class)
            save_comfy_lora(model, self.family, path / COMFY_LORA_FILE)
        else:
            path = self.out / f"{full_name}{suffix}"
            save_transformer(model, path)
        return path

    def close(self) -> None:
        self.guard.close()
        if dist.is_initialized():
            dist.destroy_process_group()
