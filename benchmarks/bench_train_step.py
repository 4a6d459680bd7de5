#!/usr/bin/env python
"""Train-step time, tokens/s, MFU and peak memory of a Mochi-like stack: fastpost's step vs a plain loop.

    python benchmarks/bench_train_step.py        # GPU: mochi-1 width, 6 of its 48 layers, bf16, 17,490 tokens
                                                 # CPU: says the GPU table is pending, runs a tiny fp32 Mochi

Model: diffusers' MochiTransformer3DModel. On GPU the config is the real "mochi-1" flavor (hidden 3072 = 24 heads
x 128, pooled/text width 1536, SwiGLU FF 8192) with --layers of its 48 blocks, on one 61-frame 480x848 clip
(latent 11 x 60 x 106 = 17,490 video tokens, 128 of 256 text tokens valid). Default 6 layers = 1.31B params:
fp32 master weights + fp32 grads + AdamW's two fp32 moments = 16 B/param = 19.5 GiB, plus no-AC activations of
~29 GiB (one mochi-1 block saves 97*D bytes per video token for backward in bf16, measured on CPU: 4.9 GiB per
block here) = ~49 GiB, leaving room in 78 GiB for the plain loop's fp32 autocast leftovers and transients.
8 layers would estimate ~65 GiB before those: too close to call without a GPU (try --layers 8; OOM rows say so).
MFU barely depends on the layer count: the blocks are 99.9% of the FLOPs.

Rows, all from one seeded init and the same inputs in the same run:
  plain loop      the diffusers model, torch.autocast(bf16) on GPU, torch AdamW; no fastpost code at all
  plain loop + GC diffusers' own enable_gradient_checkpointing()
  fastpost        family.parallelize() + family.predict(): AC none / selective / full. On GPU at world 1 this is
                  the trainer's path: a 1-rank process group, FSDP2 with bf16 params and fp32 reduce (fastpost has
                  no autocast path). On CPU (fp32) plain parallelize() at world 1 = no FSDP/SP, plus one row of
                  the trainer's path (a 1-rank process group; in fp32 apply_fsdp then skips FSDP: nothing to do).
Both losses are the same function of the weights (predict() only translates Mochi's timestep/sign convention), so
the "first loss" column must agree across rows (exactly in fp32).

Model FLOPs are analytic (mochi_forward_flops; equal to torch's FlopCounterMode, checked in
tests/test_benchmarks.py): every matmul of the forward at 2 FLOPs/MAC, attention 4*(N+T_valid)^2*D per sample;
a step = 3 x forward (backward = 2 x forward). Recomputation under AC is not model work and is not counted, nor
are the masked text rows fastpost's one batched masked call also runs (SDPA/math: +1.5% of attention at 17,490
tokens with 128 of 256 text tokens valid; flash varlen skips the masked keys, +0.7%).
MFU = model FLOPs / step time / 989 TFLOP/s (H100 bf16 dense). Peak memory: torch.cuda.max_memory_allocated on
GPU; on CPU, torch's MemTracker (live tensor bytes by category) over one extra step.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import _common  # noqa: F401  (sys.path for a fresh checkout)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import (H100_BF16_DENSE_TFLOPS, fmt_bytes, fmt_flops, gpu_pending, has_gpu, machine_line,
                     markdown_table, short_error)

from fastpost.distributed import ParallelDims, init_distributed
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.compile import CompileConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.models import get_family

FAMILY = get_family("mochi")
# CPU: the debug flavor's layout (SwiGLU, RMS qk-norm, context_pre_only last block), wide enough that matmuls,
# not Python overhead, dominate a step.
CPU_CONFIG = {**FAMILY.config("debug"), "num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 4,
              "pooled_projection_dim": 64, "text_embed_dim": 64, "max_sequence_length": 32}
CPU_SHAPE = dict(batch=1, frames=4, height=32, width=32, text_len=32, valid_text=20)  # 4x16x16 = 1,024 tokens
# --tiny (scripts/gpu_check.sh --cpu-dry-run): the same flow in seconds
TINY_CONFIG = {**CPU_CONFIG, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
               "pooled_projection_dim": 32, "text_embed_dim": 32, "max_sequence_length": 16}
TINY_SHAPE = dict(batch=1, frames=2, height=8, width=8, text_len=16, valid_text=9)  # 2x4x4 = 32 tokens
GPU_SHAPE = dict(batch=1, frames=11, height=60, width=106, text_len=256, valid_text=128)  # 17,490 tokens
ACT_BYTES_PER_TOKEN_PER_D = 97.4  # bf16 bytes one Mochi block saves per video token / hidden (CPU measurement)


def gpu_config(layers: int) -> dict:
    return {**FAMILY.config("mochi-1"), "num_layers": layers}


def video_tokens(cfg: dict, frames: int, height: int, width: int) -> int:
    p = cfg["patch_size"]
    return frames * (height // p) * (width // p)


def mochi_forward_flops(cfg: dict, batch: int, frames: int, height: int, width: int, text_len: int,
                        valid_text: int) -> dict:
    """Forward FLOPs of MochiTransformer3DModel (diffusers 0.42), 2 FLOPs per multiply-add.

    N video tokens, T text tokens (all of them go through the text projections), T_valid of them attended,
    D = heads*head_dim, Dc = pooled_projection_dim, Dt = text_embed_dim, FF inner (8D)//3 and (8Dc)//3 (SwiGLU:
    an up-projection to twice that). Attention per sample: 4*(N+T_valid)^2*D (QK^T and PV over video+valid text).
    Returns {"embed", "blocks": [per-block dicts], "head", "total"}.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dc, dt, dtime = cfg["pooled_projection_dim"], cfg["text_embed_dim"], cfg["time_embed_dim"]
    p, c = cfg["patch_size"], cfg["in_channels"]
    c_out = cfg.get("out_channels") or c
    n, t, tv, b = video_tokens(cfg, frames, height, width), text_len, valid_text, batch
    ff, ffc = (8 * d) // 3, (8 * dc) // 3

    def mm(rows, k, m):
        return 2.0 * rows * k * m

    embed = (mm(b, dtime, d) + mm(b, d, d)  # timestep MLP
             + mm(b * (t + 1), dt, 2 * dt) + mm(b, dt, dt) + 4.0 * b * (t + 1) * dt + mm(b, dt, d)  # text pool
             + mm(b * t, dt, dc)  # caption projection
             + mm(b * n, c * p * p, d)  # patch embedding (a conv per frame)
             + 3.0 * n * d)  # RoPE angle einsum [N,3] x [3,H,hd/2], once per forward

    def block(last: bool) -> dict:  # the last block is context_pre_only: no text output / text FF
        return {
            "adaLN": mm(b, d, 4 * d) + (mm(b, d, dc) if last else mm(b, d, 4 * dc)),
            "qkv": 3 * mm(b * n, d, d) + 3 * mm(b * t, dc, d),
            "attention": 4.0 * b * (n + tv) ** 2 * d,
            "out": mm(b * n, d, d) + (0.0 if last else mm(b * t, d, dc)),
            "ff": (mm(b * n, d, 2 * ff) + mm(b * n, ff, d)
                   + (0.0 if last else mm(b * t, dc, 2 * ffc) + mm(b * t, ffc, dc))),
        }

    blocks = [block(i == cfg["num_layers"] - 1) for i in range(cfg["num_layers"])]
    head = mm(b, d, 2 * d) + mm(b * n, d, p * p * c_out)  # norm_out modulation, proj_out
    return {"embed": embed, "blocks": blocks, "head": head,
            "total": embed + head + sum(sum(x.values()) for x in blocks)}


