"""Ulysses sequence parallelism (seq-sharded <-> head-sharded all-to-all) with a ring-degree K/V gather.

Layout of one sample's sequence over the SP group (sp = ring x ulysses, sp_rank = ring_rank * ulysses + u):
the sequence is padded at the tail to a multiple of sp and rank r holds chunk r of length S_l = ceil(S / sp).

Attention on an SP rank:
  1. pad heads to a multiple of the ulysses degree (zero heads; sliced off afterwards), e.g. 30 heads at sp=4
  2. one fused all-to-all over `ulysses` for q, k, v: [B, S_l, H, D] -> [B, U*S_l, H/U, D] (the ring block)
  3. ring degree > 1: all-gather k, v over `ring` (Llama-3 style context parallel; exact, not overlapped)
  4. drop the padded tail keys (equivalent to masking them out, but cheaper) and attend
  5. all-to-all the output back to [B, S_l, H, D]
Joint text+video attention: text tokens are replicated on every rank; each rank uses its own head slice of the
text q/k/v and the text output is all-gathered over heads.

Every collective here is an autograd-aware functional collective, so backward runs the exact adjoint
(all-to-all <-> all-to-all, all-gather <-> reduce-scatter sum). Every rank of an SP group computes the loss of
the same sample; summed over the group, parameter gradients are then sp x the single-process gradient, which
FSDP's mean over the flattened dp x sp mesh divides out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from fastpost.attention import attention
from fastpost.distributed.parallel_dims import ParallelDims


@dataclass(frozen=True)
class SPGroup:
    """The meshes and ranks one attention call needs. Build with SPGroup.from_dims(dims) after build_mesh()."""

    sp_mesh: DeviceMesh
    ulysses_mesh: DeviceMesh
    ring_mesh: DeviceMesh
    ulysses: int
    ring: int
    sp_rank: int
    ulysses_rank: int

    @property
    def size(self) -> int:
        return self.ulysses * self.ring

    @classmethod
    def from_dims(cls, dims: ParallelDims) -> "SPGroup | None":
        """None when SP is off (degree 1 or a plain single process): callers then run local attention."""
        if not dims.sp_enabled or dims.mesh is None:
            return None
        return cls(
            sp_mesh=dims.submesh("sp"), ulysses_mesh=dims.submesh("ulysses"), ring_mesh=dims.submesh("ring"),
            ulysses=dims.ulysses, ring=dims.ring, sp_rank=dims.sp_rank, ulysses_rank=dims.ulysses_rank,
        )


# torch >= 2.13 renamed the autograd all-gather (backward: reduce-scatter sum); it gathers along dim 0 only.
_all_gather_dim0 = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def all_gather_autograd(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """Concatenate the ranks' x along `dim`, differentiably (backward = reduce-scatter sum, the exact adjoint)."""
    out = _all_gather_dim0(x.movedim(dim, 0).contiguous(), 0, mesh)
    return out.movedim(0, dim)


def local_seq_len(seq_len: int, sp_size: int) -> int:
    return math.ceil(seq_len / sp_size)


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of x at the end up to `size`."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


# ---- sequence split / gather at the model boundary ---------------------------------------------------------------
def shard_sequence(x: torch.Tensor, dim: int, sp: SPGroup | None) -> torch.Tensor:
    """This rank's chunk of a tensor that is identical on all SP ranks (tail-padded to a multiple of sp)."""
    if sp is None:
        return x
    s_local = local_seq_len(x.shape[dim], sp.size)
    x = _pad_dim(x, dim, s_local * sp.size)
    return x.narrow(dim, sp.sp_rank * s_local, s_local)


def gather_sequence(x: torch.Tensor, dim: int, sp: SPGroup | None, seq_len: int) -> torch.Tensor:
    """Inverse of shard_sequence: all-gather the chunks (backward: reduce-scatter sum) and drop the padding."""
    if sp is None:
        return x
    full = all_gather_autograd(x, dim, sp.sp_mesh)
    return full.narrow(dim, 0, seq_len)


