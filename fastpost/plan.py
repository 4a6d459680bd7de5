"""`fastpost plan`: predict a training job's per-GPU memory before renting the GPUs, and suggest the cheapest
change (Ulysses degree, activation checkpointing, storage dtype, optimizer, offload) that makes it fit.

The model is sized on the meta device (no weights): from model.pretrained's config.json when that folder exists on
this machine, else from the family's flavor named in `plan.flavor` (or model.flavor). The parts, per GPU:

  sharded state   every parameter in model.dtype over the FSDP group (dp_shard x sp); trainable ones also carry a
                  grad and two AdamW moments in the same dtype (LoRA: only the adapters); cpu_offload moves it off
  gathered        FSDP's unsharded copies in fsdp.param_dtype: the root module for the whole step + 2 blocks
                  (the one computing and the prefetched one) + one block's unsharded grads in reduce_dtype
  activations     bytes per token measured by running one real block forward+backward at small token counts and
                  reduced width on CPU (a saved-tensor hook sums the saved bytes), fitted as a*video + b*text + c
                  and scaled by the width ratio and the compute dtype. Per AC mode, for L blocks:
                    none       L x block
                    selective  L x (block inputs + attention outputs [+ Ulysses all-to-all outputs]) + 1 block
                    full       L x block inputs + 1 block (recomputed in backward)
  frozen models   a teacher / EMA target (full distillation): their sharded weights + gathered blocks
  optimizer step  AdamW's foreach temporaries (~ one copy of the trainable shard), after activations are freed;
                  the other optimizers step tensor by tensor (a few copies of the largest one)

One-GPU options (issue 22): model.storage_dtype (the frozen block linears at 1 or 2 bytes, the rest of the frozen
model in the compute dtype, one layer's upcast copy), optim.name (fastpost.optim.state_bytes: 8-bit moments,
Prodigy's 4 copies, adamw_offload's moments on the host), offload.blocks (1 + prefetch blocks' frozen weights
resident; needs AC, whose recompute streams them in again) and offload.activations (AC full: the block inputs on
the host, the current and the prefetched block's on the GPU).

Tokens per GPU: video tokens of (plan.height, plan.width, plan.frames) through the family's VAE factors and patch
sizes, split over sp, plus the text tokens every SP rank keeps."""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

GIB = 1024 ** 3
_SIZES = {"": GIB, "gib": GIB, "gb": 10 ** 9, "mib": 1024 ** 2, "mb": 10 ** 6, "tib": 1024 ** 4}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_STORAGE_BYTES = {"float8_e4m3fn": 1, "float8_e5m2": 1, "bfloat16": 2}
AC_ORDER = ("none", "selective", "full")


@dataclass
class PlanConfig:
    gpus: int = 1  # GPUs the job is planned for (the world size torchrun starts)
    gpu: str = "unspecified"  # the hardware the job was planned for, for people (e.g. "8x H100 80GB")
    gpu_memory: str = "80GiB"  # usable memory per GPU: "80GiB", "141GB", or a number of GiB
    # the family flavor that sizes the model when model.pretrained is not on this machine (planning on a laptop);
    # None: model.flavor, else the family's default
    flavor: str | None = None
    height: int = 480  # target clip size in pixels (what preprocessing writes)
    width: int = 720
    frames: int = 49