def make_inputs(cfg: dict, shape: dict, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t = shape["batch"], shape["text_len"]
    x = torch.randn(b, cfg["in_channels"], shape["frames"], shape["height"], shape["width"], generator=g)
    target = torch.randn(x.shape, generator=g)
    embeds = torch.randn(b, t, cfg["text_embed_dim"], generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, : shape["valid_text"]] = True
    sigma = torch.rand(b, generator=g)
    return [v.to(device) for v in (x, 1000.0 * sigma, embeds, mask, target)]


def variants(gpu: bool, compile_backend: str | None = "inductor", tiny: bool = False) -> list[dict]:
    fsdp1 = gpu  # GPU: fastpost's bf16 comes from FSDP mixed precision, so every fastpost row takes that path
    rows = [dict(name="plain loop (diffusers + torch AdamW)", plain=True, gc=False, ac="none")]
    if not tiny:  # --tiny (the gpu_check dry run) keeps one row of each kind
        rows.append(dict(name="plain loop + diffusers GC", plain=True, gc=True, ac="full"))
    rows += [dict(name=f"fastpost, AC {m}", plain=False, ac=m, fsdp1=fsdp1) for m in ("none", "selective", "full")]
    if compile_backend:  # regional compile (each block, after AC, before FSDP); its first step includes compiling
        rows += [dict(name=f"fastpost, AC {m} + compile" + ("" if compile_backend == "inductor"
                                                             else f" ({compile_backend})"),
                      plain=False, ac=m, fsdp1=fsdp1, compile=compile_backend)
                 for m in (("none",) if tiny else ("none", "selective"))]
    if not gpu and not tiny:
        rows.append(dict(name="fastpost, AC none, trainer path (1-rank group)", plain=False, ac="none", fsdp1=True))
    return rows


def build(v: dict, cfg: dict, device, gpu: bool):
    """(model, step_fn) with the same seeded init for every variant."""
    torch.manual_seed(0)
    with torch.device(device):  # construct in place: the GPU model does not fit a CPU round trip quickly
        model = FAMILY.diffusers_class.from_config(cfg)
    if v["plain"]:
        if v["gc"]:
            model.enable_gradient_checkpointing()
    else:
        dims = ParallelDims(world_size=1)
        if v["fsdp1"]:
            dims.build_mesh(device.type)  # needs the 1-rank process group main() created
        compile = CompileConfig(enabled=True, backend=v["compile"]) if v.get("compile") else None
        FAMILY.parallelize(model, dims, ACConfig(mode=v["ac"]),
                           FSDPConfig(param_dtype="bfloat16" if gpu else "float32", reduce_dtype="float32"),
                           compile=compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, opt


def step_fn(v: dict, model, opt, inputs, gpu: bool):
    x, t, embeds, mask, target = inputs

    def step() -> float:
        if v["plain"]:
            # The diffusers call MochiPipeline makes: timestep 1000*(1-sigma), prediction x0 - noise.
            with torch.autocast("cuda", torch.bfloat16, enabled=gpu):
                pred = model(hidden_states=x, encoder_hidden_states=embeds, timestep=1000.0 - t,
                             encoder_attention_mask=mask, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), -target)
        else:
            loss = F.mse_loss(FAMILY.predict_fn(model, x, t, embeds, mask).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def cpu_peak_bytes(step, model, opt) -> tuple[int, int]:
    """(peak, peak minus what was live at the start of the step) over one step, from torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        start = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        step()
    peak = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    return peak, peak - int(start)


def run_variant(v: dict, cfg: dict, shape: dict, device, warmup: int, iters: int) -> dict:
    """GPU: one variant at a time (each holds tens of GiB), CUDA-synchronised step times."""
    model = opt = None
    try:
        model, opt = build(v, cfg, device, True)
        step = step_fn(v, model, opt, make_inputs(cfg, shape, device), True)
        t0 = time.perf_counter()
        first_loss = step().item()  # also allocates AdamW's state (and compiles, with compile)
        first_s = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()  # weights + optimizer state, grads already freed
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()  # a whole step: host time == device time once synchronised
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated()
        return {"step_s": statistics.median(times), "peak": peak, "peak_step": peak - start, "first_loss": first_loss,
                "first_s": first_s}
    except torch.cuda.OutOfMemoryError as e:
        return {"note": "OOM: " + short_error(e, 40)}
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()


def run_interleaved(vs: list[dict], cfg: dict, shape: dict, device, warmup: int, iters: int,
                    memory: bool = True) -> list[dict]:
    """CPU: all variants alive at once (they are small) and timed round-robin, one step each per round, so load
    from other processes on a shared machine hits every variant alike instead of whichever ran during it."""
    built = []
    for v in vs:
        model, opt = build(v, cfg, device, False)
        step = step_fn(v, model, opt, make_inputs(cfg, shape, device), False)
        t0 = time.perf_counter()
        first_loss = step().item()
        first_s = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step()
        built.append((model, opt, step, (first_loss, first_s)))
    times = [[] for _ in vs]
    for _ in range(iters):
        for i, (_, _, step, _) in enumerate(built):
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    out = []
    for t, (model, opt, step, (loss, first_s)) in zip(times, built):
        # MemTracker dispatches every op through Python: most of a --tiny run's time, so --tiny skips it
        peak, peak_step = cpu_peak_bytes(step, model, opt) if memory else (None, None)
        out.append({"step_s": statistics.median(t), "peak": peak, "peak_step": peak_step, "first_loss": loss,
                    "first_s": first_s})
    del built
    gc.collect()
    return out


def flops_table(cfg: dict, shape: dict) -> str:
    f = mochi_forward_flops(cfg, **shape)
    first = f["blocks"][0]
    rows = [(k, fmt_flops(val), f"{100 * val / sum(first.values()):.1f}%") for k, val in first.items()]
    rows.append(("block total", fmt_flops(sum(first.values())), "100.0%"))
    return markdown_table(["forward FLOPs per block (not last)", "FLOPs", "share"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run the CPU table even when a GPU is present")
    p.add_argument("--layers", type=int, default=6, help="GPU: how many of mochi-1's 48 blocks")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU: a 2-layer, 32-token model (the gpu_check dry run)")
    p.add_argument("--compile-backend", default="inductor",
                   help="backend of the compile rows (inductor; aot_eager: graph capture only); 'none' drops them")
    args = p.parse_args(argv)
    compile_backend = None if args.compile_backend == "none" else args.compile_backend
    print(machine_line())
    gpu = has_gpu() and not args.cpu
    if gpu:
        device, cfg, shape, warmup, iters = torch.device("cuda"), gpu_config(args.layers), GPU_SHAPE, 3, 10
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (RoPE, norms) as a tuned run would
    else:
        if not has_gpu():
            print(gpu_pending(["python benchmarks/bench_train_step.py            # 6 mochi-1 layers (--layers)"]))
        # One thread: on a shared 2-core box, two intra-op threads stall on whichever core another process
        # holds (measured: the same step 0.2 s alone, 2-6 s under load); one thread degrades gracefully.
        torch.set_num_threads(args.threads)
        device, cfg, shape, warmup, iters = torch.device("cpu"), CPU_CONFIG, CPU_SHAPE, 2, 7
        if args.tiny:
            cfg, shape, warmup, iters = TINY_CONFIG, TINY_SHAPE, 1, 1
    warmup = args.warmup if args.warmup is not None else warmup
    iters = args.iters if args.iters is not None else iters

    n = video_tokens(cfg, shape["frames"], shape["height"], shape["width"])
    fwd = mochi_forward_flops(cfg, **shape)["total"]
    step_flops = 3 * fwd
    with torch.device("meta"):
        n_params = sum(t.numel() for t in FAMILY.diffusers_class.from_config(cfg).parameters())
    print(f"model: MochiTransformer3DModel, {cfg['num_layers']} layers, hidden "
          f"{cfg['num_attention_heads']}x{cfg['attention_head_dim']}, {n_params / 1e6:.2f}M params "
          f"(fp32 weights+grads+AdamW = {fmt_bytes(16 * n_params)}); batch {shape['batch']} x {n} video tokens, "
          f"{shape['valid_text']}/{shape['text_len']} valid text tokens; {'bf16' if gpu else 'fp32'}")
    print(f"model FLOPs per step = 3 x forward = 3 x {fmt_flops(fwd)} = {fmt_flops(step_flops)}"
          f" (AC recompute not counted); warmup {warmup}, median of {iters} steps")
    if gpu:
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        act = cfg["num_layers"] * ACT_BYTES_PER_TOKEN_PER_D * d * n * shape["batch"]
        print(f"memory estimate, no AC: {fmt_bytes(16 * n_params)} weights/grads/AdamW + {fmt_bytes(act)} activations")
    print(flops_table(cfg, shape))

    need_group = any(v.get("fsdp1") for v in variants(gpu, compile_backend, args.tiny))
    if need_group and not dist.is_initialized():
        init_distributed()  # world 1: gloo on CPU, nccl on GPU
    rows, plain_s = [], None
    try:
        vs = variants(gpu, compile_backend, args.tiny)
        results = ([run_variant(v, cfg, shape, device, warmup, iters) for v in vs] if gpu
                   else run_interleaved(vs, cfg, shape, device, warmup, iters, memory=not args.tiny))
        for v, r in zip(vs, results):
            if "note" in r:
                rows.append((v["name"], *["-"] * 9, r["note"]))
                continue
            s = r["step_s"]
            plain_s = s if v["plain"] and not v["gc"] else plain_s
            rate = step_flops / s
            mfu = f"{100 * rate / (H100_BF16_DENSE_TFLOPS * 1e12):.1f}%" if gpu else "n/a (CPU)"
            achieved = f"{rate / 1e12:.1f} TFLOP/s" if gpu else f"{rate / 1e9:.1f} GFLOP/s"
            speed = f"{plain_s / s:.2f}x" if plain_s else "-"
            rows.append((v["name"], f"{1e3 * s:.1f}", f"{shape['batch'] * n / s:,.0f}", achieved, mfu,
                         *(("not measured (--tiny)",) * 2 if r["peak"] is None else
                           (fmt_bytes(r["peak"]), fmt_bytes(r["peak_step"]))), f"{r['first_loss']:.6f}",
                         f"{r['first_s']:.1f}", speed, ""))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print()
    print(markdown_table(["variant", "step ms", "tokens/s", "model FLOP/s", "MFU", "peak memory", "peak - step start",
                          "first loss", "first step s",
                          "speed vs plain", "note"], rows))
    if not gpu:
        print("\nCPU memory: torch MemTracker over one step (live params + grads + optimizer state + activations +"
              " temporaries).")
    print("peak - step start: the peak minus what is live when a step begins (weights, optimizer state): "
          "activations, gradients and temporaries. first step s: time to the first step's loss (with compile: "
          "compiling the block graphs, forward and backward).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
