"""Frozen-weight storage: the frozen base of a LoRA run kept in float8 / bfloat16, upcast one layer at a time.

`model.storage_dtype` stores the frozen weight of every nn.Linear inside the transformer blocks (a LoRA target's
`base_layer` included) in float8_e4m3fn, float8_e5m2 or bfloat16. Each such layer upcasts its weight to the compute
dtype (fsdp.param_dtype) only for its own matmul, in forward and again in backward (the input gradient needs W), so
at most one layer's upcast copy exists at a time and autograd keeps the stored (small) weight, never the upcast one.

What stays in the compute dtype, as in diffusers' layerwise casting (hooks/layerwise_casting.py skips
"pos_embed", "patch_embed", "norm", "proj_in", "proj_out"): everything outside the blocks (patch and time
embeddings, the final norm and output projection) and every module named `*norm*` inside them (the AdaLN
modulation linears, whose outputs scale every activation). The trainable LoRA adapters keep model.dtype and
train against the upcast weights, so base + B @ A is exactly the function that was trained; a merged export
(export.fused_tensors) writes float8 bases upcast to bfloat16 before adding the adapter.

Under FSDP2 the parameters are sharded as stored: FSDP's mixed-precision policy then casts nothing
(param_dtype=None, fsdp.apply_fsdp), so the float8 shards are all-gathered as float8 (mixed dtypes in one unit
travel as bytes) and each layer upcasts its gathered weight; gradients are reduced in fsdp.reduce_dtype.
"""

from __future__ import annotations

import re
import types
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
                  "bfloat16": torch.bfloat16}
# module names that keep the compute dtype inside a block (diffusers' default skip list, block-local part)
KEEP = re.compile(r"norm")


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W stored low: W is upcast for the matmul and again for the input gradient; only the
    stored W is saved for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b, None


def _stored_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x, self.weight, self.bias, self._fastpost_compute_dtype)


def _cast(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    p = module._parameters[name]
    if p is not None and p.is_floating_point() and p.dtype != dtype:
        module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


def stored_linears(blocks: Iterable[nn.Module]) -> list[nn.Linear]:
    """The layers storage_dtype stores low: frozen nn.Linear inside the blocks, norms excepted (also what
    `fastpost plan` counts)."""
    out = []
    for block in blocks:
        for name, module in block.named_modules():
            weight = getattr(module, "weight", None)
            if type(module) is nn.Linear and not KEEP.search(name) and weight is not None and not weight.requires_grad:
                out.append(module)
    return out


def apply_storage(model: nn.Module, blocks: Iterable[nn.Module], storage: str, compute: torch.dtype) -> int:
    """Store the frozen block linears of `model` in `storage` (a STORAGE_DTYPES name) and every other frozen
    floating parameter in `compute`; trainable parameters are untouched. Works on meta or real weights (apply
    before FSDP and before loading: the loader casts each checkpoint tensor into its stored dtype). Returns the
    number of layers stored low."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"model.storage_dtype {storage!r} is not one of {sorted(STORAGE_DTYPES)}")
    dtype = STORAGE_DTYPES[storage]
    stored = 0
    for module in stored_linears(blocks):
        _cast(module, "weight", dtype)
        module._fastpost_compute_dtype = compute
        module.forward = types.MethodType(_stored_forward, module)
        stored += 1
    if stored == 0:
        raise ValueError("model.storage_dtype stores the frozen base of a LoRA run, but this model has no frozen "
                         "linear layer in its blocks (a full finetune trains them all): enable lora or unset "
                         "model.storage_dtype")
    for module in model.modules():  # the rest of the frozen model (biases of stored layers too) computes as is
        low = getattr(getattr(module, "forward", None), "__func__", None) is _stored_forward
        for name, p in list(module._parameters.items()):
            if p is not None and not p.requires_grad and not (low and name == "weight"):
                _cast(module, name, compute)
    model._fastpost_compute_dtype = compute
    model._fastpost_storage_dtype = dtype
    return stored


def storage_dtype(model: nn.Module) -> torch.dtype | None:
    return getattr(model, "_fastpost_storage_dtype", None)
