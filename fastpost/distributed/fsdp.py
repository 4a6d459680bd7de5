"""FSDP2: fully_shard each transformer block, then the root, over the flattened dp_shard x sp mesh.

SP ranks must be in the sharding mesh: they hold different parts of the same sample's gradient, and FSDP's
mean-reduction over dp x sp is what turns the SP group's summed gradient (sp x the single-process one, see
ulysses.py) back into the true mean over samples. HSDP (dp_replicate > 1) shards within a replica group and
all-reduces across replicas.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from fastpost.distributed.parallel_dims import ParallelDims

# diffusers models return views of their output; fastpost never modifies a model output in place, which is the
# only case the warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FSDPConfig:
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype of unsharded params
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # False keeps params gathered between forward and backward (more memory)
    cpu_offload: bool = False


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], dims: ParallelDims, cfg: FSDPConfig) -> nn.Module:
    """Shard `model` in place (blocks first, root last) onto the mesh's device and return it; a no-op in a plain
    single process (no process group)."""
    mesh = dims.submesh("fsdp_hsdp") if dims.hsdp_enabled else dims.submesh("fsdp")
    if mesh is None:
        return model
    # model.storage_dtype (fastpost.storage) casts layer by layer itself: FSDP then keeps every parameter as stored
    stored = getattr(model, "_fastpost_storage_dtype", None) is not None
    if mesh.size() == 1 and (stored or cfg.param_dtype == cfg.reduce_dtype == "float32") and not cfg.cpu_offload:
        # One rank and nothing to cast or offload: FSDP would only add copies and hooks (measured: a 1-rank FSDP2
        # step 0.87x the plain loop on CPU). bf16 at world 1 keeps FSDP: it is the mixed-precision mechanism.
        # Either way the model ends up on the mesh's device (fully_shard moves the shards there itself); a model
        # still on the meta device is materialised there by the builder.
        if any(p.is_meta for p in model.parameters()):
            return model
        return model.to(mesh.device_type)
    # cast_forward_inputs=False: FSDP would cast *every* float input to param_dtype, timesteps included (bf16 turns
    # 999 into 1000; measured 6-21% output change on Mochi). Models cast latents/embeddings via compute_dtype().
    policy = MixedPrecisionPolicy(param_dtype=None if stored else DTYPES[cfg.param_dtype],
                                  reduce_dtype=DTYPES[cfg.reduce_dtype], cast_forward_inputs=False)
    model._fastpost_compute_dtype = DTYPES[cfg.param_dtype]
    kwargs = dict(
        mesh=mesh,
        mp_policy=policy,
        # pinned host memory needs an accelerator: CPUOffloadPolicy() fails on CPU-only machines
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy(),
    )
    blocks = list(blocks)
    # Backward starts with the last block, so resharding it after forward would only re-gather it at once. A model
    # that never runs backward (a frozen teacher, an EMA target) must reshard it, or it would stay gathered.
    trains = any(p.requires_grad for p in model.parameters())
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward and not (trains and last), **kwargs)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    return model


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: FSDP's param_dtype if sharded with mixed precision, else its weights'."""
    dtype = getattr(model, "_fastpost_compute_dtype", None)
    return dtype if dtype is not None else next(model.parameters()).dtype


def reshard_all(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit (no-op without FSDP).

    Needed after a forward-only pass of a model whose sharded weights are then changed in place (an EMA target):
    FSDP keeps the root unsharded after forward, expecting backward, and the next forward would reuse that
    stale gathered copy instead of gathering the updated shards.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
