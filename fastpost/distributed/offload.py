"""One-GPU offloading, per transformer block (the unit FSDP shards and AC checkpoints):

  blocks       the frozen weights of every block live in pinned host memory; a block's copy is streamed to the
               GPU on a side stream `prefetch` blocks ahead of its use (forward: i+1.., the recompute in backward:
               i-1..) and dropped when the block's forward ends. The idea of diffusers' group offloading, placed
               inside the checkpointed function, so the recompute in backward streams the block in again.
  activations  with full activation checkpointing, each block's inputs (the only activations it keeps) are copied
               to pinned host memory in forward and brought back, one block ahead, in backward. A reentrant
               checkpoint (`_OffloadedCheckpoint`) replaces torch's: torch's non-reentrant checkpoint holds its
               inputs in a closure that no saved-tensor hook reaches.

On CPU both are exact no-ops (a host copy of a host tensor is the tensor itself) that run the same code path; on one
GPU they trade PCIe traffic (weights once per forward and once per recompute; inputs once each way) for memory.
Neither works with FSDP sharding (several GPUs: use fsdp.cpu_offload, which moves the shards and the optimizer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclass
class OffloadConfig:
    blocks: bool = False  # frozen block weights in pinned host memory, streamed to the GPU ahead of use
    prefetch: int = 1  # blocks copied ahead of the one computing (1 or 2)
    activations: bool = False  # checkpointed block inputs in pinned host memory (needs ac.mode: full)

    def __post_init__(self):
        if self.prefetch not in (1, 2):
            raise ValueError(f"offload.prefetch must be 1 or 2 (blocks streamed ahead), got {self.prefetch}")

    @property
    def any(self) -> bool:
        return self.blocks or self.activations


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy (a host tensor is returned as is)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class _Stream:
    """A side stream for copies on CUDA; on CPU copies run inline (and are no-ops)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, tensors: list[torch.Tensor], to_host: bool) -> tuple[list[torch.Tensor], object]:
        if self.stream is None:
            return [t.to(self.device) if not to_host else t for t in tensors], None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # sources are ready
        with torch.cuda.stream(self.stream):
            out = [_host(t) if to_host else t.to(self.device, non_blocking=True) for t in tensors]
            if to_host:
                for t in tensors:
                    t.record_stream(self.stream)  # the device source lives until the copy is done
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def wait(self, tensors: list[torch.Tensor], event) -> None:
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            if t.device.type == "cuda":
                t.record_stream(current)  # allocated on the side stream, used on this one


class BlockOffloader:
    """Frozen block weights in host memory, streamed in per block. `install` wraps each block's forward (call it
    before activation checkpointing wraps it again, so the recompute streams too); `attach` moves the frozen weights
    to pinned host memory once they are loaded."""

    def __init__(self, blocks: Iterable[nn.Module], prefetch: int = 1):
        self.blocks, self.prefetch = list(blocks), prefetch
        self.frozen: list[list[tuple[nn.Module, str, torch.Tensor]]] = []
        self.pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.streams: _Stream | None = None

    def install(self) -> None:
        for i, block in enumerate(self.blocks):
            if getattr(block, "_fastpost_checkpointed", False):
                raise RuntimeError("install block offloading before activation checkpointing wraps the blocks")
            inner = block.forward

            @functools.wraps(inner)
            def forward(*args, _i=i, _inner=inner, **kw):
                self._enter(_i)
                try:
                    return _inner(*args, **kw)
                finally:
                    self._exit(_i)

            block.forward = forward

    def attach(self, device: torch.device) -> None:
        self.streams = _Stream(device)
        self.frozen = []
        for block in self.blocks:
            entries = []
            for module in block.modules():
                for name, p in module._parameters.items():
                    if p is not None and not p.requires_grad:
                        host = p.detach().to("cpu")
                        if device.type == "cuda":
                            host = host.pin_memory()
                        module._parameters[name] = nn.Parameter(host, requires_grad=False)
                        entries.append((module, name, module._parameters[name]))
            self.frozen.append(entries)

    def _fetch(self, i: int) -> None:
        if 0 <= i < len(self.blocks) and i not in self.pending:
            self.pending[i] = self.streams.copy([p for _, _, p in self.frozen[i]], to_host=False)

    def _enter(self, i: int) -> None:
        if self.streams is None:
            raise RuntimeError("BlockOffloader.attach(device) was not called after the weights were loaded")
        self._fetch(i)
        copies, event = self.pending.pop(i)
        self.streams.wait(copies, event)
        # plain tensors, not the host Parameters: autograd saves these (GPU) objects for backward, and restoring
        # the host Parameters after forward must not change what it saved
        for (module, name, _), copy in zip(self.frozen[i], copies):
            module._parameters[name] = copy
        step = -1 if _in_backward() else 1  # the recompute in backward walks the blocks in reverse
        for k in range(1, self.prefetch + 1):
            self._fetch(i + step * k)

    def _exit(self, i: int) -> None:
        for module, name, host in self.frozen[i]:
            module._parameters[name] = host


