"""Model families: name -> ModelFamily, discovered by module name and imported lazily.

A family is the whole pipeline, typed. It lives in `fastpost/models/<name>.py` (or a package
`fastpost/models/<name>/`) and defines a module-level `FAMILY = ModelFamily(...)`. Nothing here lists families,
so adding one touches only its own file (plus tests, configs, docs); importing this package imports no model
code (diffusers is pulled in by the family module on first use). No module outside fastpost/models keeps a table
keyed by family name: they all read the family.

What a family provides (everything the trainer, recipes, data and sampler need, and nothing parallel in the model):
  transformer      diffusers_class / block_class / flavors (config dicts: "debug" runs on CPU, plus real sizes),
                   load(), blocks(), video_tokens(), voxels_per_token()
  vae              VaeSpec (fastpost.components): class, compression factors from a VAE config (so the frame
                   rule: temporal * k + 1), a tiny config; latent normalisation is read from the VAE config
  text             TextSpec: encoder/tokenizer classes, the prompt length key, the mask convention, padding
  scheduler        scheduler_class + scheduler_configs, scheduler_config(pretrained, flavor) (a checkpoint's own
                   scheduler/scheduler_config.json when there is one), make_scheduler(), default_sampler()
  noise_schedule() the training/ODE noise schedule (fastpost.noise) built from a scheduler config
  prediction_type  what predict() returns: "v_prediction" (DDPM velocity, CogVideoX) or "flow_matching"
                   (noise - x0 at t = sigma * 1000, whatever the checkpoint's own convention is)
  predict()        the model call built from a latent-shard batch (latents [B,C,F,H,W] as the VAE produces them)
  pipeline         PipelineFacts: what the diffusers pipeline defaults to (sampler, noise layout, fps, steps, ...)
  lora_targets     default LoRA target regex; conditioning: the inputs predict() is conditioned on
  image            ImageConditioning (I2V): which transformer configs take the first frame, the tensors made from
                   it (stored in the shards, passed to predict() as `cond`), and how they are encoded
  parallelize()    (1) SP processors + split/gather hooks, (2) activation checkpointing, (3) FSDP2, in that order
  apply_sequence_parallel()  step (1) alone (sampling with SP and unsharded weights)
  pipeline_class   the diffusers pipeline name (LoRA export through its save_lora_weights)
  pyramid          pyramidal families: a PyramidSpec (schedule conventions, packed model call, sampling defaults,
                   planning hooks) read by recipe pyramid_flow and the pyramidal sampler
  blocks_attr      one block list, or several in forward order (Flux: double- then single-stream blocks)
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn as nn

from fastpost.components import TextSpec, VaeSpec
from fastpost.noise import FlowMatchingSchedule, NoiseSchedule, VPSchedule

PREDICTION_TYPES = ("v_prediction", "flow_matching")


@dataclass(frozen=True)
class PipelineFacts:
    """What the family's diffusers pipeline does by default, which `fastpost sample` reproduces."""

    sampler: str  # default sampler (a name registered in fastpost.sampling)
    noise_layout: Literal["BFCHW", "BCFHW"] = "BCFHW"  # layout of the pipeline's randn draw: same seed, same noise
    fps: int = 16
    steps: int = 50
    guidance_scale: float = 5.0
    size: tuple[int, int, int] | None = None  # (height, width, frames); None: transformer sample_* x VAE factors