# ---- the all-to-alls -------------------------------------------------------------------------------------------
def seq_to_heads(x: torch.Tensor, mesh: DeviceMesh, degree: int) -> torch.Tensor:
    """[N, B, S_l, H, D] (N stacked tensors, H % degree == 0) -> [N, B, degree*S_l, H/degree, D]."""
    n, b, s_l, h, d = x.shape
    x = x.reshape(n, b, s_l, degree, h // degree, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    x = funcol.all_to_all_single_autograd(x, None, None, mesh)  # chunk i now = rank i's sequence chunk
    return x.permute(1, 2, 0, 3, 4, 5).reshape(n, b, degree * s_l, h // degree, d)


def heads_to_seq(x: torch.Tensor, mesh: DeviceMesh, degree: int) -> torch.Tensor:
    """[B, degree*S_l, H_l, D] -> [B, S_l, degree*H_l, D]; the exact inverse of seq_to_heads."""
    b, s, h_l, d = x.shape
    x = x.reshape(b, degree, s // degree, h_l, d).permute(1, 0, 2, 3, 4).contiguous()
    x = funcol.all_to_all_single_autograd(x, None, None, mesh)  # chunk i now = rank i's head group
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // degree, degree * h_l, d)


def _local_mask(mask: torch.Tensor, heads: int, padded_heads: int, h_slice: slice,
                rows: torch.Tensor) -> torch.Tensor:
    """Rows of a joint-sequence mask for this rank's queries, and its head slice if the mask is per head."""
    if mask.shape[1] == 1 and mask.shape[2] == 1:  # a key-padding mask: the same for every query row
        return mask
    if mask.shape[1] != 1:
        if mask.shape[1] != heads:
            raise ValueError(f"mask has {mask.shape[1]} heads, attention has {heads}")
        fill = True if mask.dtype == torch.bool else 0.0
        pad = mask.new_full((mask.shape[0], padded_heads - heads, *mask.shape[2:]), fill)
        mask = torch.cat([mask, pad], dim=1)[:, h_slice]
    return mask.index_select(2, rows)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sp: SPGroup,
    seq_len: int,
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    text_first: bool = True,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
):
    """Attention over a sequence split across the SP group.

    q, k, v: this rank's chunk, BSHD [B, ceil(seq_len/sp), H, D]. text: replicated (tq, tk, tv) [B, T, H, D].
    mask: optional, over the *joint unpadded* sequence ([text; video] if text_first else [video; text]),
    broadcastable to [B, H, T+seq_len, T+seq_len]. Returns the local output chunk, plus the full text output
    (identical on all ranks) when text is given.
    """
    b, s_l, heads, d = q.shape
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q/k/v chunks differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if s_l != local_seq_len(seq_len, sp.size):
        raise ValueError(
            f"SP shard has {s_l} tokens but seq_len={seq_len} over sp={sp.size} ranks needs "
            f"ceil({seq_len}/{sp.size})={local_seq_len(seq_len, sp.size)}; split inputs with shard_sequence()"
        )
    u, r = sp.ulysses, sp.ring
    padded_heads = math.ceil(heads / u) * u
    h_l = padded_heads // u
    h_slice = slice(sp.ulysses_rank * h_l, (sp.ulysses_rank + 1) * h_l)

    qkv = _pad_dim(torch.stack([q, k, v]), 3, padded_heads)
    q_blk, k_blk, v_blk = seq_to_heads(qkv, sp.ulysses_mesh, u).unbind(0)  # [B, U*S_l, H_l, D]
    block = u * s_l
    if r > 1:
        kv = all_gather_autograd(torch.stack([k_blk, v_blk]), 2, sp.ring_mesh)
        k_all, v_all = kv.unbind(0)
    else:
        k_all, v_all = k_blk, v_blk
    k_all, v_all = k_all[:, :seq_len], v_all[:, :seq_len]  # padded keys removed == masked out

    n_text = 0
    if text is not None:
        tq, tk, tv = (_pad_dim(t, 2, padded_heads)[:, :, h_slice] for t in text)
        n_text = tq.shape[1]
        cat = (lambda t, x: torch.cat([t, x], dim=1)) if text_first else (lambda t, x: torch.cat([x, t], dim=1))
        q_blk, k_all, v_all = cat(tq, q_blk), cat(tk, k_all), cat(tv, v_all)

    local_mask = None
    if mask is not None:
        # Query rows of this rank in joint coordinates; padded query rows (past seq_len) reuse the last real
        # row so they stay finite; their outputs are dropped by gather_sequence.
        start = (sp.sp_rank // u) * block
        video_rows = (torch.arange(start, start + block, device=q.device)).clamp(max=seq_len - 1)
        offset = n_text if text_first else 0
        video_rows = video_rows + offset
        text_rows = torch.arange(n_text, device=q.device) + (0 if text_first else seq_len)
        rows = torch.cat([text_rows, video_rows]) if text_first else torch.cat([video_rows, text_rows])
        local_mask = _local_mask(mask, heads, padded_heads, h_slice, rows)

    out = attention(q_blk, k_all, v_all, mask=local_mask, backend=backend, scale=scale)
    if text is not None:
        text_out, out = (out[:, :n_text], out[:, n_text:]) if text_first else (out[:, block:], out[:, :block])
    out = heads_to_seq(out.contiguous(), sp.ulysses_mesh, u)[:, :, :heads]
    if text is None:
        return out
    text_out = all_gather_autograd(text_out, 2, sp.ulysses_mesh)
    return out, text_out[:, :, :heads]


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sp: SPGroup | None,
    seq_len: int | None = None,
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    text_first: bool = True,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
):
    """The one attention entry for models: joint text+video attention, sequence-parallel when sp is set.

    With sp=None it is plain attention over [text; video] (or [video; text]) with the same return convention,
    so a model's forward is identical with and without SP.
    """
    if sp is not None:
        return ulysses_attention(q, k, v, sp, q.shape[1] if seq_len is None else seq_len, text, text_first,
                                 mask, backend, scale)
    if text is None:
        return attention(q, k, v, mask=mask, backend=backend, scale=scale)
    n_text = text[0].shape[1]
    joined = [torch.cat([t, x], dim=1) if text_first else torch.cat([x, t], dim=1) for t, x in zip(text, (q, k, v))]
    out = attention(*joined, mask=mask, backend=backend, scale=scale)
    if text_first:
        return out[:, n_text:], out[:, :n_text]
    return out[:, : q.shape[1]], out[:, q.shape[1]:]


class SPState:
    """Per-model SP state: the group, and the global video length of the forward in flight.

    parallelize() functions create one per model, install split/gather hooks with `install_sequence_hooks`,
    and give it to the model's attention processors, which call `state.attention(...)`.
    """

    def __init__(self, sp: SPGroup | None, backend: str = "auto"):
        self.sp = sp
        self.backend = backend
        self.seq_len: int | None = None

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        self.seq_len = x.shape[dim]
        return shard_sequence(x, dim, self.sp)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if self.sp is None:
            return x
        if self.seq_len is None:
            raise RuntimeError("SPState.gather called before split: the split hook did not run this forward")
        return gather_sequence(x, dim, self.sp, self.seq_len)

    def attention(self, q, k, v, text=None, text_first=True, mask=None, scale=None):
        seq_len = self.seq_len if self.sp is not None else q.shape[1]
        return sp_attention(q, k, v, self.sp, seq_len, text, text_first, mask, self.backend, scale)


def install_sequence_hooks(state: SPState, split_module: torch.nn.Module, split_arg: str | int,
                           gather_module: torch.nn.Module, seq_dim: int = 1, gather_arg: int = 0) -> None:
    """Split the sequence entering `split_module` (its argument `split_arg`, by name or position) and gather
    the one entering `gather_module`. Used on the first transformer block and on the final norm."""

    def split_hook(module, args, kwargs):
        if isinstance(split_arg, str) and split_arg in kwargs:
            kwargs = {**kwargs, split_arg: state.split(kwargs[split_arg], seq_dim)}
        else:
            pos = split_arg if isinstance(split_arg, int) else 0
            args = (*args[:pos], state.split(args[pos], seq_dim), *args[pos + 1:])
        return args, kwargs

    def gather_hook(module, args):
        return (*args[:gather_arg], state.gather(args[gather_arg], seq_dim), *args[gather_arg + 1:])

    split_module.register_forward_pre_hook(split_hook, with_kwargs=True)
    gather_module.register_forward_pre_hook(gather_hook)
