#!/usr/bin/env python
"""Ulysses sequence parallelism on CPU gloo: step time vs world 1 on the same global work, and the all-to-all
bytes per attention layer, measured, against the analytic figure.

    python benchmarks/bench_sp.py                # world 1, 2, 4 (~60 s on 2 shared cores)

Work: fastpost's toy joint text+video DiT (models/toy.py), one sample of --tokens video tokens + --text text tokens,
forward + backward + AdamW. World 1 is a plain single process (parallelize() is a no-op); world P runs
ParallelDims(ulysses=P), i.e. SP over all P ranks + FSDP2 over them (which SP needs for correct gradients). Every
rank runs one thread, so world 4 oversubscribes a 2-core machine: read the scaling column with that in mind.

Bytes: a TorchDispatchMode counts the input bytes of every `_c10d_functional.all_to_all_single` op, separately in
forward and in backward (ops are counted below autograd, so the adjoint all-to-alls of backward are seen too).
Analytic, per rank and per attention layer, forward:

    a2a_bytes = 4 * N * h / P * elem      N = B * P * ceil(S/P)   (tokens, tail-padded to a multiple of P)
                                          h = P * ceil(H/P) * d   (hidden, heads zero-padded to a multiple of P)

= the q, k, v all-to-all (fastpost fuses the three into one call of 3*N*h/P elements) plus the output one (N*h/P).
That is the per-rank *send buffer*; (P-1)/P of it leaves the rank, the rest is the chunk a rank sends to itself.
Backward runs the adjoint all-to-alls: the same bytes again. Full AC re-runs the forward in backward, so its
backward moves 2x; selective AC saves the all-to-all outputs and moves 1x (fastpost's policy).
Text tokens are replicated: their output is all-gathered over heads (not an all-to-all, not counted here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import fmt_bytes, machine_line, markdown_table
from torch.utils._python_dispatch import TorchDispatchMode

from fastpost.distributed import ParallelDims
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.models.toy import ToyDiT, ToyDiTConfig, parallelize
from tests._harness import run_distributed

A2A = "_c10d_functional.all_to_all_single.default"


def a2a_bytes_per_layer(batch: int, seq: int, heads: int, head_dim: int, world: int, elem: int = 4) -> int:
    """Analytic per-rank all-to-all send bytes of one Ulysses attention layer's forward: 4 * N * h / P * elem."""
    n = batch * world * math.ceil(seq / world)
    h = world * math.ceil(heads / world) * head_dim
    return 4 * n * h // world * elem


