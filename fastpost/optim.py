"""Optimizers by `optim.name`, and the bytes of state each keeps (what `fastpost plan` assumes):

  adamw          torch.optim.AdamW: two fp32 moments per parameter (in the parameter's dtype)
  adamw8bit      AdamW whose moments are stored in 8 bits (AdamW8bit below): 1 byte per moment per element plus
                 one fp32 scale per 256-element block of a row; tensors under 4096 elements keep fp32 moments
  prodigy        prodigyopt.Prodigy (learning-rate free: lr is a multiplier, 1.0 as its authors advise); keeps
                 the initial weights and an `s` accumulator besides the two moments: 4 copies (an upper bound: it
                 keeps no copy of an all-zero initial weight, such as a LoRA B)
  adamw_offload  AdamW with its moments (and the update math) on the host: only the parameters and gradients
                 stay on the GPU; the gradients go to the host and the updated parameters come back each step

Why not torchao / bitsandbytes for 8-bit: torchao's AdamW8bit (0.18, installed with --no-deps against torch 2.13)
compiles its step with torch.compile (43 s for the first step on this CPU, measured) and keeps its moments as a
tensor subclass that DCP does not save; bitsandbytes' 8-bit optimizers need CUDA. The state here is plain uint8
codes + fp32 scales, so DCP checkpoints it (resharded on load: codes are laid out like the parameter, scales per
row) and resume is bit-exact.

8-bit format (per moment, per row of the parameter viewed as [rows, cols], blocks of 256 columns): a code indexes a
256-entry map of normalised values, scaled by the block's absmax. The maps are logarithmic (ratio ~1.07-1.12 between
neighbours, down to 1e-6 / 1e-7 of the absmax) like the dynamic maps of 8-bit Adam; the second moment is quantised
in the square-root domain, which halves the dynamic range it needs.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

BLOCK = 256  # columns per 8-bit scale
MIN_8BIT = 4096  # smaller tensors keep fp32 moments (negligible memory, and their statistics are the least robust)
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adamw_offload")


def _geometric(n: int, low: float) -> torch.Tensor:
    return torch.logspace(math.log10(low), 0.0, n, dtype=torch.float64)


# signed map for the first moment: 0 and +-127 magnitudes in [1e-6, 1]; unsigned map for sqrt(second moment):
# 0 and 255 magnitudes in [1e-7, 1]
_SIGNED = torch.cat([-_geometric(127, 1e-6).flip(0), torch.zeros(1), _geometric(127, 1e-6)]).float()
_UNSIGNED = torch.cat([torch.zeros(1), _geometric(255, 1e-7)]).float()


def _mids(qmap: torch.Tensor) -> torch.Tensor:
    return (qmap[1:] + qmap[:-1]) / 2


_MIDS = {id(_SIGNED): _mids(_SIGNED), id(_UNSIGNED): _mids(_UNSIGNED)}


def _rows(shape: torch.Size) -> tuple[int, int]:
    rows = shape[0] if len(shape) else 1
    return rows, math.prod(shape) // max(rows, 1)


def quantized(shape: torch.Size) -> bool:
    return len(shape) >= 2 and math.prod(shape) >= MIN_8BIT


def _quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] fp32 -> (codes uint8 [rows, cols], absmax fp32 [rows, ceil(cols / BLOCK)])."""
    rows, cols = x.shape
    blocks = -(-cols // BLOCK)
    padded = torch.nn.functional.pad(x, (0, blocks * BLOCK - cols)).view(rows, blocks, BLOCK)
    scale = padded.abs().amax(-1)
    normed = padded / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    mids = _MIDS[id(qmap)].to(x.device)
    codes = torch.bucketize(normed, mids).to(torch.uint8).view(rows, blocks * BLOCK)[:, :cols]
    return codes, scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    values = qmap.to(codes.device)[codes.long()]
    return values * scale.repeat_interleave(BLOCK, dim=1)[:, :cols]


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _like(param, local: torch.Tensor, global_shape: tuple[int, ...]):
    """`local` as the state of `param`: a DTensor sharded like it when it is one (so DCP reshards it)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=global_shape, stride=stride,
                              run_check=False)


class _KeepStateDtype:
    """The AdamW hyper-parameters of fastpost's own optimizers, and a load_state_dict that keeps their state as
    saved: torch's casts floating state to the parameter's dtype and device, ours stays fp32 (scales and moments;
    on the host for the offloaded optimizer), so resume is bit-exact."""

    _state_device: str | None = None

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # the saved groups name their parameters by index or (DCP) by FQN, in the order of ours
        keys = [k for group in state_dict["param_groups"] for k in group["params"]]
        params = dict(zip(keys, [p for group in self.param_groups for p in group["params"]]))
        for index, entries in saved.items():
            state = self.state[params[index]]
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(self._state_device or _local(params[index]).device)


class AdamW8bit(_KeepStateDtype, torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantised moments (module docstring). Update math in fp32."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                param, grad = _local(p), _local(p.grad).float()
                rows, cols = _rows(param.shape)
                state = self.state[p]
                q = quantized(p.shape)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if q:
                        g_rows, g_cols = _rows(p.shape)
                        blocks = -(-g_cols // BLOCK)
                        for m in ("exp_avg", "exp_avg_sq"):
                            state[f"{m}_codes"] = _like(p, torch.zeros(param.shape, dtype=torch.uint8,
                                                                       device=param.device), tuple(p.shape))
                            state[f"{m}_scale"] = _like(p, torch.zeros(rows, blocks, device=param.device),
                                                        (g_rows, blocks))
                    else:
                        state["exp_avg"] = _like(p, torch.zeros(param.shape, device=param.device), tuple(p.shape))
                        state["exp_avg_sq"] = _like(p, torch.zeros(param.shape, device=param.device),
                                                    tuple(p.shape))
                state["step"] += 1
                step = state["step"].item()
                if q:
                    m = _dequantize(_local(state["exp_avg_codes"]).view(rows, cols), _local(state["exp_avg_scale"]),
                                    _SIGNED)
                    v = _dequantize(_local(state["exp_avg_sq_codes"]).view(rows, cols),
                                    _local(state["exp_avg_sq_scale"]), _UNSIGNED).square()
                else:
                    m, v = _local(state["exp_avg"]).view(rows, cols), _local(state["exp_avg_sq"]).view(rows, cols)
                g = grad.view(rows, cols)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** step)).add_(eps)
                update = (m / (1 - b1 ** step)) / denom
                master = param.float()
                master.mul_(1 - lr * wd).add_(update.view(param.shape), alpha=-lr)
                param.copy_(master)
                if q:
                    for name, x, qmap in (("exp_avg", m, _SIGNED), ("exp_avg_sq", v.sqrt(), _UNSIGNED)):
                        codes, scale = _quantize(x, qmap)
                        _local(state[f"{name}_codes"]).view(rows, cols).copy_(codes)
                        _local(state[f"{name}_scale"]).copy_(scale)
        return loss


class AdamWOffload(_KeepStateDtype, torch.optim.Optimizer):
    """AdamW whose moments live in (pinned) host memory and whose update runs on the host: each step copies the
    gradients down and the updated parameters up. The arithmetic is torch's own single-tensor AdamW, so on a CPU
    run the result equals torch.optim.AdamW(foreach=False)."""

    _state_device = "cpu"

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim.adam import adam

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pin = torch.cuda.is_available()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            hosts, grads, avgs, sqs, steps = [], [], [], [], []
            for p in live:
                param = _local(p)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for key in ("exp_avg", "exp_avg_sq"):
                        zeros = torch.zeros(param.shape, dtype=torch.float32, pin_memory=pin)
                        state[key] = _like(p, zeros, tuple(p.shape))
                hosts.append(param.detach().to("cpu", torch.float32))  # the parameter itself on a CPU run
                grads.append(_local(p.grad).to("cpu", torch.float32))
                avgs.append(_local(state["exp_avg"]))
                sqs.append(_local(state["exp_avg_sq"]))
                steps.append(state["step"])
            if not live:
                continue
            adam(hosts, grads, avgs, sqs, [], steps, foreach=False, decoupled_weight_decay=True, amsgrad=False,
                 beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for p, host in zip(live, hosts):
                param = _local(p)
                if host is not param:
                    param.copy_(host, non_blocking=True)
        return loss


def build_optimizer(params: list, cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` (an OptimConfig) over `params`."""
    common = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        # fused: one kernel per step, and the trainer's non-finite check skips its update on the device (found_inf)
        return torch.optim.AdamW(params, **common, fused=True)
    if cfg.name == "adamw8bit":
        return AdamW8bit(params, **common)
    if cfg.name == "adamw_offload":
        return AdamWOffload(params, **common)
    if cfg.name == "prodigy":
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) and p.device_mesh.size() > 1 for p in params):
            raise ValueError("optim.name prodigy runs on unsharded parameters (one GPU): its step flattens every "
                             "parameter; with FSDP over several ranks use adamw or adamw8bit")
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ImportError("optim.name prodigy needs the prodigyopt package: pip install prodigyopt") from None
        opt = Prodigy(params, **common)
        for group in opt.param_groups:  # set by its first step: present from the start, so a checkpoint written
            group.setdefault("d_denom", 0.0)  # before that step and one written after it hold the same keys
            group.setdefault("d_hat", 0.0)
        return opt
    raise ValueError(f"optim.name {cfg.name!r} is not one of {OPTIMIZERS}")


# ---- state size (the planner's assumption, and what a built optimizer holds) --------------------------------------
def state_bytes(name: str, shapes: Iterable[tuple[int, ...]], param_bytes: int = 4) -> int:
    """Bytes of optimizer state for parameters of these shapes (`param_bytes`: their element size)."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if name == "adamw8bit":
            if quantized(shape):
                rows, cols = _rows(torch.Size(shape))
                total += 2 * (n + rows * -(-cols // BLOCK) * 4)
            else:
                total += 2 * n * 4
        elif name == "prodigy":
            total += 4 * n * param_bytes
        elif name in ("adamw", "adamw_offload"):
            total += 2 * n * (4 if name == "adamw_offload" else param_bytes)
        else:
            raise ValueError(f"optim.name {name!r} is not one of {OPTIMIZERS}")
    return total


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state (per-parameter tensors; the scalar step counters are not counted)."""
    out = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                v = _local(v)
                out += v.numel() * v.element_size()
    return out
