"""Activation checkpointing of transformer blocks: full, every-N-blocks, or op-level selective.

Applied by replacing each chosen block's `forward` with a checkpointed call of the original, so the module tree
and parameter names stay unchanged (state dicts, LoRA target names and FSDP units are unaffected). Apply before
FSDP, as parallelize functions do.

Selective: save the outputs of attention kernels and of collectives (all-to-all, all-gather), recompute
everything else (matmuls, norms, activations). Attention is the most expensive op to recompute at video
sequence lengths, and re-running a collective in backward would cost communication a second time. The attention
ops come from the backend registry (fastpost.attention: each backend names its kernels), so a backend auto picks
on a GPU (flash-attn 3 on H100) is saved too, and so is one registered later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


@dataclass
class ACConfig:
    mode: Literal["none", "full", "every_n", "selective"] = "none"
    every_n: int = 2  # with mode=every_n: checkpoint blocks 0, N, 2N, ...


def _save_ops() -> set:
    from fastpost.attention import resolve_ops, saved_attention_ops

    return saved_attention_ops() | resolve_ops(
        "_c10d_functional.all_to_all_single.default",
        "_c10d_functional.all_gather_into_tensor.default",
        "_c10d_functional.wait_tensor.default",
    )


def _selective_policy(save: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(functools.partial(_selective_policy, _save_ops()))


def checkpoint_module(module: nn.Module, selective: bool = False) -> nn.Module:
    """Make `module` recompute its activations in backward."""
    if getattr(module, "_fastpost_checkpointed", False):
        raise RuntimeError(f"{type(module).__name__} is already checkpointed; apply activation checkpointing once")
    inner = module.forward
    kwargs = {"use_reentrant": False}
    if selective:
        kwargs["context_fn"] = _selective_context

    @functools.wraps(inner)
    def forward(*args, **kw):
        return checkpoint(inner, *args, **kwargs, **kw)

    module.forward = forward
    module._fastpost_checkpointed = True
    return module


def apply_activation_checkpointing(blocks: Iterable[nn.Module], cfg: ACConfig) -> None:
    if cfg.mode == "none":
        return
    if cfg.mode not in ("full", "every_n", "selective"):
        raise ValueError(f"unknown activation checkpointing mode {cfg.mode!r}; use none, full, every_n or selective")
    if cfg.mode == "every_n" and cfg.every_n < 1:
        raise ValueError(f"ACConfig.every_n must be >= 1, got {cfg.every_n}")
    for i, block in enumerate(blocks):
        if cfg.mode == "every_n" and i % cfg.every_n != 0:
            continue
        checkpoint_module(block, selective=cfg.mode == "selective")
