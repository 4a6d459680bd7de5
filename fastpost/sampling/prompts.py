"""Prompt embeddings for sampling: rank 0 runs the family's text encoder, frees it, and broadcasts the results."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from fastpost.sampling.mesh import broadcast_tensor

Embeds = tuple[torch.Tensor, torch.Tensor]  # ([N, T, D], [N, T])


def encode_prompts(family, text_dir: Path, prompts: list[str], negatives: list[str] | None, max_length: int,
                   device: torch.device, dtype: torch.dtype,
                   allow_pickle: bool = False) -> tuple[Embeds, Embeds | None]:
    """(cond, uncond or None) identical on every rank; collective when a process group exists. Rank 0 holds the
    encoder only while encoding (it can be larger than the transformer)."""
    n = 4 if negatives is not None else 2
    tensors: list[torch.Tensor] = []
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        from fastpost.data.text import TextEncoder

        enc = TextEncoder.from_pretrained(text_dir, family=family, device=device, dtype=dtype,
                                          allow_pickle=allow_pickle)
        tensors = list(enc.encode(prompts, max_length))
        if negatives is not None:
            tensors += list(enc.encode(negatives, max_length))
        del enc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if dist.is_initialized():
        tensors = [broadcast_tensor(tensors[i] if rank == 0 else None, None, device) for i in range(n)]
    cond = (tensors[0], tensors[1])
    return cond, ((tensors[2], tensors[3]) if negatives is not None else None)
