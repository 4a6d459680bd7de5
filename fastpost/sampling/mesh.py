"""The sampling layout: world = replicas x cfg x ulysses, as a ParallelDims and the process groups the loop uses.

ParallelDims(dp_replicate=replicas, dp_shard=cfg, ulysses=ulysses): the `dp_shard` mesh is the CFG group (rank 0
= uncond, 1 = cond), the `sp` mesh splits the video tokens, and each replica (`fsdp` mesh = cfg x sp ranks)
samples its own prompts (i % replicas). Weights are replicated (no FSDP: sampling holds no gradients or optimizer
state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastpost.distributed.parallel_dims import ParallelDims
from fastpost.sampling.writer import SampleError


def check_layout(cfg_degree: int, ulysses: int, world_size: int, guidance: float) -> int:
    """Returns the number of replicas; raises SampleError for layouts that cannot work."""
    c, u = cfg_degree, ulysses
    if c not in (1, 2):
        raise SampleError(f"parallel.cfg must be 1 or 2 (uncond and cond on separate rank groups), got {c}")
    if u < 1:
        raise SampleError(f"parallel.ulysses must be >= 1, got {u}")
    if world_size % (c * u):
        raise SampleError(f"parallel.cfg x parallel.ulysses = {c} x {u} = {c * u} does not divide the world size "
                          f"{world_size}; launch a multiple of {c * u} processes")
    if c == 2 and not guidance > 1:
        raise SampleError(f"parallel.cfg=2 runs uncond and cond apart, but guidance_scale={guidance} <= 1 "
                          f"disables classifier-free guidance; set parallel.cfg=1 or guidance_scale > 1")
    return world_size // (c * u)


@dataclass
class SamplingMesh:
    dims: ParallelDims
    device: torch.device
    rank: int  # global
    replicas: int
    replica_rank: int  # which replica this rank belongs to (its prompts: i % replicas == replica_rank)
    replica_group: object | None  # this replica's ranks (cfg x sp); None when the replica is one rank
    cfg_group: object | None  # the two CFG halves; None without CFG parallel
    cfg_rank: int  # 0 uncond, 1 cond
    is_leader: bool  # rank 0 of its replica: decodes and writes

    @classmethod
    def build(cls, cfg_degree: int, ulysses: int, guidance: float) -> "SamplingMesh":
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        replicas = check_layout(cfg_degree, ulysses, world, guidance)
        dims = ParallelDims(dp_replicate=replicas, dp_shard=cfg_degree, ulysses=ulysses, world_size=world)
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available()
                              else "cpu")
        dims.build_mesh(device.type)
        sub = dims.submesh
        cfg_group = sub("dp_shard").get_group() if cfg_degree > 1 else None
        return cls(
            dims=dims, device=device, rank=rank, replicas=replicas,
            replica_rank=sub("dp_replicate").get_local_rank() if replicas > 1 else 0,
            replica_group=sub("fsdp").get_group() if world > replicas else None,
            cfg_group=cfg_group,
            cfg_rank=sub("dp_shard").get_local_rank() if cfg_group is not None else 0,
            is_leader=sub("fsdp") is None or sub("fsdp").get_local_rank() == 0,
        )


def broadcast_tensor(t: torch.Tensor | None, group, device: torch.device) -> torch.Tensor:
    """A tensor from rank 0 of `group` (None: the world) to all its ranks; the others pass None."""
    src = dist.get_rank(group) == 0 if group is not None else dist.get_rank() == 0
    meta = [(tuple(t.shape), t.dtype) if src else None]
    dist.broadcast_object_list(meta, group=group, group_src=0)
    shape, dtype = meta[0]
    buf = t.to(device).contiguous() if src else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, group=group, group_src=0)
    return buf
