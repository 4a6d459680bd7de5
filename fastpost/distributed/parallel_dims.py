"""ParallelDims: the one object that knows how the world is split.

world = dp_replicate x dp_shard x ring x ulysses, laid out in that order so the ulysses ranks are
adjacent (the all-to-all is the most bandwidth-hungry collective and should stay inside a node).

Named meshes (all views of one root DeviceMesh, built once, passed explicitly; no globals):
  sp          ring x ulysses          ranks that hold slices of the same sample's sequence
  ulysses     ulysses                 all-to-all seq <-> heads
  ring        ring                    K/V exchange
  dp          dp_replicate x dp_shard ranks that see different samples (the loader's world)
  fsdp        dp_shard x sp           parameter sharding; SP ranks must take part in the gradient
                                      reduction or gradients are wrong (measured: 6.6e-3 off)
  fsdp_hsdp   (dp_replicate, dp_shard x sp)  2D mesh handed to fully_shard for HSDP
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_MESH_DIMS = ("dp_replicate", "dp_shard", "ring", "ulysses")


@dataclass
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world after the other degrees
    ulysses: int = 1
    ring: int = 1
    world_size: int = 1
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _views: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "ulysses", "ring", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.dp_shard, int) or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(f"ParallelDims.dp_shard must be >= 1 or -1 (infer), got {self.dp_shard!r}")
        fixed = self.dp_replicate * self.ulysses * self.ring
        if self.dp_shard == -1:
            if self.world_size % fixed != 0:
                raise ValueError(
                    f"world_size={self.world_size} is not divisible by dp_replicate*ulysses*ring="
                    f"{self.dp_replicate}*{self.ulysses}*{self.ring}={fixed}; pick degrees whose product divides "
                    f"the number of processes"
                )
            self.dp_shard = self.world_size // fixed
        if fixed * self.dp_shard != self.world_size:
            raise ValueError(
                f"dp_replicate*dp_shard*ring*ulysses = {self.dp_replicate}*{self.dp_shard}*{self.ring}*"
                f"{self.ulysses} = {fixed * self.dp_shard} != world_size={self.world_size}; the degrees must "
                f"multiply to the number of processes (set dp_shard=-1 to infer it)"
            )

    # ---- degrees ------------------------------------------------------------------------------
    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.sp

    # ---- meshes -------------------------------------------------------------------------------
    def build_mesh(self, device_type: str | None = None) -> DeviceMesh | None:
        """Build the root mesh and its flattened views. Needs an initialised process group unless world 1."""
        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(
                    f"ParallelDims(world_size={self.world_size}) needs torch.distributed initialised; "
                    f"launch with torchrun or call fastpost.distributed.init_distributed() first"
                )
            return None  # plain single process: every parallel wrapper becomes a no-op
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims.world_size={self.world_size} but the process group has {dist.get_world_size()} ranks"
            )
        device_type = device_type or default_device_type()
        mesh = init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.ring, self.ulysses),
            mesh_dim_names=_MESH_DIMS,
        )
        # Flattened views are kept here (slicing them back out of the root is deprecated).
        views = {name: mesh[name] for name in _MESH_DIMS}
        views["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        views["sp"] = mesh["ring", "ulysses"]._flatten("sp")
        views["fsdp"] = mesh["dp_shard", "ring", "ulysses"]._flatten("fsdp")
        # HSDP wants a 2D (replicate, shard) mesh; with dp_replicate outermost the same rank layout holds.
        views["fsdp_hsdp"] = init_device_mesh(
            device_type, (self.dp_replicate, self.fsdp_size), mesh_dim_names=("dp_replicate", "fsdp")
        )
        self._mesh, self._views = mesh, views
        return mesh

    @property
    def mesh(self) -> DeviceMesh | None:
        return self._mesh

    def submesh(self, name: str) -> DeviceMesh | None:
        """A named view ('sp', 'ulysses', 'ring', 'dp', 'fsdp', 'fsdp_hsdp', 'dp_replicate'); None at world 1."""
        if self._mesh is None:
            return None
        if name not in self._views:
            raise KeyError(f"unknown mesh name {name!r}; known: {sorted(self._views)}")
        return self._views[name]

    def _local_rank(self, name: str) -> int:
        sub = self.submesh(name)
        return 0 if sub is None else sub.get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self._local_rank("dp")

    @property
    def sp_rank(self) -> int:
        return self._local_rank("sp")

    @property
    def ulysses_rank(self) -> int:
        return self._local_rank("ulysses")

    @property
    def ring_rank(self) -> int:
        return self._local_rank("ring")


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (or as a 1-process group).

    Returns (rank, world_size). On GPU "cuda:nccl,cpu:gloo": device tensors go over nccl, and collectives on
    CPU tensors (FSDP's CPU offload, grad norms of offloaded grads) over gloo. gloo on CPU. `timeout_s`: a
    collective that waits longer fails the job with an error instead of hanging it. Idempotent.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a plain `python` run: any free port (two runs must not collide)
        os.environ["MASTER_PORT"] = str(free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size
