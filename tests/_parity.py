"""Parity checks of a model family's parallel model against the unmodified diffusers model (used by the tests).

Every check builds the same seeded model twice: a reference that stays plain diffusers (one process, full batch)
and a copy put through `family.parallelize` (or only its SP step). Each rank runs its dp slice of the batch; the
errors returned are max abs differences of outputs and of every parameter gradient (or parameter, after
training), compared on every rank. Call from inside an initialised process group (tests/_harness.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.distributed.parallel_dims import ParallelDims
from fastpost.models import ModelFamily


def dp_slice(t: torch.Tensor | None, dp_rank: int, dp: int) -> torch.Tensor | None:
    """This dp rank's contiguous share of a global batch (as the loader hands it out)."""
    if t is None:
        return None
    if t.shape[0] % dp:
        raise ValueError(f"batch of {t.shape[0]} does not split over dp={dp}")
    n = t.shape[0] // dp
    return t[dp_rank * n:(dp_rank + 1) * n]


@dataclass
class Batch:
    latents_BCFHW: torch.Tensor
    timesteps_B: torch.Tensor
    embeds_BTD: torch.Tensor
    mask_BT: torch.Tensor | None
    target_BCFHW: torch.Tensor

    def slice(self, dp_rank: int, dp: int) -> "Batch":
        return Batch(*(dp_slice(t, dp_rank, dp) for t in (self.latents_BCFHW, self.timesteps_B, self.embeds_BTD,
                                                          self.mask_BT, self.target_BCFHW)))


def make_model(family: ModelFamily, flavor: str, seed: int = 0) -> nn.Module:
    """The flavor's model with every parameter perturbed: diffusers zero-initialises some (Mochi's RoPE
    frequencies, adaLN gates), and a zero parameter would hide errors in the path it scales."""
    torch.manual_seed(seed)
    model = family.load(flavor=flavor)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    return (a - b).abs().max().item()


def forward_backward(family: ModelFamily, model: nn.Module, batch: Batch) -> torch.Tensor:
    pred = family.predict(model, batch.latents_BCFHW, batch.timesteps_B, batch.embeds_BTD, batch.mask_BT)
    F.mse_loss(pred, batch.target_BCFHW).backward()
    return pred.detach()


def reference(family: ModelFamily, flavor: str, batch: Batch, seed: int = 0):
    """(initial model, reference prediction, reference grads by name) in this process, plain diffusers."""
    model = make_model(family, flavor, seed)
    init = copy.deepcopy(model)
    pred = forward_backward(family, model, batch)
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    if max(g.abs().max().item() for g in grads.values() if g is not None) == 0:
        raise AssertionError("reference gradients are all zero: the check would be vacuous")
    return init, pred, grads