@dataclass(frozen=True)
class ImageConditioning:
    """Image-to-video: what a family's image-conditioned transformers take besides the text, made from the video's
    first frame. Preprocessing stores `fields` in the shards, the loader batches them under batch["cond"], and
    predict() receives them as `cond={field: tensor}`; `fastpost sample` makes them from `image=`."""

    fields: tuple[str, ...]  # tensor names in shards, batch["cond"] and predict's cond, e.g. ("image_latents",)
    applies: Callable[[Any], bool]  # (transformer config) -> whether that model takes an image (e.g. CogVideoX I2V)
    # (vae, image_B3HW in [-1, 1], num_frames (pixels), generator or None) -> {field: tensor [B, ...]}: the pipeline's
    # encoding of the image; generator None: the posterior mean (preprocessing: reproducible shards), else a sample
    # drawn from it like the diffusers pipeline draws (sampling: same seed, same numbers)
    encode: Callable[..., dict[str, torch.Tensor]]
    # training augmentation, applied once per sample at preprocessing: first frame + sigma * randn with
    # log(sigma) ~ N(mean, std) (None: the clean frame)
    train_noise_log_sigma: tuple[float, float] | None = None
    # an image encoder's embedding of the first frame (Wan 2.1 I2V: CLIP's penultimate hidden states), stored as
    # `embed_field` for the configs `embed_applies` accepts; encoder and processor come from a pipeline folder's
    # image_encoder/ and image_processor/ (fastpost.components.load_image_encoder)
    embed_field: str | None = None
    embed_applies: Callable[[Any], bool] | None = None
    embed: Callable[..., torch.Tensor] | None = None  # (encoder, processor, images: list of PIL) -> [B, N, D]
    encoder_class: str = "CLIPVisionModel"
    processor_class: str = "CLIPImageProcessor"


def _blocks_of(model: nn.Module, blocks_attr: str | tuple[str, ...]) -> list[nn.Module]:
    """The blocks of one block list, or of several in forward order (Flux: double-, then single-stream)."""
    names = (blocks_attr,) if isinstance(blocks_attr, str) else tuple(blocks_attr)
    return [block for name in names for block in getattr(model, name)]


def sequence_parallel_on_blocks(processor_fn: Callable[[nn.Module, Any], None], gather_attr: str,
                                blocks_attr: str | tuple[str, ...] = "transformer_blocks") -> Callable:
    """The SP step every family shares: one SPState for the model, `processor_fn(block, state)` on every block
    (also with SP off: the processors then run plain attention through fastpost's attention backends), and with
    SP on the hooks that split the video tokens entering block 0 and gather them entering `gather_attr`.
    `blocks_attr` may name several block lists (their blocks in forward order); the split is on the first block."""

    def apply(model: nn.Module, dims, attention_backend: str = "auto"):
        from fastpost.distributed.ulysses import SPGroup, SPState, install_sequence_hooks

        state = SPState(SPGroup.from_dims(dims), backend=attention_backend)
        blocks = _blocks_of(model, blocks_attr)
        for block in blocks:
            processor_fn(block, state)
        if state.sp is not None:
            # block 0 is called with keyword arguments, or positionally under diffusers' own gradient checkpointing
            install_sequence_hooks(state, blocks[0], split_arg="hidden_states",
                                   gather_module=getattr(model, gather_attr), seq_dim=1)
        return state

    return apply