class _OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant checkpoint of one block whose saved inputs live in host memory between forward and backward."""

    @staticmethod
    def forward(ctx, run, box, offloader, slot, anchor, *tensors):
        ctx.run, ctx.offloader, ctx.slot = run, offloader, slot
        ctx.needs = [t.requires_grad for t in tensors]
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        offloader.save(slot, list(tensors))
        with torch.no_grad():
            out = run(*tensors)
        flat, box["spec"] = tree_flatten(out)
        return tuple(flat)

    @staticmethod
    def backward(ctx, *grads):
        inputs = ctx.offloader.load(ctx.slot)
        inputs = [t.detach().requires_grad_(need) for t, need in zip(inputs, ctx.needs)]
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if ctx.cuda_rng is not None else []):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            with torch.enable_grad():
                out, _ = tree_flatten(ctx.run(*inputs))
        pairs = [(o, g) for o, g in zip(out, grads) if o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, None, *[t.grad if need else None for t, need in zip(inputs, ctx.needs)])


class ActivationOffloader:
    """Host copies of each checkpointed block's inputs, by slot (the block index); backward of block i starts
    bringing block i-1's inputs back."""

    def __init__(self, device: torch.device | None = None):
        self.streams = _Stream(device or torch.device("cpu"))
        self.saved: dict[int, tuple[list[torch.Tensor], object, list[torch.device]]] = {}
        self.loading: dict[int, tuple[list[torch.Tensor], object]] = {}

    def save(self, slot: int, tensors: list[torch.Tensor]) -> None:
        if tensors and tensors[0].device != self.streams.device:
            self.streams = _Stream(tensors[0].device)
        if slot in self.saved:
            raise RuntimeError(f"block {slot} ran forward twice before its backward; offload.activations keeps one "
                               f"set of inputs per block: run backward after each forward, or turn it off")
        host, event = self.streams.copy(tensors, to_host=True)
        self.saved[slot] = (host, event)
        self.loading.pop(slot, None)

    def _fetch(self, slot: int) -> None:
        if slot in self.saved and slot not in self.loading:
            host, event = self.saved[slot]
            if event is not None:
                event.synchronize()  # the device-to-host copy has landed
            self.loading[slot] = self.streams.copy(host, to_host=False)

    def load(self, slot: int) -> list[torch.Tensor]:
        self._fetch(slot)
        copies, event = self.loading.pop(slot)
        del self.saved[slot]
        self.streams.wait(copies, event)
        self._fetch(slot - 1)  # prefetch the previous block's inputs while this one recomputes
        return copies


_ANCHOR = torch.empty(0, requires_grad=True)


def checkpoint_offloaded(blocks: Iterable[nn.Module], offloader: ActivationOffloader) -> None:
    """Full activation checkpointing of every block with its inputs kept in host memory."""
    for slot, block in enumerate(blocks):
        if getattr(block, "_fastpost_checkpointed", False):
            raise RuntimeError(f"{type(block).__name__} is already checkpointed; apply activation checkpointing once")
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, _slot=slot, **kw):
            flat, spec = tree_flatten((args, kw))
            where = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
            # what `run` keeps (it lives on the autograd graph until backward) must not hold the device inputs
            skeleton = [None if isinstance(x, torch.Tensor) else x for x in flat]

            def run(*tensors):
                leaves = list(skeleton)
                for i, t in zip(where, tensors):
                    leaves[i] = t
                a, k = tree_unflatten(leaves, spec)
                return _inner(*a, **k)

            if not torch.is_grad_enabled():
                return _inner(*args, **kw)
            box: dict = {}  # forward records the output's structure here (apply returns flat tensors)
            # the anchor requires grad so that backward reaches this block even when no input does (a LoRA block
            # whose inputs come from frozen layers: only its own parameters need gradients)
            out = _OffloadedCheckpoint.apply(run, box, offloader, _slot, _ANCHOR, *[flat[i] for i in where])
            return tree_unflatten(list(out), box["spec"])

        block.forward = forward
        block._fastpost_checkpointed = True