def parallel_errors(family: ModelFamily, init: nn.Module, ref_pred: torch.Tensor, ref_grads: dict,
                    dims: ParallelDims, batch: Batch, ac: str = "none", sp_only: bool = False,
                    diffusers_gc: bool = False, fsdp: FSDPConfig | None = None,
                    relative: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Errors of the parallel model vs the reference: {"output", "grad"} (max abs; over all parameters), and its
    grads. relative: ||diff|| / ||reference|| instead (for bf16 mixed precision, where max abs says little).

    sp_only: install only the SP processors and hooks (no FSDP); the SP group's summed gradient is then
    sp x the reference (every SP rank computes the full loss), so it is all-reduced and divided by sp.
    """
    model = copy.deepcopy(init)
    if sp_only:
        family.apply_sequence_parallel(model, dims)
    else:
        family.parallelize(model, dims, ACConfig(mode=ac), fsdp or FSDPConfig())
    if diffusers_gc:
        model.enable_gradient_checkpointing()
    local = batch.slice(dims.dp_rank, dims.dp)
    # the last block must see this rank's chunk only: guards against a check that passes because SP never ran
    seen = []
    hook = family.blocks(model)[-1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs.get("hidden_states", args[0] if args else None)).shape[1]),
        with_kwargs=True)
    pred = forward_backward(family, model, local)
    hook.remove()
    tokens = family.video_tokens(model, local.latents_BCFHW.shape)
    want = -(-tokens // dims.sp) if dims.sp_enabled and dims.mesh is not None else tokens
    if seen[0] != want:
        raise AssertionError(f"last block saw {seen[0]} video tokens, expected {want} ({tokens} over sp={dims.sp})")
    ref_local = dp_slice(ref_pred, dims.dp_rank, dims.dp)
    grads = {}
    for name, p in model.named_parameters():
        g = None if p.grad is None else _full(p.grad).float()
        if sp_only and g is not None and dims.sp_enabled:
            g = g.clone()
            dist.all_reduce(g, group=dims.submesh("sp").get_group())
            g /= dims.sp
        grads[name] = g
    if set(grads) != set(ref_grads):
        raise AssertionError(f"parameter names differ: {sorted(set(grads) ^ set(ref_grads))}")
    if relative:
        pairs = [(grads[n] if grads[n] is not None else torch.zeros_like(r), r)
                 for n, r in ref_grads.items() if r is not None]
        errors = {"output": ((pred.float() - ref_local).norm() / ref_local.norm()).item(),
                  "grad": (sum(((g - r) ** 2).sum() for g, r in pairs).sqrt()
                           / sum((r ** 2).sum() for _, r in pairs).sqrt()).item()}
    else:
        errors = {"output": (pred - ref_local).abs().max().item(),
                  "grad": max(_max_diff(grads[n], ref_grads[n]) for n in ref_grads)}
    return errors, grads


def train_export_errors(family: ModelFamily, flavor: str, dims: ParallelDims, batches: list[Batch],
                        eval_batch: Batch, out_dir: str, ac: str = "none") -> dict[str, float]:
    """Train the parallel and the reference model for len(batches) SGD steps, compare parameters; then gather a
    full state dict to rank 0, save_pretrained a fresh unwrapped model, reload it with diffusers' from_pretrained
    and compare its prediction with the parallel model's (errors reported on rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    ref = make_model(family, flavor)
    model = family.parallelize(copy.deepcopy(ref), dims, ACConfig(mode=ac), FSDPConfig())
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    # SGD + momentum at a small lr, not Adam: Adam divides by |grad|, turning 1e-9 rounding on near-zero gradients
    # into ~1e-4 parameter differences (measured 8.5e-5 after 3 AdamW steps, lr 1e-2), and a large lr amplifies
    # rounding chaotically (Mochi, lr 0.2: merely splitting the batch in two in ONE process gives 7.8e-5 after
    # 3 steps; lr 0.01: 6e-8). Neither would say anything about SP or FSDP.
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (ref, model)]
    for batch in batches:
        forward_backward(family, ref, batch)
        forward_backward(family, model, batch.slice(dims.dp_rank, dims.dp))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    params = {n: _full(p) for n, p in model.named_parameters()}
    moved = max((p - init[n]).abs().max().item() for n, p in ref.named_parameters())
    if moved < 1e-2:
        raise AssertionError(f"reference did not train (max update {moved})")
    errors = {"params_after_training": max(_max_diff(params[n], p.detach()) for n, p in ref.named_parameters())}

    with torch.no_grad():  # every rank runs the whole eval batch (SP collectives need all ranks)
        pred = family.predict(model, eval_batch.latents_BCFHW, eval_batch.timesteps_B, eval_batch.embeds_BTD,
                              eval_batch.mask_BT)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        fresh = family.load(flavor=flavor)
        fresh.load_state_dict(full)
        fresh.save_pretrained(Path(out_dir) / "transformer")
        loaded = family.diffusers_class.from_pretrained(out_dir, subfolder="transformer")
        with torch.no_grad():
            loaded_pred = family.predict(loaded, eval_batch.latents_BCFHW, eval_batch.timesteps_B,
                                         eval_batch.embeds_BTD, eval_batch.mask_BT)
        errors["exported_output"] = (loaded_pred - pred).abs().max().item()
        errors["exported_vs_reference_params"] = max(
            _max_diff(p.detach(), dict(ref.named_parameters())[n].detach()) for n, p in loaded.named_parameters())
    return errors


def precision_floor(family: ModelFamily, init: nn.Module, ref_pred: torch.Tensor, ref_grads: dict, batch: Batch,
                    dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Relative {"output", "grad"} errors of the plain model run in one process with weights in `dtype`: what the
    precision alone costs, the floor a parallel run in that precision is compared with."""
    model = copy.deepcopy(init).to(dtype)
    pred = forward_backward(family, model, batch)  # predict() casts latents/text to the weights' dtype
    pairs = [(p.grad.float() if p.grad is not None else torch.zeros_like(ref_grads[n]), ref_grads[n])
             for n, p in model.named_parameters() if ref_grads[n] is not None]
    return {"output": ((pred.float() - ref_pred).norm() / ref_pred.norm()).item(),
            "grad": (sum(((g - r) ** 2).sum() for g, r in pairs).sqrt()
                     / sum((r ** 2).sum() for _, r in pairs).sqrt()).item()}
