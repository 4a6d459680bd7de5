"""Ulysses (and ring-degree) attention equals single-process attention: outputs and q/k/v gradients, fp32."""

import itertools

import pytest
import torch
import torch.distributed as dist

from fastpost.distributed import ParallelDims
from fastpost.distributed.ulysses import SPGroup, gather_sequence, local_seq_len, shard_sequence, sp_attention
from tests._harness import run_distributed

TOL = 1e-5


def _case(dims: ParallelDims, seq_len: int, heads: int, n_text: int, text_first: bool, use_mask: bool) -> float:
    """Run one configuration on this rank; returns the max abs error (asserted by the caller)."""
    sp = SPGroup.from_dims(dims)
    g = torch.Generator().manual_seed(seq_len * 100 + heads * 10 + n_text)
    b, d = 2, 8
    q, k, v = (torch.randn(b, seq_len, heads, d, generator=g) for _ in range(3))
    text = tuple(torch.randn(b, n_text, heads, d, generator=g) for _ in range(3)) if n_text else None
    w_out = torch.randn(b, seq_len, heads, d, generator=g)
    w_text = torch.randn(b, n_text, heads, d, generator=g)
    mask = None
    if use_mask:
        total = seq_len + n_text
        mask = torch.rand(b, heads, total, total, generator=g) > 0.3
        mask[..., 0] = True  # every query attends to something
        mask[..., -1] = True

    # single-process reference
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_text = tuple(t.clone().requires_grad_() for t in text) if text else None
    ref = sp_attention(*ref_in, sp=None, text=ref_text, text_first=text_first, mask=mask)
    ref_out, ref_text_out = (ref if text else (ref, None))
    loss = (ref_out * w_out).sum() + ((ref_text_out * w_text).sum() if text else 0)
    loss.backward()

    # sequence parallel: local loss per rank so the summed loss equals the reference loss
    loc_in = [shard_sequence(t, 1, sp).detach().clone().requires_grad_() for t in (q, k, v)]
    loc_text = tuple(t.clone().requires_grad_() for t in text) if text else None
    out = sp_attention(*loc_in, sp=sp, seq_len=seq_len, text=loc_text, text_first=text_first, mask=mask)
    out, text_out = (out if text else (out, None))
    w_loc = shard_sequence(w_out, 1, sp)
    loss = (out * w_loc).sum() + ((text_out * w_text).sum() / sp.size if text else 0)
    loss.backward()

    errs = [(gather_sequence(out, 1, sp, seq_len) - ref_out).abs().max()]
    for loc, r in zip(loc_in, ref_in):
        errs.append((loc.grad - shard_sequence(r.grad, 1, sp)).abs().max())
    if text:
        errs.append((text_out - ref_text_out).abs().max())
        for loc, r in zip(loc_text, ref_text):
            grad = loc.grad.clone()
            dist.all_reduce(grad, group=sp.sp_mesh.get_group())  # each rank owns its head slice of text
            errs.append((grad - r.grad).abs().max())
    return max(e.item() for e in errs)


def _worker(rank: int, world: int, layouts: list[tuple[int, int]]) -> None:
    failures = []
    for ulysses, ring in layouts:
        dims = ParallelDims(ulysses=ulysses, ring=ring, world_size=world)
        dims.build_mesh("cpu")
        sp = ulysses * ring
        for seq_len, heads, n_text, text_first, use_mask in itertools.product(
            (4 * sp, 4 * sp + 1),  # divisible and not divisible by sp
            (4, 3, 6),  # heads: divisible by 2, not by 2, not by 4
            (0, 5),  # video only / joint text+video
            (True, False),
            (False, True),
        ):
            if n_text == 0 and not text_first:
                continue
            err = _case(dims, seq_len, heads, n_text, text_first, use_mask)
            if err > TOL:
                failures.append((ulysses, ring, seq_len, heads, n_text, text_first, use_mask, err))
    assert not failures, f"rank {rank}: ulysses, ring, seq, heads, text, text_first, mask, err: {failures}"


@pytest.mark.parametrize(
    "world,layouts",
    [(2, [(2, 1), (1, 2)]), (4, [(4, 1), (2, 2), (2, 1)])],  # (2, 1) at world 4 = dp2 x sp2
    ids=["world2", "world4"],
)
def test_ulysses_matches_single_process(world, layouts):
    run_distributed(_worker, world, layouts)


def test_shard_length_mismatch_is_a_clear_error():
    sp = SPGroup(sp_mesh=None, ulysses_mesh=None, ring_mesh=None, ulysses=2, ring=1, sp_rank=0, ulysses_rank=0)
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match=r"SP shard has 5 tokens but seq_len=16 over sp=2"):
        sp_attention(q, q, q, sp=sp, seq_len=16)
    assert local_seq_len(13, 4) == 4
