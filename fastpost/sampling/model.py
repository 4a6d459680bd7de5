"""The sampling model: the family's transformer, trained weights (a fastpost DCP checkpoint and/or a diffusers
LoRA, fused into the weights), applied to the model the builder made (replicated, SP processors installed)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastpost.config import from_dict
from fastpost.sampling.writer import SampleError


def resolve_checkpoint(path: str) -> Path:
    from fastpost.checkpoint import complete_checkpoints

    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    found = complete_checkpoints(p)
    if not found:
        raise SampleError(f"model.checkpoint {path!r} is neither a complete DCP checkpoint (step_XXXXXXXX with "
                          f".metadata) nor a folder holding one")
    return found[-1]


def load_training_checkpoint(model: torch.nn.Module, step_dir: Path, train_config: str | None,
                             lora_targets: str | None = None) -> bool:
    """Load the model part of a fastpost training checkpoint into a plain (unsharded) model; collective when a
    process group exists. LoRA runs save only adapter tensors: the adapter is injected first, with the run's
    LoRA config (rank/alpha/targets; the family's `lora_targets` when it names none) read from its config.yaml.
    Returns whether it was a LoRA checkpoint."""
    import yaml
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from fastpost.lora import LoRAConfig, inject_lora
    from fastpost.safe_load import dcp_load, read_dcp_metadata

    stored = {k[len("model."):] for k in read_dcp_metadata(step_dir / ".metadata").state_dict_metadata
              if k.startswith("model.")}
    if not stored:
        raise SampleError(f"checkpoint {str(step_dir)!r} holds no model state")
    is_lora = any("lora_" in k for k in stored)
    if is_lora:
        conf = Path(train_config) if train_config else step_dir.parent.parent / "config.yaml"
        if not conf.is_file():
            raise SampleError(f"{str(step_dir)!r} is a LoRA checkpoint; its run's config.yaml (for the LoRA rank, "
                              f"alpha and targets) is not at {str(conf)!r}: set model.train_config")
        run = yaml.safe_load(conf.read_text()) or {}
        inject_lora(model, from_dict(LoRAConfig, run.get("lora", {}), where="lora"), lora_targets)
    options = StateDictOptions(ignore_frozen_params=is_lora)
    state = get_model_state_dict(model, options=options)
    missing = sorted(set(state) - stored)
    if missing:
        raise SampleError(f"checkpoint {str(step_dir)!r} does not match the model (flavor/pretrained/LoRA): "
                          f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    dcp_load({"model": state}, step_dir)  # no unrestricted unpickling of a checkpoint someone handed over
    # strict=False: a LoRA state holds only the adapter; completeness was checked against `stored` above
    set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=is_lora, strict=False))
    if is_lora:  # fold the adapter into the weights: exact up to rounding, and no LoRA matmuls per step
        model.fuse_lora(lora_scale=1.0)
        model.unload_lora()
    return is_lora


def check_lora_dir(lora: str | None) -> None:
    from fastpost.lora import LORA_FILE

    if lora is not None and not (Path(lora) / LORA_FILE).is_file():
        raise SampleError(f"model.lora {lora!r} holds no {LORA_FILE}")


def apply_trained_weights(family, model: torch.nn.Module, m, checkpoint: Path | None) -> None:
    """The DCP training checkpoint (collective), then the diffusers-format LoRA; adapters fused into the weights."""
    from fastpost.lora import load_lora

    if checkpoint is not None:
        load_training_checkpoint(model, checkpoint, m.train_config, family.lora_target_modules)
    if m.lora is not None:
        load_lora(model, m.lora)
        model.fuse_lora(lora_scale=m.lora_scale)
        model.unload_lora()
