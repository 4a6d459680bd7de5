"""A tiny joint text+video DiT (MMDiT-style blocks, adaLN) that exercises the whole parallel core.

It is the reference model for the parallel-core tests, the CPU demo and benchmarks. Like every fastpost model it
holds no parallelism code: `parallelize()` installs SP, activation checkpointing and FSDP, in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpost.distributed.activation_checkpoint import ACConfig, apply_activation_checkpointing
from fastpost.distributed.fsdp import FSDPConfig, apply_fsdp
from fastpost.distributed.parallel_dims import ParallelDims
from fastpost.distributed.ulysses import SPGroup, SPState, install_sequence_hooks


@dataclass
class ToyDiTConfig:
    in_channels: int = 4
    text_dim: int = 16
    hidden: int = 32
    heads: int = 4
    layers: int = 2
    max_tokens: int = 512
    mlp_ratio: float = 2.0


FLAVORS = {
    "debug": ToyDiTConfig(),
    "small": ToyDiTConfig(hidden=256, heads=4, layers=8, text_dim=64, max_tokens=4096),
}


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class JointBlock(nn.Module):
    """One MMDiT block: separate weights for video and text streams, one joint attention."""

    def __init__(self, cfg: ToyDiTConfig):
        super().__init__()
        d, self.heads = cfg.hidden, cfg.heads
        self.ada = nn.Linear(d, 12 * d)  # shift/scale/gate x (attn, mlp) x (video, text)
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv, self.text_qkv = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d)
        self.proj, self.text_proj = nn.Linear(d, d), nn.Linear(d, d)
        hid = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, d))
        self.text_mlp = nn.Sequential(nn.Linear(d, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, d))
        self.sp_state = SPState(None)  # replaced by parallelize(); plain attention by default

    def forward(self, x_BND: torch.Tensor, text_BTD: torch.Tensor, c_BD: torch.Tensor):
        mods = self.ada(F.silu(c_BD)).chunk(12, dim=-1)
        (sa, ca, ga, sm, cm, gm), (tsa, tca, tga, tsm, tcm, tgm) = mods[:6], mods[6:]
        b, n, d = x_BND.shape
        q, k, v = self.qkv(_modulate(self.norm(x_BND), sa, ca)).view(b, n, 3, self.heads, -1).unbind(2)
        t = text_BTD.shape[1]
        tq, tk, tv = self.text_qkv(_modulate(self.norm(text_BTD), tsa, tca)).view(b, t, 3, self.heads, -1).unbind(2)
        out, text_out = self.sp_state.attention(q, k, v, text=(tq, tk, tv))
        x_BND = x_BND + ga[:, None] * self.proj(out.reshape(b, n, d))
        text_BTD = text_BTD + tga[:, None] * self.text_proj(text_out.reshape(b, t, d))
        x_BND = x_BND + gm[:, None] * self.mlp(_modulate(self.norm(x_BND), sm, cm))
        text_BTD = text_BTD + tgm[:, None] * self.text_mlp(_modulate(self.norm(text_BTD), tsm, tcm))
        return x_BND, text_BTD


class ToyDiT(nn.Module):
    def __init__(self, cfg: ToyDiTConfig):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"ToyDiTConfig.hidden={cfg.hidden} must be divisible by heads={cfg.heads}")
        self.cfg = cfg
        self.x_embed = nn.Linear(cfg.in_channels, cfg.hidden)
        self.text_embed = nn.Linear(cfg.text_dim, cfg.hidden)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_tokens, cfg.hidden) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(64, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.blocks = nn.ModuleList(JointBlock(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False)
        self.final_ada = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.in_channels)

    @staticmethod
    def timestep_features(t_B: torch.Tensor, dim: int = 64) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t_B.device) / (dim // 2))
        angles = t_B.float()[:, None] * 1000 * freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, x_BNC: torch.Tensor, text_BTC: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        n = x_BNC.shape[1]
        if n > self.cfg.max_tokens:
            raise ValueError(f"{n} video tokens exceed ToyDiTConfig.max_tokens={self.cfg.max_tokens}")
        dtype = self.x_embed.weight.dtype  # the compute dtype (bf16 under FSDP mixed precision)
        x = self.x_embed(x_BNC.to(dtype)) + self.pos_embed[:n]
        text = self.text_embed(text_BTC.to(dtype))
        c = self.t_embed(self.timestep_features(t_B).to(x.dtype))
        for block in self.blocks:
            x, text = block(x, text, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(x), shift, scale))


def parallelize(model: ToyDiT, dims: ParallelDims, ac: ACConfig | None = None, fsdp: FSDPConfig | None = None,
                attention_backend: str = "auto") -> ToyDiT:
    """Apply, in this order: (1) sequence parallel, (2) activation checkpointing, (3) FSDP2.

    SP hooks go on before AC so the split happens outside the checkpointed region (once, not again in
    recompute); AC goes on before FSDP so each FSDP unit is a checkpointed block.
    """
    state = SPState(SPGroup.from_dims(dims), backend=attention_backend)
    for block in model.blocks:
        block.sp_state = state
    if state.sp is not None:
        install_sequence_hooks(state, model.blocks[0], split_arg=0, gather_module=model.final_norm)
    apply_activation_checkpointing(model.blocks, ac or ACConfig())
    apply_fsdp(model, model.blocks, dims, fsdp or FSDPConfig())
    return model
