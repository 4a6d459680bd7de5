"""Model families: name -> ModelFamily, discovered by module name and imported lazily.

A family lives in `fastpost/models/<name>.py` (or a package `fastpost/models/<name>/`) and defines a module-level
`FAMILY = ModelFamily(...)`. Nothing here lists families, so adding one touches only its own file; importing
this package imports no model code (diffusers is pulled in by the family module on first use).

What a family provides (everything the trainer, recipes and sampler need, and nothing parallel in the model):
  flavors          diffusers config dicts: "debug" (tiny, runs on CPU) plus the real sizes, for documentation and
                   for building a model without weights
  load()           diffusers from_pretrained (pipeline dir or bare transformer dir) or construction from a flavor
  blocks()         the FSDP / activation-checkpointing units
  parallelize()    (1) SP processors + split/gather hooks, (2) activation checkpointing, (3) FSDP2, in that order
  apply_sequence_parallel()  step (1) alone (sampling with SP and unsharded weights)
  predict()        the model call built from a latent-shard batch (latents [B,C,F,H,W] as the VAE produces them)
  prediction_type  what predict() returns: "v_prediction" (DDPM velocity, CogVideoX) or "flow_matching"
                   (noise - x0 at t = sigma * 1000, whatever the checkpoint's own convention is)
  scheduler_class / scheduler_configs / make_scheduler()  a diffusers scheduler consistent with predict()
  pipeline_class   the diffusers pipeline name (LoRA export through its save_lora_weights)
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

PREDICTION_TYPES = ("v_prediction", "flow_matching")


@dataclass(frozen=True)
class ModelFamily:
    name: str
    diffusers_class: type  # e.g. diffusers.CogVideoXTransformer3DModel
    block_class: type  # the transformer block class; one FSDP unit each
    pipeline_class: str  # name of the diffusers pipeline class (LoRA export: <pipeline>.save_lora_weights)
    flavors: Mapping[str, dict]  # flavor name -> diffusers config dict (kwargs of diffusers_class)
    prediction_type: str  # "v_prediction" | "flow_matching"
    scheduler_class: str  # name of a diffusers scheduler class
    scheduler_configs: Mapping[str, dict]  # flavor -> scheduler config; "default" is the fallback
    sequence_parallel_fn: Callable[..., Any]  # (model, dims, attention_backend) -> SPState: step 1 only
    video_tokens_fn: Callable[[Any, tuple], int]  # (model.config, latent shape BCFHW) -> video tokens per sample
    predict_fn: Callable[..., torch.Tensor]  # (model, noisy_BCFHW, timesteps_B, embeds_BTD, mask_BT) -> BCFHW
    default_flavor: str = "debug"
    blocks_attr: str = "transformer_blocks"
    notes: Mapping[str, Any] = field(default_factory=dict)  # free-form facts (text length, VAE class, ...)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{self.name}: prediction_type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        if self.default_flavor not in self.flavors:
            raise ValueError(f"{self.name}: default flavor {self.default_flavor!r} not in {sorted(self.flavors)}")

    # ---- construction -------------------------------------------------------------------------------------------
    def config(self, flavor: str | None = None) -> dict:
        flavor = flavor or self.default_flavor
        if flavor not in self.flavors:
            raise ValueError(f"model family {self.name!r} has no flavor {flavor!r}; known: {sorted(self.flavors)}")
        return dict(self.flavors[flavor])

    def load(self, pretrained: str | None = None, flavor: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        """The diffusers transformer: from `pretrained` (a pipeline dir or hub id -> its "transformer" subfolder,
        or a bare transformer dir) when given, else randomly initialised from the flavor's config (seed first)."""
        if pretrained is None:
            model = self.diffusers_class.from_config(self.config(flavor))
            return model if dtype == torch.float32 else model.to(dtype)
        path = Path(pretrained)
        if path.is_dir():
            if (path / "transformer" / "config.json").is_file():
                subfolder = "transformer"
            elif (path / "config.json").is_file():
                subfolder = None
            else:
                raise FileNotFoundError(
                    f"{pretrained} holds neither transformer/config.json (a pipeline) nor config.json (a transformer)")
        else:
            subfolder = "transformer"  # a hub id names a whole pipeline
        return self.diffusers_class.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=dtype)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(getattr(model, self.blocks_attr))

    # ---- parallelism and the model call -------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, dims, ac=None, fsdp=None, attention_backend: str = "auto") -> nn.Module:
        """The fixed order for every family: (1) SP processors + split/gather hooks, (2) activation checkpointing
        of the blocks, (3) FSDP2 per block, then the root. The hooks sit outside the checkpointed blocks, so the
        split runs once (not again in recompute); AC goes first so each FSDP unit is a checkpointed block."""
        from fastpost.distributed.activation_checkpoint import ACConfig, apply_activation_checkpointing
        from fastpost.distributed.fsdp import FSDPConfig, apply_fsdp

        self.apply_sequence_parallel(model, dims, attention_backend)
        blocks = self.blocks(model)
        apply_activation_checkpointing(blocks, ac or ACConfig())
        apply_fsdp(model, blocks, dims, fsdp or FSDPConfig())
        return model

    def apply_sequence_parallel(self, model: nn.Module, dims, attention_backend: str = "auto"):
        """Only step 1 of parallelize (SP processors + hooks, no AC/FSDP), e.g. for sampling with replicated
        weights. Returns the model's SPState."""
        return self.sequence_parallel_fn(model, dims, attention_backend)

    def video_tokens(self, model: nn.Module, latent_shape_BCFHW: tuple) -> int:
        """Video tokens per sample (the sequence SP splits) for latents of this shape."""
        return self.video_tokens_fn(model.config, tuple(latent_shape_BCFHW))

    def predict(self, model: nn.Module, noisy_latents_BCFHW: torch.Tensor, timesteps_B: torch.Tensor,
                prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict_fn(model, noisy_latents_BCFHW, timesteps_B, prompt_embeds_BTD, prompt_mask_BT)

    # ---- sampling ------------------------------------------------------------------------------------------------
    def scheduler_config(self, flavor: str | None = None) -> dict:
        return dict(self.scheduler_configs.get(flavor or self.default_flavor, self.scheduler_configs["default"]))

    def make_scheduler(self, flavor: str | None = None, **overrides):
        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        return cls.from_config({**self.scheduler_config(flavor), **overrides})


def _candidate_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _import_family(name: str) -> ModelFamily | None:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            return None
        raise
    family = getattr(module, "FAMILY", None)
    if family is None:
        return None
    if not isinstance(family, ModelFamily) or family.name != name:
        raise TypeError(f"{module.__name__}.FAMILY must be a ModelFamily named {name!r}, got {family!r}")
    return family


def available_families() -> list[str]:
    """Names of all importable families (imports every candidate module; get_family imports only one). A family
    whose module fails to import is left out here; get_family(its name) raises the import error itself."""
    names = []
    for name in _candidate_modules():
        try:
            if _import_family(name) is not None:
                names.append(name)
        except ImportError:
            continue
    return names


def get_family(name: str) -> ModelFamily:
    family = _import_family(name) if name.isidentifier() and not name.startswith("_") else None
    if family is None:
        raise ValueError(f"unknown model family {name!r}; known: {available_families()}")
    return family


__all__ = ["ModelFamily", "PREDICTION_TYPES", "available_families", "get_family"]
