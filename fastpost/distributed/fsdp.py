"""FSDP2: fully_shard each transformer block, then the root, over the flattened dp_shard x sp mesh.

SP ranks must be in the sharding mesh: they hold different parts of the same sample's gradient, and FSDP's
mean-reduction over dp x sp is what turns the SP group's summed gradient (sp x the single-process one, see
ulysses.py) back into the true mean over samples. HSDP (dp_replicate > 1) shards within a replica group and
all-reduces across replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from fastpost.distributed.parallel_dims import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FSDPConfig:
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype of unsharded params
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # False keeps params gathered between forward and backward (more memory)
    cpu_offload: bool = False


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], dims: ParallelDims, cfg: FSDPConfig) -> nn.Module:
    """Shard `model` in place (blocks first, root last) and return it; a no-op in a plain single process."""
    mesh = dims.submesh("fsdp_hsdp") if dims.hsdp_enabled else dims.submesh("fsdp")
    if mesh is None:
        return model
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype]),
        # pinned host memory needs an accelerator: CPUOffloadPolicy() fails on CPU-only machines
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy(),
    )
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # backward starts with the last block, so resharding it after forward would only re-gather it at once
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    return model
