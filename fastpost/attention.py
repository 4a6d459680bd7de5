"""Attention backends behind one entry point: attention(q, k, v, mask=None, backend="auto").

Layout is BSHD ([batch, seq, heads, head_dim]) everywhere in fastpost: it is flash-attn's native layout and the
one the Ulysses all-to-all splits cheaply (sequence and heads are adjacent leading dims).

Backends, in "auto" preference order:
  flash_attn_3  flash_attn_interface (Hopper build of flash-attn); CUDA, fp16/bf16, head_dim <= 256, no mask
                (a key-padding mask runs the varlen kernel, below)
  flash_attn_2  flash_attn.flash_attn_func; CUDA, fp16/bf16, head_dim % 8 == 0 and <= 256, no mask (varlen too)
  sdpa          torch.nn.functional.scaled_dot_product_attention (picks flash/cuDNN/efficient/math itself)
  math          explicit softmax(q k^T * scale + mask) v with fp32 softmax; runs anywhere, slowest
flash-attn cannot be built on CPU machines, so it is imported lazily and optionally.

Key-padding masks (bool [B, 1, 1, Sk], e.g. [video; text] where each sample has its own number of valid text
tokens) run as ONE batched call: backends with a varlen kernel (flash-attn) get the valid keys packed with
cumulative lengths (cu_seqlens), all on the device (no host sync: max_seqlen is the static upper bound); the others
get the mask itself (SDPA picks a kernel that takes one).

Each backend also names the ops whose outputs selective activation checkpointing must save
(`saved_attention_ops()`), so "selective" never recomputes attention whichever backend auto picks.
"""

from __future__ import annotations

import importlib
import math as _math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# check(q, k, v, mask) -> None if the backend can run these inputs, else the reason it cannot.
Check = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], "str | None"]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]
# flash-attn's varlen signature: (q [Nq, H, D], k, v [Nk, H, D], cu_seqlens_q, cu_seqlens_k (int32 [B+1]),
# max_seqlen_q, max_seqlen_k, scale) -> [Nq, H, D]; keys past cu_seqlens_k[-1] are never read
Varlen = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    kernel: Kernel
    is_available: Callable[[], bool]
    check: Check
    varlen: Varlen | None = None  # runs key-padding masks as packed varlen (else the mask goes to `kernel`)
    saved_ops: tuple[str, ...] = ()  # "namespace.op.overload" of its kernels: selective AC saves their outputs


_REGISTRY: dict[str, AttentionBackend] = {}
_AUTO_ORDER: list[str] = []


def register_backend(backend: AttentionBackend, auto_priority: int | None = None) -> None:
    """Add a backend; auto_priority places it in the "auto" order (0 = tried first), None = explicit-only."""
    _REGISTRY[backend.name] = backend
    if backend.name in _AUTO_ORDER:
        _AUTO_ORDER.remove(backend.name)
    if auto_priority is not None:
        _AUTO_ORDER.insert(auto_priority, backend.name)


_IMPORTED: dict = {}


def _optional_import(module: str):
    # a plain dict, not lru_cache: the backend choice runs inside torch.compile'd blocks, and dynamo traces a dict
    # lookup as a constant but breaks the graph on importlib
    if module not in _IMPORTED:
        try:
            _IMPORTED[module] = importlib.import_module(module)
        except Exception:  # ImportError, or a broken CUDA build raising OSError at import
            _IMPORTED[module] = None
    return _IMPORTED[module]


@torch._dynamo.assume_constant_result
def _has_module(module: str) -> bool:
    return _optional_import(module) is not None


@torch._dynamo.assume_constant_result
def _sm_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects BSHD 4-D q/k/v, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention q/k/v shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            f"(need equal batch, heads and head_dim; k and v identical)"
        )


def is_key_padding(mask: torch.Tensor | None, q: torch.Tensor) -> bool:
    """A bool mask that only drops keys, the same for every query and head: [B, 1, 1, Sk]."""
    return (mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == q.shape[0]
            and mask.shape[1] == 1 and mask.shape[2] == 1)


def _flash_check(q, k, v, mask, *, head_dim_multiple: int, need_sm90: bool) -> str | None:
    if mask is not None and not is_key_padding(mask, q):
        return "flash-attn takes no arbitrary mask, only a key-padding one (pass mask=None or use sdpa)"
    if not q.is_cuda:
        return "flash-attn needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16/bf16, got {q.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return "flash-attn needs q, k, v of one dtype"
    head_dim = q.shape[-1]
    if head_dim > 256 or head_dim % head_dim_multiple != 0:
        return f"flash-attn needs head_dim <= 256 and a multiple of {head_dim_multiple}, got {head_dim}"
    if need_sm90 and _sm_major(q.device.index or 0) != 9:
        return "flash-attn 3 needs a Hopper (sm90) GPU"
    return None


def _fa2_kernel(q, k, v, mask, scale):
    return _optional_import("flash_attn").flash_attn_func(q, k, v, softmax_scale=scale)


def _fa3_kernel(q, k, v, mask, scale):
    out = _optional_import("flash_attn_interface").flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE


def _varlen_out(out):
    return out[0] if isinstance(out, tuple) else out