class A2ACounter(TorchDispatchMode):
    """Counts calls and input bytes of functional all-to-alls while active."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == A2A:
            self.calls += 1
            self.bytes += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def make_data(cfg: ToyDiTConfig, batch: int, tokens: int, text: int):
    g = torch.Generator().manual_seed(1)  # identical on every rank: SP ranks share the sample
    x = torch.randn(batch, tokens, cfg.in_channels, generator=g)
    text_BTC = torch.randn(batch, text, cfg.text_dim, generator=g)
    return x, text_BTC, torch.rand(batch, generator=g), torch.randn(x.shape, generator=g)


def build(cfg: ToyDiTConfig, dims: ParallelDims, ac: str):
    torch.manual_seed(0)
    model = parallelize(ToyDiT(cfg), dims, ac=ACConfig(mode=ac), fsdp=FSDPConfig())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def worker(rank: int, world: int, cfg_kw: dict, batch: int, tokens: int, text: int, ac_modes: list,
           warmup: int, iters: int, out_dir: str) -> None:
    cfg = ToyDiTConfig(**cfg_kw)
    dims = ParallelDims(ulysses=world, world_size=world)
    if world > 1:
        dims.build_mesh("cpu")  # world 1: no mesh, parallelize() is a no-op (the single-device path)
    x, txt, t, target = make_data(cfg, batch, tokens, text)
    result = {"world": world, "bytes": {}}
    for mode in ac_modes:
        model, opt = build(cfg, dims, mode)
        fwd, bwd = A2ACounter(), A2ACounter()
        with fwd:  # one counted step
            loss = F.mse_loss(model(x, txt, t), target)
        with bwd:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        result["bytes"][mode] = {"fwd": fwd.bytes, "bwd": bwd.bytes, "fwd_calls": fwd.calls, "bwd_calls": bwd.calls,
                                 "first_loss": loss.item()}
        if mode != ac_modes[0] or iters == 0:
            continue
        times = []  # timed steps for the first mode only
        for i in range(warmup + iters):
            if world > 1:
                dist.barrier()  # every rank starts the step together
            t0 = time.perf_counter()
            F.mse_loss(model(x, txt, t), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = torch.tensor([time.perf_counter() - t0])
            if world > 1:
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
            if i >= warmup:
                times.append(dt.item())
        result["step_s"] = statistics.median(times)
    if rank == 0:
        with open(os.path.join(out_dir, f"w{world}.json"), "w") as f:
            json.dump(result, f)


def measure(world: int, cfg: ToyDiTConfig, batch: int, tokens: int, text: int, ac_modes: list[str],
            warmup: int = 1, iters: int = 3) -> dict:
    """Run `worker` on `world` gloo ranks (world 1 also in a spawned process, for the same thread setup)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(worker, world, vars(cfg), batch, tokens, text, list(ac_modes), warmup, iters, tmp)
        with open(os.path.join(tmp, f"w{world}.json")) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=1024, help="video tokens of the sample")
    p.add_argument("--text", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    cfg = ToyDiTConfig(in_channels=4, text_dim=32, hidden=args.hidden, heads=args.heads, layers=args.layers,
                       max_tokens=max(512, args.tokens))
    head_dim = cfg.hidden // cfg.heads
    modes = ["none", "selective", "full"]
    print(machine_line())
    print(f"toy DiT: hidden {cfg.hidden} = {cfg.heads} heads x {head_dim}, {cfg.layers} layers; batch {args.batch} x "
          f"{args.tokens} video + {args.text} text tokens; fp32; fwd+bwd+AdamW; 1 thread per rank; "
          f"warmup {args.warmup}, median of {args.iters}")
    results = {w: measure(w, cfg, args.batch, args.tokens, args.text, modes, args.warmup, args.iters)
               for w in args.worlds}
    base = results.get(1, {}).get("step_s")
    base_loss = results.get(1, {}).get("bytes", {}).get("none", {}).get("first_loss")
    time_rows = []
    for w, r in results.items():
        loss = r["bytes"]["none"]["first_loss"]
        same = "-" if base_loss is None else f"{abs(loss - base_loss):.1e}"
        time_rows.append((w, math.ceil(args.tokens / w), f"{1e3 * r['step_s']:.1f}",
                          f"{base / r['step_s']:.2f}x" if base else "-", f"{loss:.6f}", same))
    print()
    print(markdown_table(["world (ulysses)", "video tokens / rank", "step ms (max over ranks)", "speedup vs world 1",
                          "first loss", "|loss - world 1|"], time_rows))
    byte_rows, ok = [], True
    for w, r in results.items():
        if w == 1:
            continue
        a = a2a_bytes_per_layer(args.batch, args.tokens, cfg.heads, head_dim, w)
        for mode in modes:
            b = r["bytes"][mode]
            fwd, bwd = b["fwd"] / cfg.layers, b["bwd"] / cfg.layers
            a_bwd = 2 * a if mode == "full" else a
            match = fwd == a and bwd == a_bwd
            ok &= match
            byte_rows.append((w, mode, f"{b['fwd_calls']}/{b['bwd_calls']}", f"{int(fwd):,}", f"{a:,}", f"{int(bwd):,}",
                              f"{a_bwd:,}", fmt_bytes(a * (w - 1) / w), "yes" if match else "NO"))
    if byte_rows:
        print()
        print(markdown_table(["world", "AC", "a2a calls fwd/bwd", "fwd bytes/layer", "analytic 4Nh/P*4",
                              "bwd bytes/layer", "analytic bwd", "fwd bytes leaving rank", "measured == analytic"],
                             byte_rows))
        print("\nanalytic: 4*N*h/P elements x 4 B per rank per layer, N = B*P*ceil(S/P), h = P*ceil(H/P)*d; "
              "backward the same (2x with full AC: the recompute re-runs the forward all-to-alls); "
              "(P-1)/P of it leaves the rank.")
        print(f"all measured == analytic: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
