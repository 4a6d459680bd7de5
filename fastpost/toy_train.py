"""Flow-matching training of the toy DiT under FSDP2 x Ulysses: the parallel core's smoke run (torchrun-able).

Data: token sequences drawn from 4 text-conditioned patterns plus noise, so a conditional model can learn them.
The loss must fall; the run fails loudly if it does not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastpost.distributed import ParallelDims, init_distributed
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.models.toy import FLAVORS, ToyDiT, parallelize


def synthetic_batch(step: int, dp_rank: int, batch: int, tokens: int, cfg) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(10_000 * step + dp_rank)  # SP peers share dp_rank, so the same sample
    patterns = torch.Generator().manual_seed(0)
    bank = torch.randn(4, tokens, cfg.in_channels, generator=patterns)
    text_bank = torch.randn(4, 3, cfg.text_dim, generator=patterns)
    cls = torch.randint(0, 4, (batch,), generator=g)
    x0 = bank[cls] + 0.1 * torch.randn(batch, tokens, cfg.in_channels, generator=g)
    return x0, text_bank[cls], torch.randn(x0.shape, generator=g), torch.rand(batch, generator=g)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastpost toy-train")
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4, help="per data-parallel rank")
    p.add_argument("--tokens", type=int, default=37, help="video tokens (37: not divisible by the SP degree)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ac", default="selective")
    p.add_argument("--out", default=None, help="jsonl metrics file (rank 0)")
    args = p.parse_args(argv)

    rank, world = init_distributed()
    torch.set_num_threads(1)
    dims = ParallelDims(ulysses=args.ulysses, world_size=world)
    dims.build_mesh()
    cfg = FLAVORS["debug"]
    torch.manual_seed(0)
    model = parallelize(ToyDiT(cfg), dims, ac=ACConfig(mode=args.ac), fsdp=FSDPConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if rank == 0:
        print(f"[toy-train] {dims}; {sum(p.numel() for p in ToyDiT(cfg).parameters())} params", flush=True)
    out = open(args.out, "w") if (args.out and rank == 0) else None
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        x0, text, noise, t = synthetic_batch(step, dims.dp_rank, args.batch, args.tokens, cfg)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise  # rectified-flow interpolation
        loss = F.mse_loss(model(xt, text, t), noise - x0)  # velocity target d xt / dt
        loss.backward()
        opt.step()
        opt.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
        losses.append(reduced.item())
        if out:
            out.write(json.dumps({"step": step, "loss": losses[-1]}) + "\n")
        if rank == 0 and (step % 25 == 0 or step == args.steps - 1):
            print(f"[toy-train] step {step:4d} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    if rank == 0:
        print(f"[toy-train] mean loss of first 10 steps {first:.4f} -> last 10 steps {last:.4f}", flush=True)
    dist.destroy_process_group()
    if last > 0.7 * first:
        raise SystemExit(f"loss did not fall enough ({first:.4f} -> {last:.4f})")


if __name__ == "__main__":
    main()
