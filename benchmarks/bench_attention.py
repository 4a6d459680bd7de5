#!/usr/bin/env python
"""Attention backends at video-DiT shapes: TFLOP/s of forward and forward+backward.

    python benchmarks/bench_attention.py          # GPU: bf16, 10k-44.5k tokens, head dim 64 and 128 (H100: ~2 min)
                                                  # CPU: says the GPU table is pending, runs a small fp32 table

Every row goes through fastpost.attention.attention (BSHD, the layout the models use). "sdpa:<kernel>" pins the
kernel SDPA may pick with torch.nn.attention.sdpa_kernel, so each row is one kernel, not SDPA's choice;
flash_attn_2/3 are fastpost's flash-attn backends when installed; "fastpost:math" is the explicit-softmax fallback.

FLOPs are analytic (the FlashAttention paper's convention): forward 4*B*H*S^2*D (QK^T and PV, 2 FLOPs per MAC),
backward 2.5x forward (5 matmuls instead of 2, one of them the recompute of QK^T), so forward+backward = 3.5x.
GPU timings are CUDA-event medians after warmup; CPU timings are wall-clock medians.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
from _common import fmt_flops, gpu_pending, has_gpu, machine_line, markdown_table, short_error, time_fn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastpost.attention import attention, available_backends

SDPA_KERNELS = {
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa:math": SDPBackend.MATH,
}
FLASH_ATTN = ("flash_attn_3", "flash_attn_2")
MATH_ROWS = ("sdpa:math", "fastpost:math")  # materialise the [B, H, S, S] scores: skipped when too big
# Mochi-1 hidden size 3072 split two ways; 10k tokens, and Mochi's 61- and 163-frame 480x848 clips.
GPU_SHAPES = [(1, 48, s, 64) for s in (10_000, 17_490, 44_520)] + [(1, 24, s, 128) for s in (10_000, 17_490, 44_520)]
CPU_SHAPES = [(1, 4, s, d) for d in (64, 128) for s in (256, 1024)]


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of non-causal attention over seq tokens (bwd = 2.5 x fwd)."""
    fwd = 4.0 * batch * heads * seq * seq * head_dim
    return fwd, fwd * 3.5


def all_backends() -> list[str]:
    return [*SDPA_KERNELS, *FLASH_ATTN, "fastpost:math"]


def _context(name: str):
    return sdpa_kernel(SDPA_KERNELS[name]) if name in SDPA_KERNELS else contextlib.nullcontext()


def _fastpost_backend(name: str) -> str:
    return "sdpa" if name in SDPA_KERNELS else ("math" if name == "fastpost:math" else name)


def run_attention(name: str, q, k, v):
    with _context(name), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns why each disabled kernel was not used
        return attention(q, k, v, backend=_fastpost_backend(name))


def skip_reason(name: str, shape, dtype, device) -> str | None:
    if name in FLASH_ATTN and name not in available_backends():
        return "not installed"
    if name in FLASH_ATTN and device.type != "cuda":
        return "needs CUDA"
    b, h, s, _ = shape
    if name in MATH_ROWS:
        scores = b * h * s * s * 4 * 3  # fp32 scores, probs and their grad live at once
        limit = (torch.cuda.mem_get_info()[0] * 0.5) if device.type == "cuda" else 4 * 2**30
        if scores > limit:
            return f"skipped: S^2 scores need {scores / 2**30:.0f} GiB"
    return None