def parse_bytes(text: str | int | float) -> int:
    """'80GiB' / '141GB' / '512MiB' / 80 (GiB) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text * GIB)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZES:
        raise ValueError(f"gpu memory {text!r} is not a size; write e.g. 80GiB, 141GB or 80")
    return int(float(m.group(1)) * _SIZES[m.group(2).lower()])


# ---- model facts (meta device) ---------------------------------------------------------------------------------
def model_config(family, cfg) -> dict:
    """The transformer config: the checkpoint's when model.pretrained exists here, else the flavor's."""
    from fastpost.builder import read_config

    if cfg.model.pretrained and Path(cfg.model.pretrained).exists():
        return read_config(cfg.model.pretrained)
    return family.config(cfg.plan.flavor or cfg.model.flavor)


@dataclass(frozen=True)
class ModelFacts:
    total: int  # parameters
    trainable: int
    block: int  # parameters of the largest block
    block_trainable: int
    root: int  # parameters outside the blocks
    largest_trainable: int  # parameters of the largest trainable tensor
    blocks: int
    heads: int
    stored: int = 0  # parameters model.storage_dtype stores low (frozen block linears, fastpost.storage)
    block_stored: int = 0  # of the largest block
    largest_stored: int = 0  # the largest such layer (its upcast copy is live while it computes)
    trainable_shapes: tuple = ()  # shapes of the trainable tensors (optimizer state, fastpost.optim.state_bytes)


def model_facts(family, config: dict, lora) -> ModelFacts:
    from fastpost.config import to_dict

    lora_json = json.dumps(to_dict(lora), sort_keys=True, default=list) if lora is not None and lora.enabled else ""
    return _model_facts(family.name, json.dumps(config, sort_keys=True, default=list), lora_json)


@functools.lru_cache(maxsize=32)
def _model_facts(family_name: str, config_json: str, lora_json: str) -> ModelFacts:
    from fastpost.config import from_dict
    from fastpost.lora import LoRAConfig, inject_lora
    from fastpost.models import get_family

    family, config = get_family(family_name), json.loads(config_json)
    lora = from_dict(LoRAConfig, json.loads(lora_json)) if lora_json else None
    with torch.device("meta"):
        model = family.diffusers_class.from_config(config)
    if lora is not None and lora.enabled:
        inject_lora(model, lora, family.lora_target_modules)
    blocks = family.blocks(model)
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    sizes = [(sum(p.numel() for p in b.parameters()), sum(p.numel() for p in b.parameters() if p.requires_grad))
             for b in blocks]
    total = sum(p.numel() for p in model.parameters())
    from fastpost.storage import stored_linears

    stored = [[m.weight.numel() for m in stored_linears([b])] for b in blocks]
    return ModelFacts(stored=sum(map(sum, stored)), block_stored=max(map(sum, stored)),
                      largest_stored=max((n for b in stored for n in b), default=0),
                      trainable_shapes=tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad),
                      total=total, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      block=max(s[0] for s in sizes), block_trainable=max(s[1] for s in sizes),
                      root=total - in_blocks, blocks=len(blocks), heads=int(config["num_attention_heads"]),
                      largest_trainable=max((p.numel() for p in model.parameters() if p.requires_grad), default=0))


def vae_config(family, cfg) -> dict:
    """The VAE config: the pipeline's vae/config.json when present, else the VAE class's defaults (the real
    VAEs' compression; the debug flavors use the family's tiny VAE config)."""
    import diffusers

    if family.vae is None:  # the VAE is not fastpost's (pyramid_flux): its compression is a family fact
        return {}
    if cfg.model.pretrained and (Path(cfg.model.pretrained) / "vae" / "config.json").is_file():
        return json.loads((Path(cfg.model.pretrained) / "vae" / "config.json").read_text())
    params = inspect.signature(getattr(diffusers, family.vae.class_name).__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    flavor = cfg.plan.flavor or cfg.model.flavor or family.default_flavor
    return {**defaults, **(family.vae.debug_config if flavor.startswith("debug") else {})}


def sequence(family, config: dict, vae: dict, plan: PlanConfig) -> tuple[int, int]:
    """(video tokens, text tokens) per sample at the plan's clip size (pyramidal families: the longest packed
    sequence their recipe trains, see PyramidSpec.plan_sequence)."""
    if family.pyramid is not None and family.pyramid.plan_sequence is not None:
        return family.pyramid.plan_sequence(config, plan.height, plan.width, plan.frames)
    spatial, temporal = family.vae.factors_fn(vae)
    latent_frames = (plan.frames - 1) // temporal + 1
    p_t, p_h, p_w = family.patch_sizes(config)
    video = math.ceil(latent_frames / p_t) * (plan.height // spatial // p_h) * (plan.width // spatial // p_w)
    text = int(family.text.max_length(config) or 0) if family.text is not None else 0
    return video, text


# ---- activation bytes, measured on a narrow probe block ---------------------------------------------------------
def _probe_config(config: dict, heads: int) -> tuple[dict, float]:
    """The config at `heads` heads (head_dim kept, so attention runs the same kernel) and its width ratio."""
    scale = config["num_attention_heads"] / heads
    probe = {**config, "num_attention_heads": heads, "num_layers": 2, _text_key(config): 64}
    if "num_single_layers" in config:  # Flux: block 0 (double-stream) is measured; one single block suffices
        probe.update(num_single_layers=1, joint_attention_dim=64)
        probe.pop("text_embed_dim", None)
    if "pooled_projection_dim" in config:  # Mochi's text stream width inside the blocks
        probe["pooled_projection_dim"] = max(8, int(config["pooled_projection_dim"] / scale) // 8 * 8)
    for key in ("ffn_dim", "added_kv_proj_dim"):  # Wan's FFN and I2V image k/v widths follow the model width
        if config.get(key):
            probe[key] = max(8, int(config[key] / scale))
    for key in ("sample_height", "sample_width"):  # CogVideoX 1.5 RoPE slices a grid of this size
        if key in probe:
            probe[key] = max(probe[key], 64)
    if probe.get("out_channels") and probe.get("in_channels") != probe["out_channels"]:
        # an image-to-video config probes as its text-to-video twin: the image channels only widen the patch
        # embedding's input (weights count them, from the real config), CogVideoX-5b-I2V's learned positional
        # table would pin the probe to the model's own latent size, and Wan 2.1 I2V's CLIP branch (257 image
        # tokens per cross-attention, small next to the video's activations) needs inputs the probe does not make
        probe["in_channels"] = probe["out_channels"]
        for key in ("use_learned_positional_embeddings", "image_dim", "added_kv_proj_dim"):
            probe.pop(key, None)
    return probe, scale


def _text_key(config: dict) -> str:
    """The config key of the prompt embedding width (text_embed_dim; Wan: text_dim)."""
    from fastpost.data.checks import TEXT_WIDTH_KEYS

    return next((k for k in TEXT_WIDTH_KEYS if k in config), "text_embed_dim")


@functools.lru_cache(maxsize=32)
def _measure(family_name: str, config_json: str, video_grid: tuple[int, int, int], text: int,
             lora_json: str = "") -> tuple[float, ...]:
    """(saved bytes inside block 0, saved bytes outside the blocks, block 0's input bytes) of one fp32
    forward+backward of the probe model (with the job's LoRA: a frozen linear keeps no input for its weight)."""
    from fastpost.models import get_family

    family = get_family(family_name)
    config = {**json.loads(config_json)}
    if "max_text_seq_length" in config:  # CogVideoX 1.0's sincos table fixes the prompt length
        config["max_text_seq_length"] = text
    torch.manual_seed(0)
    model = family.diffusers_class.from_config(config)
    if lora_json:
        from fastpost.config import from_dict
        from fastpost.lora import LoRAConfig, inject_lora

        inject_lora(model, from_dict(LoRAConfig, json.loads(lora_json)), family.lora_target_modules)
    blocks = family.blocks(model)
    state = {"inside": False, "first": False, "block": 0, "outside": 0, "inputs": 0}
    # weights are saved for backward too (a matmul keeps W for the input's grad) but are not activations
    seen: set[int] = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            if not state["inside"]:
                state["outside"] += t.untyped_storage().nbytes()
            elif state["first"]:  # block 0 only (Mochi's last block is smaller: context_pre_only)
                state["block"] += t.untyped_storage().nbytes()
        return t

    def pre(module, args, kwargs):
        state["inside"], state["first"] = True, module is blocks[0]
        if module is blocks[0]:
            state["inputs"] = sum(a.nbytes for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)
                                  and a.is_floating_point() and a.dim() >= 3)

    def post(module, args, kwargs, out):
        state["inside"] = False

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    p_t, p_h, p_w = family.patch_sizes(config)
    f, h, w = video_grid
    if family.pyramid is not None and family.pyramid.probe is not None:  # its own model call (packed sequences)
        run = family.pyramid.probe(model, config, video_grid, text)
    else:
        channels = config["in_channels"]
        latents = torch.randn(1, channels, f * p_t, h * p_h, w * p_w)
        embeds = torch.randn(1, text, config[_text_key(config)])
        mask = torch.ones(1, text, dtype=torch.bool)
        run = lambda: family.predict(model, latents, torch.tensor([500]), embeds, mask)  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    out.float().square().mean().backward()
    for h_ in handles:
        h_.remove()
    return float(state["block"]), float(state["outside"]), float(state["inputs"])


@dataclass(frozen=True)
class ActivationModel:
    """Saved bytes at fp32 for one sample as a * video + b * text + c, for block 0, outside the blocks and block
    0's inputs (each a (a, b, c) triple), already scaled to the real width."""

    block: tuple[float, float, float]
    outside: tuple[float, float, float]
    inputs: tuple[float, float, float]

    @staticmethod
    def _eval(coef, video: float, text: float) -> float:
        return max(0.0, coef[0] * video + coef[1] * text + coef[2])

    def at(self, video: float, text: float) -> tuple[float, float, float]:
        return tuple(self._eval(c, video, text) for c in (self.block, self.outside, self.inputs))


def activation_model(family, config: dict, lora=None, probe_heads: int = 2) -> ActivationModel:
    from fastpost.config import to_dict

    probe, scale = _probe_config(config, min(probe_heads, config["num_attention_heads"]))
    key = json.dumps(probe, sort_keys=True, default=list)
    lora_json = json.dumps(to_dict(lora), sort_keys=True, default=list) if lora is not None and lora.enabled else ""
    grids = [((2, 4, 4), 8), ((4, 4, 4), 8), ((2, 4, 4), 16)]
    (b1, o1, i1), (b2, o2, i2), (b3, o3, i3) = [_measure(family.name, key, g, t, lora_json) for g, t in grids]
    v1, v2 = math.prod(grids[0][0]), math.prod(grids[1][0])
    t1, t3 = grids[0][1], grids[2][1]

    def fit(y1, y2, y3):
        a = (y2 - y1) / (v2 - v1)
        b = (y3 - y1) / (t3 - t1)
        return a * scale, b * scale, (y1 - a * v1 - b * t1) * scale

    return ActivationModel(block=fit(b1, b2, b3), outside=fit(o1, o2, o3), inputs=fit(i1, i2, i3))


# ---- the plan ---------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    parts: list[tuple[str, float]]  # (name, bytes per GPU)
    budget: int
    layout: str

    @property
    def total(self) -> float:
        return sum(b for _, b in self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def table(self) -> str:
        unit, scale = ("GiB", GIB) if self.budget >= GIB else ("MiB", 2 ** 20)
        rows = [f"  {b / scale:>10.2f} {unit}  {name}" for name, b in self.parts]
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join([f"layout: {self.layout}", *rows, f"  {self.total / scale:>10.2f} {unit}  total (peak per "
                          f"GPU) vs budget {self.budget / scale:.2f} {unit}: {verdict}"])


def _layout(cfg, world: int) -> tuple[int, int, int]:
    """(FSDP shard group size, sp degree, dp_shard) at this world size, as ParallelDims resolves them."""
    par = cfg.parallel
    sp = par.ulysses * par.ring
    fixed = par.dp_replicate * sp
    if world % fixed:
        raise ValueError(f"parallel: dp_replicate x ulysses x ring = {fixed} does not divide the {world} GPUs of "
                         f"plan.gpus (or --gpus); choose degrees whose product divides it")
    dp_shard = world // fixed if par.dp_shard == -1 else par.dp_shard
    if dp_shard * fixed != world:
        raise ValueError(f"parallel: dp_replicate x dp_shard x ulysses x ring = {dp_shard * fixed} != {world} GPUs")
    return dp_shard * sp, sp, dp_shard


def plan_job(cfg, world: int | None = None, device: str = "cuda") -> Plan:
    """Per-GPU peak memory of the TrainConfig `cfg` on plan.gpus GPUs (or `world`). device="cpu" predicts a CPU
    run (the validation): torch's AdamW is then the per-tensor loop, whose temporaries are two copies of the
    largest tensor instead of the foreach kernels' one copy of everything."""
    from fastpost.models import get_family
    from fastpost.optim import state_bytes

    family = get_family(cfg.model.family)
    world = world or cfg.plan.gpus
    shard, sp, dp_shard = _layout(cfg, world)
    config = model_config(family, cfg)
    facts = model_facts(family, config, cfg.lora)
    store, compute, reduce = (_BYTES[cfg.model.dtype], _BYTES[cfg.fsdp.param_dtype], _BYTES[cfg.fsdp.reduce_dtype])
    storage, offload, optim = cfg.model.storage_dtype, cfg.offload, cfg.optim.name
    if offload.any and world > 1:  # the builder's rules, so a plan never describes a job that cannot build
        raise ValueError(f"offload.blocks / offload.activations are for one GPU ({world} here); with several GPUs "
                         f"use fsdp.cpu_offload")
    if offload.activations and cfg.ac.mode != "full":
        raise ValueError("offload.activations offloads the inputs of fully checkpointed blocks: set ac.mode: full")

    low = _STORAGE_BYTES[storage] if storage else store
    frozen_bytes = compute if storage else store  # storage_dtype keeps the rest of the frozen model in compute
    # storage_dtype: FSDP keeps the stored dtypes and casts nothing, so one rank needs no FSDP at all
    fsdp_on = (shard > 1 or cfg.fsdp.param_dtype != "float32" or cfg.fsdp.reduce_dtype != "float32"
               or cfg.fsdp.cpu_offload) and not (storage and shard == 1 and not cfg.fsdp.cpu_offload)
    if offload.blocks and fsdp_on:
        raise ValueError("offload.blocks runs without FSDP, but FSDP would be applied for mixed precision: set "
                         "model.storage_dtype (per-layer casting) or fsdp.param_dtype: float32")
    on_gpu = 0.0 if cfg.fsdp.cpu_offload else 1.0
    parts: list[tuple[str, float]] = []
    weights = (facts.stored * low + (facts.total - facts.trainable - facts.stored) * frozen_bytes
               + facts.trainable * store)
    what = f"{storage} frozen block linears + " if storage else ""
    L = facts.blocks
    block_frozen = facts.block_stored * low + (facts.block - facts.block_trainable - facts.block_stored) * frozen_bytes
    if offload.blocks and cfg.ac.mode != "none":  # the recompute streams blocks in again: 1 + prefetch resident
        weights -= (L - 1 - offload.prefetch) * block_frozen
        what += f"block offload ({1 + offload.prefetch} of {L} blocks' frozen weights resident) + "
    parts.append((f"weights ({facts.total / 1e9:.2f}B params, {what}{cfg.model.dtype}, /{shard})",
                  on_gpu * weights / shard))
    on_gpu_state = 0.0 if optim == "adamw_offload" else on_gpu
    parts.append((f"optimizer state ({optim}, {facts.trainable / 1e6:.1f}M trainable"
                  f"{', on the host' if optim == 'adamw_offload' else ''})",
                  on_gpu_state * state_bytes(optim, facts.trainable_shapes, store) / shard))
    parts += [(f"second expert (model.expert: both): {n}", b) for n, b in parts[-2:] if cfg.model.expert == "both"]
    if storage:  # one stored layer upcast at a time (forward, and again for its input gradient)
        parts.append((f"per-layer upcast of the {storage} weights (1 layer)", facts.largest_stored * compute))
    extra_copies = int(bool(cfg.ema_decay))
    lora = cfg.lora.enabled
    frozen_models = 0
    if cfg.recipe == "distill":
        args = cfg.recipe_args
        if args.get("target", "ema") == "ema":
            extra_copies += 1 if lora else 0
            if not lora:
                frozen_models += 1
                parts.append(("EMA target model (frozen copy)", on_gpu * facts.total * store / shard))
        own = args.get("teacher") in (None, cfg.model.pretrained)
        if not (lora and own):
            frozen_models += 1
            parts.append(("teacher model (frozen)", on_gpu * facts.total * store / shard))
    if extra_copies:
        parts.append((f"EMA copies of the trainables (x{extra_copies})",
                      on_gpu * extra_copies * facts.trainable * store / shard))
    if fsdp_on:
        gathered = (facts.block_stored * low + (facts.block - facts.block_stored) * compute if storage
                    else facts.block * compute)  # storage_dtype: gathered as stored, upcast per layer
        parts.append((f"FSDP gathered: root + 2 blocks ({storage or cfg.fsdp.param_dtype}) + 1 block grads",
                      facts.root * compute + 2 * gathered + facts.block_trainable * reduce))
        if frozen_models:  # a frozen model runs its forward while the student's activations are held
            parts.append(("FSDP gathered for the frozen models' forward: root + 2 blocks",
                          facts.root * compute + 2 * facts.block * compute))
    video, text = sequence(family, config, vae_config(family, cfg), cfg.plan)  # activations of one micro-batch
    batch = cfg.data.batch_size
    tokens_video = video / sp
    act = activation_model(family, config, cfg.lora)
    block, outside, inputs = (x * batch * compute / 4 for x in act.at(tokens_video, text))
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    attn_out = batch * (tokens_video + text) * inner * compute * (1 + (4 if sp > 1 else 0))
    mode = cfg.ac.mode
    if mode == "none":
        acts = L * block
    elif mode == "full" and offload.activations:  # inputs on the host; the current + the prefetched on the GPU
        acts = 2 * inputs + block
    elif mode == "full":
        acts = L * inputs + block
    elif mode == "selective":
        acts = L * (inputs + attn_out) + block
    else:  # every_n: blocks 0, N, 2N, ... are checkpointed (full), the rest keep everything
        n_ckpt = math.ceil(L / cfg.ac.every_n)
        acts = n_ckpt * inputs + (L - n_ckpt) * block + block
    # grads fill up while backward frees the activations block by block: the peak is the larger of the two
    # ends (all activations + one block's grads, or all grads + AdamW's foreach temporaries of one more copy)
    grads = on_gpu * facts.trainable * store / shard
    block_grads = facts.block_trainable * store / shard
    act_end = acts + outside + block_grads
    largest = on_gpu * facts.largest_trainable * store / shard
    if optim == "adamw":  # foreach kernels: one copy of everything; torch's CPU loop: two of the largest tensor
        temporaries = grads if device == "cuda" else 2 * largest
    else:  # per-tensor steps: fp32 moments dequantised + update (8-bit), flattened copies (prodigy), host copy
        temporaries = {"adamw8bit": 6 * 4 / store, "prodigy": 3, "adamw_offload": 1}[optim] * largest
    opt_end = grads + temporaries
    parts.append((f"max(activations {act_end / GIB:.2f}, grads + {optim} step {opt_end / GIB:.2f}) GiB: "
                  f"AC {cfg.ac.mode}, {L} blocks, {batch}x({tokens_video:.0f} video/GPU + {text} text) tokens", max(act_end, opt_end)))
    budget = parse_bytes(cfg.plan.gpu_memory)
    layout = (f"{world} GPUs = dp_replicate {cfg.parallel.dp_replicate} x dp_shard {dp_shard} x sp {sp}; "
              f"FSDP over {shard} ranks; {video} video + {text} text tokens/sample at "
              f"{cfg.plan.height}x{cfg.plan.width}x{cfg.plan.frames}")
    return Plan(parts, budget, layout)


def suggest(cfg) -> tuple[str, Plan] | None:
    """The cheapest change that fits: activation checkpointing first (compute only), then a larger Ulysses degree
    (more communication), then (a LoRA on one GPU) fp8 storage, 8-bit AdamW and one-GPU offload, then CPU offload
    (slowest). None when nothing tried fits."""
    from copy import deepcopy

    world = cfg.plan.gpus
    sps = [d for d in range(1, world + 1) if world % (d * cfg.parallel.dp_replicate) == 0]
    tries = []
    for offload in (False, True):
        for sp in sps:
            for mode in AC_ORDER:
                tries.append((offload, sp, mode))
    one_gpu = world == 1 and cfg.lora.enabled
    for i, (offload, sp, mode) in enumerate(tries):
        if one_gpu and i == len(tries) // 2:  # one LoRA GPU: the issue-22 options before FSDP's CPU offload
            found = _suggest_one_gpu(cfg)
            if found is not None:
                return found
        c = deepcopy(cfg)
        c.parallel = replace(c.parallel, ulysses=sp, ring=1, dp_shard=-1)
        c.ac = replace(c.ac, mode=mode)
        c.fsdp = replace(c.fsdp, cpu_offload=offload)
        p = plan_job(c)
        if p.fits:
            change = f"parallel.ulysses={sp} ac.mode={mode}" + (" fsdp.cpu_offload=true" if offload else "")
            return change, p
    return None


def _suggest_one_gpu(cfg) -> tuple[str, Plan] | None:
    """fp8 base + 8-bit moments, then AC full, then the block inputs and then the blocks on the host (fastest
    first: FSDP's CPU offload, tried after these, moves every weight and the optimizer step to the host)."""
    from copy import deepcopy

    for mode, acts, blocks in (("selective", False, False), ("full", False, False), ("full", True, False),
                               ("full", True, True)):
        c = deepcopy(cfg)
        c.model = replace(c.model, storage_dtype="float8_e4m3fn")
        c.optim = replace(c.optim, name="adamw8bit")
        c.ac = replace(c.ac, mode=mode)
        c.offload = replace(c.offload, activations=acts, blocks=blocks)
        p = plan_job(c)
        if p.fits:
            change = f"model.storage_dtype=float8_e4m3fn optim.name=adamw8bit ac.mode={mode}"
            change += (" offload.activations=true" if acts else "") + (" offload.blocks=true" if blocks else "")
            return change, p
    return None


# ---- measuring a real step on CPU (validation) -------------------------------------------------------------------
class LiveTensorBytes:
    """Peak bytes of live tensor storage while active: every op output is counted once per storage and released
    when the last tensor viewing it dies (torch keeps a tensor's Python object alive while autograd holds it).
    CPU-only validation of the planner (there is no allocator counter on CPU)."""

    def __init__(self, existing: list[torch.Tensor] = ()):
        self.refs: dict[int, list] = {}
        self.current = self.peak = 0
        for t in existing:
            self._track(t)
        self.baseline = self.current

    def _track(self, t: torch.Tensor) -> None:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            t = t._local_tensor
        if t.device.type == "meta" or type(t).__name__ == "AsyncCollectiveTensor":
            return  # a wrapper of a collective's output, which was counted when the collective made it
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key:
            return
        if key not in self.refs:
            self.refs[key] = [0, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key][0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        counter._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Parameters, buffers, grads and optimizer state: what lives before a step starts."""
    out = [*model.parameters(), *model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def format_plan(cfg) -> str:
    plan = plan_job(cfg)
    lines = [f"job planned for: {cfg.plan.gpu}; checking {cfg.plan.gpus} GPU(s) of {cfg.plan.gpu_memory}", plan.table()]
    if not plan.fits:
        found = suggest(cfg)
        lines.append(f"cheapest change that fits: {found[0]} -> {found[1].total / GIB:.2f} GiB per GPU" if found
                     else "nothing tried fits (ulysses, AC, CPU offload): use more GPUs, a smaller clip or LoRA")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="fastpost plan", description="Predict a train job's per-GPU peak memory under "
                                "its FSDP / Ulysses / AC layout and suggest the cheapest change that fits.")
    p.add_argument("--config", required=True, help="train job file, e.g. configs/cogvideox/lora_5b.yaml")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (world size); default: the job's plan.gpus")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB; default: plan.gpu_memory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ac.mode=full plan.frames=81")
    args = p.parse_args(argv)
    from fastpost.config import ConfigError, load_config
    from fastpost.trainer import TrainConfig

    extra = [f"plan.gpus={args.gpus}"] if args.gpus else []
    extra += [f"plan.gpu_memory={args.gpu_memory}"] if args.gpu_memory else []
    try:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, *extra])
        text = format_plan(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"fastpost plan: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)
    raise SystemExit(0 if plan_job(cfg).fits else 1)
