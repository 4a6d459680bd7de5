#!/usr/bin/env python
"""Per-rank parameter, gradient and optimizer-state bytes under FSDP2 vs 1/N of the single-process total.

    python benchmarks/bench_fsdp_memory.py       # CPU gloo, world 2 and 4 (~40 s on 2 cores)

Everything is measured from the tensors themselves after one AdamW step (grads still held): the local shards of
the parameters (DTensor.to_local()), of their gradients, and of AdamW's exp_avg / exp_avg_sq / step. The
prediction is FSDP2's sharding rule: every parameter is split on dim 0 like torch.chunk, so rank r holds
min(c, max(0, d0 - r*c)) rows with c = ceil(d0 / N) (the tail ranks of a short dim 0 hold less, or nothing), and
each rank *allocates* c rows (the padded "ceil shard", so the reduce-scatter is even). AdamW's two moments have
the parameters' local shapes; its `step` counters are 4-byte scalars replicated on every rank.

Models: diffusers MochiTransformer3DModel, the "debug" flavor (3 heads: dim 0 of 3, 24, ... splits unevenly) and
a wider one where the replicated scalars are negligible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import fmt_bytes, machine_line, markdown_table
from torch.distributed.tensor import DTensor

from fastpost.distributed import ParallelDims
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.models import get_family
from tests._harness import run_distributed

MODELS = {
    "mochi debug": {},
    "mochi wide": {"num_attention_heads": 6, "attention_head_dim": 32, "num_layers": 4,
                   "pooled_projection_dim": 96, "text_embed_dim": 64, "max_sequence_length": 16},
}


def model_config(name: str) -> dict:
    return {**get_family("mochi").config("debug"), **MODELS[name]}


def chunk_rows(d0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 length d0 that FSDP2 (torch.chunk) gives rank `rank` of `world`."""
    c = math.ceil(d0 / world)
    return min(c, max(0, d0 - rank * c))


def predicted_bytes(shapes: dict[str, tuple[int, ...]], elem: int, world: int, rank: int) -> dict:
    """What rank `rank` should hold for parameters of these full shapes: local (chunk) and allocated (ceil) bytes."""
    local = alloc = 0
    for shape in shapes.values():
        rest = math.prod(shape[1:]) if len(shape) > 1 else 1
        d0 = shape[0] if shape else 1
        local += chunk_rows(d0, world, rank) * rest * elem
        alloc += math.ceil(d0 / world) * rest * elem
    return {"local": local, "alloc": alloc}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Bytes of this process's params, grads and optimizer state (local shards; storage = allocated bytes)."""
    params = [p for p in model.parameters()]
    out = {"params": sum(_local(p).numel() * p.element_size() for p in params),
           "params_alloc": sum(_local(p).untyped_storage().nbytes() for p in params),
           "grads": sum(_local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
           "moments": 0, "scalars": 0}
    for state in opt.state.values():
        for key, t in state.items():
            t = _local(t)
            out["scalars" if t.dim() == 0 else "moments"] += t.numel() * t.element_size()
    out["optim"] = out["moments"] + out["scalars"]
    out["total"] = out["params"] + out["grads"] + out["optim"]
    return out


def one_step(model, cfg: dict) -> torch.optim.Optimizer:
    fam = get_family("mochi")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg["in_channels"], 3, 8, 8, generator=g)
    embeds = torch.randn(1, 8, cfg["text_embed_dim"], generator=g)
    mask = torch.ones(1, 8, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pred = fam.predict_fn(model, x, torch.tensor([500.0]), embeds, mask)
    F.mse_loss(pred, torch.randn(pred.shape, generator=g)).backward()
    opt.step()  # grads are kept: the table counts params + grads + state at once, as between backward and step
    return opt


def build(cfg: dict, dims: ParallelDims):
    fam = get_family("mochi")
    torch.manual_seed(0)
    model = fam.diffusers_class.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return fam.parallelize(model, dims, ACConfig("none"), FSDPConfig()), shapes


def single_process(name: str) -> dict:
    cfg = model_config(name)
    model, shapes = build(cfg, ParallelDims())
    opt = one_step(model, cfg)
    return {**state_bytes(model, opt), "shapes": {k: list(v) for k, v in shapes.items()}}


def worker(rank: int, world: int, names: list[str], out_dir: str) -> None:
    dims = ParallelDims(world_size=world)  # all ranks shard (dp_shard = world)
    dims.build_mesh("cpu")
    results = {}
    for name in names:  # one spawn per world for all models: process start-up dominates on 2 cores
        cfg = model_config(name)
        model, _ = build(cfg, dims)
        opt = one_step(model, cfg)
        rows = [None] * world
        dist.all_gather_object(rows, state_bytes(model, opt))
        results[name] = rows
    if rank == 0:
        with open(os.path.join(out_dir, f"w{world}.json"), "w") as f:
            json.dump(results, f)


def measure(names: list[str], world: int) -> dict[str, list[dict]]:
    """{model name: per-rank byte counts} under FSDP2 at `world` (spawns gloo processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(worker, world, list(names), tmp)
        with open(os.path.join(tmp, f"w{world}.json")) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="*", default=[2, 4])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    print(machine_line())
    print("FSDP2 (fully_shard per block, then root), fp32 params, torch AdamW; bytes after one step, grads held.")
    torch.set_num_threads(1)
    rows, checks = [], []
    measured = {world: measure(args.models, world) for world in args.worlds}
    for name in args.models:
        ref = single_process(name)
        shapes = {k: tuple(v) for k, v in ref.pop("shapes").items()}
        n_params = sum(math.prod(s) for s in shapes.values())
        rows.append((name, 1, "-", fmt_bytes(ref["params"]), fmt_bytes(ref["grads"]), fmt_bytes(ref["optim"]),
                     fmt_bytes(ref["total"]), "-", "-", f"{n_params:,} params"))
        for world in args.worlds:
            per_rank = measured[world][name]
            for rank, r in enumerate(per_rank):
                pred = predicted_bytes(shapes, 4, world, rank)
                n_scalars = len(shapes) * 4  # AdamW's step counter, one fp32 scalar per parameter tensor
                exact = (r["params"] == pred["local"] and r["grads"] == pred["local"]
                         and r["moments"] == 2 * pred["local"] and r["scalars"] == n_scalars
                         and r["params_alloc"] == pred["alloc"])
                checks.append(exact)
                ideal = ref["total"] / world
                rows.append((name, world, rank, fmt_bytes(r["params"]), fmt_bytes(r["grads"]), fmt_bytes(r["optim"]),
                             fmt_bytes(r["total"]), fmt_bytes(ideal), f"{r['total'] / ideal:.3f}",
                             f"{'yes' if exact else 'NO'} (alloc {fmt_bytes(r['params_alloc'])})"))
    print()
    print(markdown_table(["model", "world", "rank", "params", "grads", "AdamW state", "total",
                          "single total / N", "total / ideal", "== chunk formula (param storage)"], rows))
    print("\n== chunk formula: params and grads == sum over tensors of chunk_rows(d0, N, rank) * prod(rest) * 4 B, "
          "AdamW moments == 2x that, step scalars == 4 B x tensors (replicated), and the parameter storage == "
          "ceil(d0/N) rows (FSDP2's padded shard).")
    print(f"all ranks match the formula: {all(checks)}")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
