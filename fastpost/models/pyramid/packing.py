"""Video token sequences made of latent segments at different resolutions (the temporal pyramid), and back.

A sequence is a list of `Segment`s: latents [B, C, F, h, w] at 1/2^level of the full resolution, whose first
frame is latent frame `frame_start`. Tokens are p x p patches, flattened in (segment, frame, row, column) order.
Each token carries a 3D position (frame, row, column) in full-resolution patch-grid units: a coarse token sits at
the centre of the full-resolution patches it covers, (i + 1/2) 2^level - 1/2, so rotary embeddings mean the same
place at every pyramid resolution. The frame coordinate is the latent frame index; the block-causal mask reads it.
Samples of one batch may have different segment lists (training draws stages and units per sample): `pad_batch`
right-pads them to one length and marks the real tokens in `token_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Segment:
    latents: torch.Tensor  # [B, C, F, h, w]
    frame_start: int  # latent frame index of latents[:, :, 0]
    level: int  # resolution = full / 2^level


@dataclass
class Packed:
    tokens: torch.Tensor  # [B, S, C*p*p]
    positions: torch.Tensor  # [B, S, 3] float (frame, row, column) in full-resolution patch units
    token_mask: torch.Tensor | None  # [B, S] bool, True = real token; None = all real
    layouts: list[list[tuple[int, tuple[int, ...]]]]  # per sample: (token offset, latents shape [C, F, h, w])
    channels_last: bool = False  # patch features (p1 p2 c) instead of (c p1 p2)


def patchify(x_BCFHW: torch.Tensor, p: int, channels_last: bool = False) -> torch.Tensor:
    """[B, C, F, h, w] -> [B, F*(h/p)*(w/p), C*p*p] (token order frame, row, column; features (c p1 p2), or
    (p1 p2 c) with channels_last, the order of Flux-style models)."""
    b, c, f, h, w = x_BCFHW.shape
    if h % p or w % p:
        raise ValueError(f"latent {h}x{w} is not divisible by the patch size {p}")
    x = x_BCFHW.reshape(b, c, f, h // p, p, w // p, p)
    x = x.permute(0, 2, 3, 5, 4, 6, 1) if channels_last else x.permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, f * (h // p) * (w // p), c * p * p)


def unpatchify(tokens_BND: torch.Tensor, shape_CFHW: tuple[int, ...], p: int, channels_last: bool = False):
    c, f, h, w = shape_CFHW
    b = tokens_BND.shape[0]
    if channels_last:
        x = tokens_BND.reshape(b, f, h // p, w // p, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
    else:
        x = tokens_BND.reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, f, h, w)


def segment_positions(frames: int, frame_start: int, h_tokens: int, w_tokens: int, level: int) -> torch.Tensor:
    """[F*h*w, 3] float64 positions of a segment's tokens."""
    scale = 2.0 ** level
    f = torch.arange(frame_start, frame_start + frames, dtype=torch.float64)
    i = (torch.arange(h_tokens, dtype=torch.float64) + 0.5) * scale - 0.5
    j = (torch.arange(w_tokens, dtype=torch.float64) + 0.5) * scale - 0.5
    grid = torch.stack(torch.meshgrid(f, i, j, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def pack(segments: list[Segment], p: int, schedule=None) -> Packed:
    """Concatenate segments (same structure for every sample of the batch) into one token sequence. `schedule`
    (a StageSchedule; None: fastpost's) sets the patch feature order and the position rule."""
    if not segments:
        raise ValueError("a sequence needs at least one segment")
    channels_last = bool(getattr(schedule, "channels_last", False))
    tokens, positions, layout, offset = [], [], [], 0
    b = segments[0].latents.shape[0]
    cur_h, cur_w = (n // p for n in segments[-1].latents.shape[-2:])
    for seg in segments:
        _, c, f, h, w = seg.latents.shape
        tokens.append(patchify(seg.latents, p, channels_last))
        if schedule is None:
            positions.append(segment_positions(f, seg.frame_start, h // p, w // p, seg.level))
        else:
            positions.append(schedule.positions(f, seg.frame_start, h // p, w // p, seg.level, (cur_h, cur_w)))
        layout.append((offset, (c, f, h, w)))
        offset += tokens[-1].shape[1]
    pos = torch.cat(positions).to(device=segments[0].latents.device, dtype=torch.float32)
    return Packed(torch.cat(tokens, dim=1), pos.expand(b, -1, -1), None, [list(layout) for _ in range(b)],
                  channels_last)


def pad_batch(samples: list[Packed]) -> Packed:
    """Stack one-sample sequences of different lengths, right-padded; padded tokens are masked out of attention."""
    lengths = [s.tokens.shape[1] for s in samples]
    n = max(lengths)
    tokens = torch.cat([F.pad(s.tokens, (0, 0, 0, n - s.tokens.shape[1])) for s in samples])
    # padding sits at a far-future frame: it never precedes a real token in the block-causal order
    positions = torch.cat([F.pad(s.positions, (0, 0, 0, n - s.positions.shape[1]), value=1e6) for s in samples])
    token_mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).to(tokens.device)
    layouts = [lay for s in samples for lay in s.layouts]
    return Packed(tokens, positions, None if all(v == n for v in lengths) else token_mask, layouts,
                  samples[0].channels_last)


def unpack_segment(out_BSD: torch.Tensor, packed: Packed, index: int, p: int) -> list[torch.Tensor]:
    """Segment `index` (e.g. -1: the current unit) of every sample, each as [1, C, F, h, w] (shapes may differ)."""
    outs = []
    for b, layout in enumerate(packed.layouts):
        offset, shape = layout[index]
        c, f, h, w = shape
        n = f * (h // p) * (w // p)
        outs.append(unpatchify(out_BSD[b:b + 1, offset:offset + n], shape, p, packed.channels_last))
    return outs
