"""Activation checkpointing (full, every-N, selective) gives the same gradients as none, with and without SP;
selective AC saves collective outputs so backward issues no extra all-to-all."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpost.distributed import ParallelDims
from fastpost.distributed.activation_checkpoint import ACConfig, apply_activation_checkpointing, checkpoint_module
from fastpost.models.toy import FLAVORS, ToyDiT
from tests._harness import run_distributed

MODES = ["none", "full", "every_n", "selective"]


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _grads(mode: str, dims: ParallelDims | None, tokens: int = 13):
    torch.manual_seed(0)
    model = ToyDiT(FLAVORS["debug"])
    g = torch.Generator().manual_seed(1)
    x, text, t = torch.randn(2, tokens, 4, generator=g), torch.randn(2, 5, 16, generator=g), torch.rand(2, generator=g)
    if dims is None:
        apply_activation_checkpointing(model.blocks, ACConfig(mode=mode, every_n=2))
    else:  # SP only (no FSDP) so gradients stay plain tensors
        from fastpost.distributed.ulysses import SPGroup, SPState, install_sequence_hooks

        state = SPState(SPGroup.from_dims(dims))
        for block in model.blocks:
            block.sp_state = state
        install_sequence_hooks(state, model.blocks[0], 0, model.final_norm)
        apply_activation_checkpointing(model.blocks, ACConfig(mode=mode, every_n=2))
    loss = (model(x, text, t) ** 2).mean()
    with OpCounter() as counter:
        loss.backward()
    # (the last block's text-stream MLP feeds nothing, so its params have no grad: None must match None)
    return {n: p.grad for n, p in model.named_parameters()}, counter.counts


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_checkpointing_modes_give_identical_gradients_single_process():
    ref, _ = _grads("none", None)
    for mode in MODES[1:]:
        grads, counts = _grads(mode, None)
        for n in ref:
            assert _same(grads[n], ref[n]), f"{mode}: gradient of {n} differs"
    # the modes really recompute: full AC re-runs the block matmuls in backward
    _, none_counts = _grads("none", None)
    _, full_counts = _grads("full", None)
    assert full_counts["aten.addmm"] > none_counts["aten.addmm"]


def _sp_worker(rank, world):
    dims = ParallelDims(ulysses=world, world_size=world)
    dims.build_mesh("cpu")
    ref, ref_counts = _grads("none", dims)
    a2a = "_c10d_functional.all_to_all_single"
    for mode in MODES[1:]:
        grads, counts = _grads(mode, dims)
        for n in ref:
            assert _same(grads[n], ref[n]), f"rank {rank} {mode}: gradient of {n} differs"
        if mode == "selective":  # all-to-all outputs are saved, not re-communicated
            assert counts[a2a] == ref_counts[a2a], (counts[a2a], ref_counts[a2a])
        if mode == "full":
            assert counts[a2a] > ref_counts[a2a], (counts[a2a], ref_counts[a2a])


def test_checkpointing_modes_give_identical_gradients_with_sp():
    run_distributed(_sp_worker, 2)


def test_bad_ac_config_and_double_apply():
    model = ToyDiT(FLAVORS["debug"])
    with pytest.raises(ValueError, match="unknown activation checkpointing mode 'sometimes'"):
        apply_activation_checkpointing(model.blocks, ACConfig(mode="sometimes"))
    checkpoint_module(model.blocks[0])
    with pytest.raises(RuntimeError, match="already checkpointed"):
        checkpoint_module(model.blocks[0])