def _fa2_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return _optional_import("flash_attn").flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                                                  softmax_scale=scale)


def _fa3_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return _varlen_out(_optional_import("flash_attn_interface").flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale))


def pack_keys(q, k, v, key_valid_BS: torch.Tensor):
    """flash-attn varlen inputs for a key-padding mask, without a host sync: queries unpacked (every row is a
    query; cu_seqlens_q = b * Sq), keys packed (each sample's valid keys in order, samples one after another, the
    invalid ones moved past cu_seqlens_k[-1] where the kernel never reads them)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    valid = key_valid_BS.reshape(-1)
    order = torch.argsort((~valid).to(torch.int8), stable=True)  # valid keys first, batch-major, in order
    k_packed = k.reshape(b * sk, *k.shape[2:]).index_select(0, order)
    v_packed = v.reshape(b * sk, *v.shape[2:]).index_select(0, order)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    cu_k = torch.nn.functional.pad(key_valid_BS.sum(1).cumsum(0).to(torch.int32), (1, 0))
    return q.reshape(b * sq, h, d), k_packed, v_packed, cu_q, cu_k, sq, sk


def _sdpa_kernel(q, k, v, mask, scale):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def _math_kernel(q, k, v, mask, scale):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def _no_check(q, k, v, mask) -> str | None:
    return None


register_backend(
    AttentionBackend(
        "flash_attn_3", _fa3_kernel, lambda: _has_module("flash_attn_interface"),
        lambda q, k, v, m: _flash_check(q, k, v, m, head_dim_multiple=8, need_sm90=True),
        varlen=_fa3_varlen,
        # FA3 releases register their kernels as torch ops under one of these names (older ones call the C
        # extension directly, which no dispatch-level policy can see)
        saved_ops=("flash_attn_3._flash_attn_forward.default", "flash_attn_3.fwd.default",
                   "flash_attn_3._flash_attn_varlen_forward.default"),
    ),
    auto_priority=0,
)
register_backend(
    AttentionBackend(
        "flash_attn_2", _fa2_kernel, lambda: _has_module("flash_attn"),
        lambda q, k, v, m: _flash_check(q, k, v, m, head_dim_multiple=8, need_sm90=False),
        varlen=_fa2_varlen,
        saved_ops=("flash_attn._flash_attn_forward.default", "flash_attn._flash_attn_varlen_forward.default"),
    ),
    auto_priority=1,
)
register_backend(AttentionBackend("sdpa", _sdpa_kernel, lambda: True, _no_check, saved_ops=(
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default", "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default")), auto_priority=2)
register_backend(AttentionBackend("math", _math_kernel, lambda: True, _no_check))


def resolve_ops(*names: str) -> set:
    """The torch ops named 'namespace.op.overload' that exist in this process (others are left out)."""
    found = set()
    for name in names:
        ns, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return found


def saved_attention_ops() -> set:
    """The attention kernels (torch ops) of every registered backend that exist in this process."""
    return resolve_ops(*(op for b in _REGISTRY.values() for op in b.saved_ops))


def available_backends() -> list[str]:
    return [name for name, b in _REGISTRY.items() if b.is_available()]


def resolve_backend(name: str, q, k, v, mask=None) -> AttentionBackend:
    """The backend that will run these inputs; explicit names that cannot run them raise with the reason."""
    if name == "auto":
        for candidate in _AUTO_ORDER:
            b = _REGISTRY[candidate]
            if b.is_available() and b.check(q, k, v, mask) is None:
                return b
        raise RuntimeError("no attention backend can run these inputs")  # sdpa accepts everything
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *_REGISTRY]}")
    b = _REGISTRY[name]
    if not b.is_available():
        raise RuntimeError(f"attention backend {name!r} is not installed here; available: {available_backends()}")
    reason = b.check(q, k, v, mask)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run these inputs: {reason}")
    return b


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over BSHD tensors.

    mask: broadcastable to [B, H, Sq, Sk]; bool (True = attend) or additive float.
    """
    _check_shapes(q, k, v)
    if mask is not None and mask.dim() != 4:
        raise ValueError(f"attention mask must be 4-D (broadcastable to [B, H, Sq, Sk]), got shape {tuple(mask.shape)}")
    scale = 1.0 / _math.sqrt(q.shape[-1]) if scale is None else scale
    b = resolve_backend(backend, q, k, v, mask)
    if b.varlen is not None and is_key_padding(mask, q):
        out = b.varlen(*pack_keys(q, k, v, mask[:, 0, 0]), scale)
        return out.reshape(q.shape[:-1] + (v.shape[-1],))
    return b.kernel(q, k, v, mask, scale)


def apply_interleaved_rope(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (channel pairs (2m, 2m+1) rotated by angle m, as Mochi and the pyramid model use), in
    fp32; `cos`/`sin` hold head_dim/2 angles and broadcast against x_BSHD[..., 0::2] (e.g. [S, H, D/2] or
    [B, S, 1, D/2])."""
    even, odd = x_BSHD[..., 0::2].float(), x_BSHD[..., 1::2].float()
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return out.to(x_BSHD.dtype)
