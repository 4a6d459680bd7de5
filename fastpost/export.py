"""Export trained weights from the (FSDP-sharded) training model, streamed tensor by tensor.

  export_lora       diffusers-format LoRA (`pytorch_lora_weights.safetensors`, adapter config as metadata)
  save_comfy_lora   the same adapter in ComfyUI's generic LoRA format: `diffusion_model.<ComfyUI module>.lora_down
                    .weight` / `.lora_up.weight` / `.alpha`, module names mapped by the family's comfy_names
  save_transformer  a diffusers transformer folder (config.json + safetensors shards + index); LoRA adapters are
                    fused into the base weights (W + scale B A), so the folder loads with no peft at all
  save_pipeline     a whole diffusers pipeline folder: the pretrained pipeline's other components linked or
                    copied, the fused transformer written in `dtype` (bf16 by default)

Every rank takes part (each tensor is all-gathered from its shards, one at a time); rank 0 alone writes, and at
most one output shard (max_shard_mb) is held in its memory. A file appears under its final name only when it
is complete, and the folder's index/config last, so an interrupted export is never taken for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from fastpost.builder import INDEX, WEIGHTS
from fastpost.lora import export_lora, lora_state_dict  # noqa: F401  (export_lora re-exported: exporters live here)

COMFY_LORA_FILE = "lora_comfyui.safetensors"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _lora_scalings(model: nn.Module) -> dict[str, float]:
    """module prefix -> LoRA scale (alpha / r) of its active adapter, for every peft LoRA layer."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: float(m.scaling[m.active_adapters[0]]) for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and m.active_adapters}


def fused_tensors(model: nn.Module):
    """(checkpoint key, full tensor) for the model's state, LoRA fused into its base weights. A collective:
    every rank must iterate it to the end; non-zero ranks get the same keys with the tensors as well."""
    scalings = _lora_scalings(model)
    for key, value in _fused(model, scalings):
        # float8-stored frozen weights (model.storage_dtype) leave as bfloat16: exact, and a merged LoRA delta
        # rounded back to float8 would be lost
        yield key, value.to(torch.bfloat16) if value.dtype in _FLOAT8 else value


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fused(model: nn.Module, scalings: dict):
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        full = _full(value)
        if ".lora_" not in key and ".base_layer." not in key:
            yield key, full
            continue
        prefix = key.split(".lora_")[0] if ".lora_" in key else key.split(".base_layer.")[0]
        slot = pending.setdefault(prefix, {})
        if ".base_layer." in key:
            slot[key.split(".base_layer.")[1]] = full  # "weight" / "bias"
        else:
            slot["A" if ".lora_A." in key else "B"] = full
        if {"weight", "A", "B"} <= set(slot) and ("bias" in slot or not _has_bias(model, prefix)):
            merged = slot["weight"].float() + scalings[prefix] * (slot["B"].float() @ slot["A"].float())
            yield f"{prefix}.weight", merged.to(torch.bfloat16 if slot["weight"].dtype in _FLOAT8
                                                else slot["weight"].dtype)
            if "bias" in slot:
                yield f"{prefix}.bias", slot["bias"]
            del pending[prefix]
    if pending:
        raise RuntimeError(f"LoRA layers without their base weights or adapters: {sorted(pending)[:3]}")


def _has_bias(model: nn.Module, prefix: str) -> bool:
    module = model.get_submodule(prefix)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(base, "bias", None) is not None


def save_transformer(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
                     max_shard_mb: int = 5000) -> Path:
    """Collective: write `model` (sharded or not, LoRA fused) as a diffusers transformer folder (rank 0)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    writer = _rank() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("diffusion_pytorch_model*")) + [out / "config.json"]:
            stale.unlink(missing_ok=True)  # an older export here must not mix with this one
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"diffusion_pytorch_model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / (name + ".part"), metadata={"format": "pt"})
            os.replace(out / (name + ".part"), out / name)
            files.append(name)
            weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, tensor in fused_tensors(model):
        if not writer:
            continue
        tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        shard[key] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= max_shard_mb * 2**20:
            flush()
    if writer:
        flush()
        if len(files) == 1:  # one file: the plain name diffusers looks for first
            os.replace(out / files[0], out / WEIGHTS)
        else:
            total = sum((out / f).stat().st_size for f in files)
            (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True))
        model.save_config(out)  # last: config.json marks the folder complete
    if dist.is_initialized():
        dist.barrier()
    return out


def save_comfy_lora(model: nn.Module, family, out_file: str | Path) -> Path | None:
    """Collective: the model's LoRA adapter as one ComfyUI LoRA file (rank 0 writes; returns its path there).
    ComfyUI applies W += alpha / rank * up @ down to its module of that name: alpha is the adapter's lora_alpha,
    so the scale equals peft's (alpha / r)."""
    from safetensors.torch import save_file

    layers = lora_state_dict(model)
    if _rank() != 0:
        return None
    config = model.peft_config["default"]
    out: dict[str, torch.Tensor] = {}
    for key, value in layers.items():  # peft keys: <module>.lora_A.weight / <module>.lora_B.weight
        module, kind = key.rsplit(".lora_", 1)
        name = f"diffusion_model.{family.comfy_name(module)}"
        out[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value.contiguous()
        if kind.startswith("A"):
            rank = value.shape[0]
            alpha = config.alpha_pattern.get(module, config.lora_alpha) if config.alpha_pattern else config.lora_alpha
            if config.use_rslora:  # peft scales by alpha / sqrt(r): express it as ComfyUI's alpha / r
                alpha = alpha * rank ** 0.5
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    path = Path(out_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path.with_name(path.name + ".part"), metadata={"format": "pt"})
    os.replace(path.with_name(path.name + ".part"), path)
    return path


def save_pipeline(model: nn.Module, pretrained: str | Path, out_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16, copy: bool = False) -> Path:
    """Collective: a complete diffusers pipeline folder: the fused transformer (in `dtype`) plus the other
    components of the `pretrained` pipeline folder, symlinked (or copied with copy=True)."""
    src, out = Path(pretrained), Path(out_dir)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src} is not a diffusers pipeline folder (no model_index.json); export the "
                                f"transformer alone with save_transformer")
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            if item.name in ("transformer", "model_index.json") or (out / item.name).exists():
                continue
            if copy:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
            else:
                (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    save_transformer(model, out / "transformer", dtype=dtype)
    if _rank() == 0:  # last: its presence marks the folder complete
        shutil.copy2(src / "model_index.json", out / "model_index.json")
    if dist.is_initialized():
        dist.barrier()
    return out