def bench_one(name: str, shape, dtype, device, warmup: int, iters: int) -> dict:
    b, h, s, d = shape
    reason = skip_reason(name, shape, dtype, device)
    if reason:
        return {"note": reason}
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    cuda = device.type == "cuda"
    try:
        with torch.no_grad():
            t_fwd = time_fn(lambda: run_attention(name, q, k, v), warmup, iters, cuda)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        dout = torch.randn_like(q)

        def fwd_bwd():  # autograd.grad: no .grad accumulation between iterations
            torch.autograd.grad(run_attention(name, qg, kg, vg), (qg, kg, vg), dout)

        t_fb = time_fn(fwd_bwd, warmup, iters, cuda)
    except torch.cuda.OutOfMemoryError:
        return {"note": "OOM"}
    except RuntimeError as e:  # the pinned SDPA kernel cannot run this shape/dtype/device
        if "No viable backend" in str(e):
            return {"note": f"n/a: no such kernel for {device.type}/{str(dtype)[6:]}"}
        return {"note": "n/a: " + short_error(e, 50)}
    finally:
        if cuda:
            torch.cuda.empty_cache()
    fwd, fb = attention_flops(b, h, s, d)
    return {"fwd_ms": t_fwd * 1e3, "fb_ms": t_fb * 1e3, "fwd_tflops": fwd / t_fwd / 1e12,
            "fb_tflops": fb / t_fb / 1e12}


def correctness(device, dtype, backends) -> list[str]:
    """Max |out - fp32 reference| per backend on one small shape: a wrong kernel must not get a speed row."""
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, 384, 4, 64, generator=g, device=device, dtype=dtype) for _ in range(3))
    ref = attention(q.float(), k.float(), v.float(), backend="math")
    out = []
    for name in backends:
        if skip_reason(name, (1, 4, 384, 64), dtype, device):
            continue
        try:
            err = (run_attention(name, q, k, v).float() - ref).abs().max().item()
            out.append(f"{name} {err:.1e}")
        except RuntimeError:
            pass  # reported as n/a in the table
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run the CPU table even when a GPU is present")
    p.add_argument("--backends", nargs="*", default=None, help=f"subset of {all_backends()}")
    p.add_argument("--seqs", type=int, nargs="*", default=None, help="override the sequence lengths")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    print(machine_line())
    gpu = has_gpu() and not args.cpu
    if gpu:
        device, dtype, shapes, warmup, iters = torch.device("cuda"), torch.bfloat16, GPU_SHAPES, 3, 10
    else:
        if not has_gpu():
            print(gpu_pending(["python benchmarks/bench_attention.py"]))
        # One thread: with two on a shared 2-core box a kernel waits on whichever core another process holds.
        torch.set_num_threads(args.threads)
        device, dtype, shapes, warmup, iters = torch.device("cpu"), torch.float32, CPU_SHAPES, 3, 9
        print("CPU variant: fp32, short sequences; exercises the script, says nothing about GPU kernels.")
    if args.seqs:
        shapes = sorted({(b, h, s, d) for (b, h, _, d) in shapes for s in args.seqs}, key=lambda x: (x[3], x[2]))
    warmup = args.warmup if args.warmup is not None else warmup
    iters = args.iters if args.iters is not None else iters
    backends = args.backends or all_backends()
    print(f"dtype {dtype}, warmup {warmup}, median of {iters}; FLOPs: fwd 4*B*H*S^2*D, fwd+bwd 3.5x that")
    print("correctness (max abs error vs fp32 math, S=384 D=64): " + ", ".join(correctness(device, dtype, backends)))
    rows = []
    for shape in shapes:
        b, h, s, d = shape
        fwd, _ = attention_flops(b, h, s, d)
        for name in backends:
            r = bench_one(name, shape, dtype, device, warmup, iters)
            if "note" in r:
                rows.append((name, d, h, s, fmt_flops(fwd), "-", "-", "-", "-", r["note"]))
            else:
                rows.append((name, d, h, s, fmt_flops(fwd), f"{r['fwd_ms']:.2f}", f"{r['fwd_tflops']:.3f}",
                             f"{r['fb_ms']:.2f}", f"{r['fb_tflops']:.3f}", ""))
            print(f"  done {name} D={d} S={s}", flush=True)
    print()
    print(markdown_table(["backend", "D", "H", "S", "fwd FLOPs", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
                          "fwd+bwd TFLOP/s", "note"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
