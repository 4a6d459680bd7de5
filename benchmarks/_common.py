"""Helpers shared by the benchmarks: import path, machine line, timing, markdown tables.

Every benchmark is one command (`python benchmarks/<name>.py`) that prints a markdown table; the helpers keep
that output uniform so docs/performance.md can paste it verbatim.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a fresh checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# diffusers' Mochi RoPE opens an fp32 autocast region, which CPU autocast rejects with a warning on every forward
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM bf16 dense tensor-core peak (no sparsity), the MFU denominator


def has_gpu() -> bool:
    return torch.cuda.is_available()


def machine_line() -> str:
    """One line saying where the numbers came from (the CPU tables are only comparable on a quiet machine)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev = torch.cuda.get_device_name() if has_gpu() else f"CPU ({platform.processor() or platform.machine()})"
    return (f"machine: {dev}, {os.cpu_count()} CPU cores, load average {load:.2f} at start; "
            f"torch {torch.__version__}")


def gpu_pending(commands: Sequence[str]) -> str:
    lines = ["GPU table pending: no CUDA device here. On an H100 run:"]
    lines += [f"    {c}" for c in commands]
    return "\n".join(lines)


def time_cpu(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Wall-clock seconds of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Seconds per call from CUDA events (GPU time of the stream, not host launch time), after warmup."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def time_fn(fn: Callable[[], object], warmup: int, iters: int, cuda: bool) -> float:
    """Median seconds per call (the median resists the stragglers a shared machine produces)."""
    return statistics.median((time_cuda if cuda else time_cpu)(fn, warmup, iters))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_flops(flops: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f} FLOP"


def short_error(e: BaseException, limit: int = 60) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (msg[: limit - 3] + "...") if len(msg) > limit else msg
