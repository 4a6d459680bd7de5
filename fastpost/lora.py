"""LoRA via peft on diffusers transformers: injection before sharding, diffusers-format export and import.

Export writes `pytorch_lora_weights.safetensors` with keys `transformer.<module>.lora_A.weight`, the format
`Pipeline.load_lora_weights(dir)` and `transformer.load_lora_adapter(dir, prefix="transformer")` read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

LORA_FILE = "pytorch_lora_weights.safetensors"

# Each family names its own targets (ModelFamily.lora_target_modules); callers pass them to inject_lora. This is
# the fallback when neither the job nor the caller names any: the attention projections of any model whose blocks
# are `transformer_blocks[i].attn` / `.attn1` (anchored there: a bare "to_q" also matches Mochi's
# time_embed.pooler.to_q, measured).
GENERIC_TARGETS = r".*transformer_blocks\.\d+\.attn1?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)$"


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # a regex (peft matches it against full module names) or a list of module-name suffixes; None: the family's
    target_modules: str | list[str] | None = None
    init: str = "gaussian"  # peft init_lora_weights: "gaussian" (B = 0, so training starts at the base model)
    extra: dict = field(default_factory=dict)  # passed to peft.LoraConfig as is


def inject_lora(model: nn.Module, cfg: LoRAConfig, default_targets: str | list[str] | None = None,
                adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter (named "default") and freeze everything else. Call before parallelize().
    Targets: cfg.target_modules, else `default_targets` (pass family.lora_target_modules), else GENERIC_TARGETS.
    A second adapter (another `adapter_name`, e.g. a critic sharing the base) stays inactive: "default" runs."""
    from peft import LoraConfig

    targets = cfg.target_modules or default_targets or GENERIC_TARGETS
    lora_config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        init_lora_weights=True if cfg.init == "default" else cfg.init, **cfg.extra,
    )
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):  # diffusers PeftAdapterMixin keeps the model class (save_pretrained etc.)
        model.add_adapter(lora_config, adapter_name=adapter_name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config, model, adapter_name=adapter_name)
    if adapter_name != "default":
        set_active_adapter(model, "default")
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ValueError(f"LoRA target_modules {targets!r} matched no module of {type(model).__name__}")
    return model


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Switch which LoRA adapter runs by peft's flag alone: peft's set_adapter() also flips requires_grad, which
    FSDP2 has already captured in its unsharded parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = name


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict on rank 0 (empty elsewhere); a collective when the model is FSDP-sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        sd = model.state_dict()
        return {k: v for k, v in sd.items() if not trainable_only or "lora_" in k}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft-format adapter weights (no ".default" adapter names) on rank 0; collective under FSDP."""
    from peft import get_peft_model_state_dict

    full = full_state_dict(model, trainable_only=True)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return get_peft_model_state_dict(model, state_dict=full)


def export_lora(model: nn.Module, out_dir: str | Path, pipeline_class: str | None) -> Path | None:
    """Write diffusers-format LoRA weights (rank 0); every rank must call it. Returns the file on rank 0.

    With a diffusers pipeline class its `save_lora_weights` writes the file; a family without one (pyramid) gets
    the same layout written here: `transformer.`-prefixed keys, the adapter config as `lora_adapter_metadata`.
    """
    import diffusers

    layers = lora_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    out_dir = Path(out_dir)
    # The adapter config travels as safetensors metadata; without it a reload assumes alpha = rank and silently
    # rescales the adapter (measured: rank 4, alpha 8 trained at scale 2.0, reloaded at 1.0).
    metadata = model.peft_config["default"].to_dict()
    if pipeline_class:
        getattr(diffusers, pipeline_class).save_lora_weights(out_dir, transformer_lora_layers=layers,
                                                             transformer_lora_adapter_metadata=metadata)
        return out_dir / LORA_FILE
    from safetensors.torch import save_file

    packed = {f"transformer.{k}": v.contiguous() for k, v in layers.items()}
    meta = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (LORA_FILE + ".part")
    save_file(packed, tmp, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, out_dir / LORA_FILE)  # a killed export never leaves a file that looks complete
    return out_dir / LORA_FILE


def load_lora(model: nn.Module, lora_dir: str | Path) -> nn.Module:
    """Load diffusers-format LoRA weights into a diffusers transformer (for sampling or further training)."""
    path = Path(lora_dir)
    if not (path / LORA_FILE).is_file():
        raise FileNotFoundError(f"no {LORA_FILE} in {str(path)!r}; pass a directory written by "
                                f"fastpost's LoRA export or diffusers' save_lora_weights")
    model.load_lora_adapter(str(path), prefix="transformer", weight_name=LORA_FILE)
    return model