@dataclass(frozen=True)
class ModelFamily:
    name: str
    diffusers_class: type  # e.g. diffusers.CogVideoXTransformer3DModel
    block_class: type | tuple[type, ...]  # the transformer block class(es); one FSDP / AC unit each
    pipeline_class: str  # name of the diffusers pipeline class (LoRA export: <pipeline>.save_lora_weights)
    flavors: Mapping[str, dict]  # flavor name -> diffusers config dict (kwargs of diffusers_class)
    prediction_type: str  # "v_prediction" | "flow_matching"
    scheduler_class: str  # name of a diffusers scheduler class
    scheduler_configs: Mapping[str, dict]  # flavor -> scheduler config; "default" is the fallback
    sequence_parallel_fn: Callable[..., Any]  # (model, dims, attention_backend) -> SPState: step 1 only
    video_tokens_fn: Callable[[Any, tuple], int]  # (model.config, latent shape BCFHW) -> video tokens per sample
    predict_fn: Callable[..., torch.Tensor]  # (model, noisy_BCFHW, timesteps_B, embeds_BTD, mask_BT) -> BCFHW
    vae: VaeSpec | None = None  # None: the family has no VAE of its own (latents come from elsewhere)
    text: TextSpec | None = None  # None: no text encoder of its own (prompt embeddings come from the shards)
    pipeline: PipelineFacts | None = None  # None: defaults from the prediction type (see pipeline_facts)
    scheduler_samplers: Mapping[str, str] = field(default_factory=dict)  # scheduler class -> default sampler
    lora_targets: str | None = None  # regex over module names; None: attention projections of the blocks
    conditioning: tuple[str, ...] = ("text",)  # the inputs predict() is conditioned on (I2V adds "image")
    image: ImageConditioning | None = None  # image-to-video models of the family (see takes_image)
    # regex renames (pattern, replacement) from diffusers module names to ComfyUI's native ones, for the
    # ComfyUI LoRA export; () keeps diffusers' names (ComfyUI families that load diffusers-named weights)
    comfy_names: tuple[tuple[str, str], ...] = ()
    # (transformer config mapping or None) -> the frame rate the model was trained at, where it differs by
    # version (CogVideoX 1.0: 8, 1.5: 16); None: the pipeline's fps
    training_fps_fn: Callable[[Any], int] | None = None
    default_flavor: str = "debug"
    # the block list(s): one attribute name, or several in forward order (Flux's double- then single-stream
    # blocks); blocks() concatenates them, so SP processors, AC and FSDP units cover every block
    blocks_attr: str | tuple[str, ...] = "transformer_blocks"
    # (t, h, w) latent voxels per video token when the caller patchifies outside the model and the config's
    # patch_size does not say it (Flux: patch_size 1, 2x2 latent patches packed as features); None: from config
    latent_patch: tuple[int, int, int] | None = None
    # pyramidal flow matching: a fastpost.models.pyramid.pyramid.PyramidSpec (the schedule conventions the model
    # was trained with, its packed-sequence model call); read by recipe pyramid_flow and the pyramidal sampler
    pyramid: Any = None
    notes: Mapping[str, Any] = field(default_factory=dict)  # free-form facts for people (not read by code)

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

    def training_fps(self, config: Any = None) -> int:
        """The frame rate the model was trained at (preprocessing's target_fps: family)."""
        if self.training_fps_fn is not None:
            return int(self.training_fps_fn(config))
        return int(self.pipeline_facts.fps)

    def comfy_name(self, module: str) -> str:
        """ComfyUI's name for a diffusers module path (see comfy_names)."""
        import re

        for pattern, replacement in self.comfy_names:
            module = re.sub(pattern, replacement, module)
        return module

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return _blocks_of(model, self.blocks_attr)

    # ---- parallelism and the model call -------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, dims, ac=None, fsdp=None, attention_backend: str = "auto",
                    compile=None) -> nn.Module:
        """The fixed order for every family: (1) SP processors + split/gather hooks, (2) activation checkpointing
        of the blocks, (3) FSDP2 per block, then the root. The hooks sit outside the checkpointed blocks, so the
        split runs once (not again in recompute); AC goes first so each FSDP unit is a checkpointed block."""
        from fastpost.distributed.activation_checkpoint import ACConfig, apply_activation_checkpointing
        from fastpost.distributed.compile import apply_compile
        from fastpost.distributed.fsdp import FSDPConfig, apply_fsdp

        self.apply_sequence_parallel(model, dims, attention_backend)
        blocks = self.blocks(model)
        apply_activation_checkpointing(blocks, ac or ACConfig())
        apply_compile(blocks, compile)  # (2b) regional compile: after AC, before FSDP (torchtitan's order)
        apply_fsdp(model, blocks, dims, fsdp or FSDPConfig())
        return model

    def apply_sequence_parallel(self, model: nn.Module, dims, attention_backend: str = "auto"):
        """Only step 1 of parallelize (SP processors + hooks, no AC/FSDP), e.g. for sampling with replicated
        weights. Returns the model's SPState."""
        return self.sequence_parallel_fn(model, dims, attention_backend)

    def video_tokens(self, model: nn.Module, latent_shape_BCFHW: tuple) -> int:
        """Video tokens per sample (the sequence SP splits) for latents of this shape."""
        return self.video_tokens_fn(model.config, tuple(latent_shape_BCFHW))

    def patch_sizes(self, config: Any) -> tuple[int, int, int]:
        """(frames, height, width) latent voxels per video token, from a transformer config whose patch_size is an
        int (+ optional patch_size_t) or a (t, h, w) tuple (Wan)."""
        if self.latent_patch is not None:
            return tuple(self.latent_patch)
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        p = get("patch_size")
        if isinstance(p, (tuple, list)):
            return tuple(int(v) for v in p)
        return int(get("patch_size_t", None) or 1), int(p), int(p)

    def voxels_per_token(self, config: Any) -> int:
        """Latent voxels one video token covers (patch_t * patch_h * patch_w), e.g. for MFU accounting."""
        return math.prod(self.patch_sizes(config))

    @property
    def lora_target_modules(self) -> str:
        from fastpost.lora import GENERIC_TARGETS

        return self.lora_targets if self.lora_targets is not None else GENERIC_TARGETS

    def predict(self, model: nn.Module, noisy_latents_BCFHW: torch.Tensor, timesteps_B: torch.Tensor,
                prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None, *,
                cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model's prediction; `cond`: the image conditioning tensors (self.image.fields, batch["cond"]) of an
        image-to-video model, passed to predict_fn as the keyword `cond` only when given (so text-to-video
        predict_fns keep their 5 arguments)."""
        if not cond:
            return self.predict_fn(model, noisy_latents_BCFHW, timesteps_B, prompt_embeds_BTD, prompt_mask_BT)
        if self.image is None:
            raise ValueError(f"model family {self.name!r} has no image-to-video models, but image conditioning "
                             f"{sorted(cond)} was given")
        return self.predict_fn(model, noisy_latents_BCFHW, timesteps_B, prompt_embeds_BTD, prompt_mask_BT,
                               cond=cond)

    # ---- conditioning --------------------------------------------------------------------------------------------
    def takes_image(self, config: Any) -> bool:
        """Whether the transformer with this config is image-to-video (needs `cond` from the first frame)."""
        return self.image is not None and config is not None and bool(self.image.applies(config))

    def conditioning_inputs(self, config: Any) -> tuple[str, ...]:
        """The inputs this transformer config is conditioned on: ("text",) or ("text", "image")."""
        return (*self.conditioning, "image") if self.takes_image(config) else tuple(self.conditioning)

    def takes_image_embed(self, config: Any) -> bool:
        """Whether this I2V config also takes an image encoder's embedding (image.embed_field)."""
        image = self.image
        return (self.takes_image(config) and image.embed_field is not None
                and (image.embed_applies is None or bool(image.embed_applies(config))))

    def cond_fields(self, config: Any) -> tuple[str, ...]:
        """The conditioning tensors predict() needs for this config (stored in the shards, batch["cond"])."""
        if not self.takes_image(config):
            return ()
        return (*self.image.fields, *((self.image.embed_field,) if self.takes_image_embed(config) else ()))

    @staticmethod
    def latent_channels(config: Any) -> int:
        """Channels of the video latents (the VAE's): out_channels, which I2V models' in_channels exceed by the
        channels of the image conditioning they concatenate."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        return int(get("out_channels", None) or get("in_channels"))

    # ---- scheduler, noise schedule, pipeline defaults --------------------------------------------------------------
    @staticmethod
    def _checkpoint_scheduler(pretrained: str | None) -> dict | None:
        if pretrained is None:
            return None
        path = Path(pretrained) / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def scheduler_config(self, pretrained: str | None = None, flavor: str | None = None) -> dict:
        """The scheduler config: with `pretrained` (a pipeline dir holding scheduler/scheduler_config.json) and no
        flavor, the checkpoint's own (what diffusers would use); else the flavor's ("default" as the fallback)."""
        raw = self._checkpoint_scheduler(pretrained) if flavor is None else None
        if raw is not None:
            return {k: v for k, v in raw.items() if not k.startswith("_")}
        return dict(self.scheduler_configs.get(flavor or self.default_flavor, self.scheduler_configs["default"]))

    def scheduler_class_name(self, pretrained: str | None = None, flavor: str | None = None) -> str:
        raw = self._checkpoint_scheduler(pretrained) if flavor is None else None
        return (raw or {}).get("_class_name") or self.scheduler_class

    def make_scheduler(self, flavor: str | None = None, **overrides):
        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        return cls.from_config({**self.scheduler_config(flavor=flavor), **overrides})

    def noise_schedule(self, scheduler_config: Mapping | None = None) -> NoiseSchedule:
        """The noise schedule predict() is trained on; VP alphas come from the scheduler config (default: the
        default flavor's)."""
        if self.prediction_type == "flow_matching":
            return FlowMatchingSchedule()
        import diffusers

        config = dict(scheduler_config) if scheduler_config is not None else self.scheduler_config()
        return VPSchedule(getattr(diffusers, self.scheduler_class).from_config(config).alphas_cumprod)

    @property
    def pipeline_facts(self) -> PipelineFacts:
        if self.pipeline is not None:
            return self.pipeline
        return PipelineFacts("ddim" if self.prediction_type == "v_prediction" else "flow_euler")

    def default_sampler(self, pretrained: str | None = None, flavor: str | None = None) -> str:
        """The sampler that runs the checkpoint's scheduler class (or the pipeline's default sampler)."""
        name = self.scheduler_class_name(pretrained, flavor)
        return self.scheduler_samplers.get(name) or self.pipeline_facts.sampler

    # ---- VAE and text ----------------------------------------------------------------------------------------------
    def require_vae(self) -> VaeSpec:
        if self.vae is None:
            raise ValueError(f"model family {self.name!r} has no VAE of its own; its latents come from elsewhere")
        return self.vae

    def require_text(self) -> TextSpec:
        if self.text is None:
            raise ValueError(f"model family {self.name!r} has no text encoder of its own; prompt embeddings come "
                             f"from the latent shards")
        return self.text

    def vae_factors(self, vae_config: Mapping) -> tuple[int, int]:
        """(spatial, temporal) compression of the family's VAE, read from its config."""
        return self.require_vae().factors(vae_config)


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


def family_for_vae(class_name: str | None) -> ModelFamily:
    """The family whose VAE is `class_name` (e.g. to preprocess with a VAE folder alone)."""
    matches = []
    for name in available_families():
        family = get_family(name)
        if family.vae is not None and family.vae.class_name == class_name:
            matches.append(family)
    if len(matches) != 1:
        known = sorted(get_family(n).vae.class_name for n in available_families() if get_family(n).vae)
        what = "no family uses" if not matches else f"{[f.name for f in matches]} all use"
        raise ValueError(f"{what} the VAE class {class_name!r} (known: {known}); set the model family explicitly")
    return matches[0]


def resolve_family(name: str | None, vae: str | Path):
    """The family named `name`, or else the one whose VAE class the `vae` folder (or pipeline folder) holds."""
    if name is not None:
        return get_family(name)
    path = Path(vae)
    path = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no VAE config.json in {str(path)!r}; pass a folder written by save_pretrained")
    return family_for_vae(json.loads((path / "config.json").read_text()).get("_class_name"))


def get_family(name: str) -> ModelFamily:
    family = _import_family(name) if name.isidentifier() and not name.startswith("_") else None
    if family is None:
        raise ValueError(f"unknown model family {name!r}; known: {available_families()}")
    return family


__all__ = ["ImageConditioning", "ModelFamily", "PREDICTION_TYPES", "PipelineFacts", "available_families",
           "family_for_vae", "get_family",
           "resolve_family",
           "sequence_parallel_on_blocks"]
