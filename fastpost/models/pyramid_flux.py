"""pyramid_flux: Pyramid Flow's released miniflux (`rain1011/pyramid-flow-miniflux`, `diffusion_transformer_384p`,
`_768p`, `_image`) on diffusers' FluxTransformer2DModel(guidance_embeds=False), trained with pyramidal flow
matching in the conventions of the release (the `MinifluxSchedule` below).

The released transformer has diffusers' Flux parameter names and math, so a `diffusion_transformer_*` folder loads
as it is: its config.json also carries four keys of the upstream class (interp_condition_pos, use_flash_attn,
use_gradient_checkpointing, use_temporal_causal; plus _class_name PyramidFluxTransformer). diffusers' from_config
ignores unknown keys (it logs their names), and none of them changes the math we run: the
block-causal mask and the interpolated history positions are always on here, as the release was trained.

The model call is not FluxTransformer2DModel.forward (its RoPE table is shared by the batch and it has no mask):
`forward_packed` runs the model's own modules on a packed mixed-resolution sequence with
  tokens      2x2 latent patches with features in (p1 p2 c) order -> x_embedder
  temb        time_text_embed(t, CLIP pooled), t the upstream timestep in [1, 1000] (diffusers' forward would be
              fed t / 1000: it multiplies by 1000)
  RoPE        per-sample tables from model.pos_embed on ids [text: (0,0,0); video: (frame, row, col)], rows and
              columns on the current unit's token grid, coarser history clips interpolated onto it
  mask        upstream's rule: a query sees keys of its own group (valid text and video; padded text alone) whose
              frame is <= its own, text counting as frame 0 (so text sees text and frame-0 video)
  blocks      both block lists unchanged; their FluxAttention gets fastpost's processor (`FluxSPProcessor`),
              which applies the per-sample RoPE, the mask and Ulysses SP (text replicated, video split)
The SP split happens entering transformer_blocks[0], the gather entering norm_out; the single-stream blocks keep
text and video apart at their boundaries (diffusers returns them separately), so video stays split throughout.
30 heads divide neither sp 4 nor sp 8: Ulysses pads heads (ulysses.py).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from fastpost.distributed.fsdp import compute_dtype
from fastpost.distributed.ulysses import SPState, shard_sequence
from fastpost.models import ModelFamily, PipelineFacts, sequence_parallel_on_blocks
from fastpost.models.pyramid.packing import Packed
from fastpost.models.pyramid.pyramid import PAPER_STAGE_RANGE, PyramidSpec, StageSchedule

LATENT_CHANNELS = 16
PATCH = 2  # upstream hard-codes 2x2 latent patches outside the model (the config's patch_size is 1)
BLOCKS = ("transformer_blocks", "single_transformer_blocks")


def _flux(channels: int, layers: int, single: int, heads: int, head_dim: int, text: int, pooled: int, axes):
    return dict(patch_size=1, in_channels=channels * PATCH * PATCH, num_layers=layers, num_single_layers=single,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text,
                pooled_projection_dim=pooled, guidance_embeds=False, axes_dims_rope=tuple(axes))


FLAVORS = {
    # 3 heads: divisible by neither sp 2 nor sp 4, so the SP head-padding path runs (as 30 heads at sp 4/8 do)
    "debug": _flux(4, 1, 1, 3, 16, 16, 8, (4, 6, 6)),
    # the released miniflux: 8 double- and 16 single-stream blocks, 30 x 64, T5-XXL (4096) + CLIP-L pooled (768);
    # 384p, 768p and image checkpoints share it (for building without weights: plan, docs)
    "miniflux": _flux(LATENT_CHANNELS, 8, 16, 30, 64, 4096, 768, (16, 24, 24)),
}
# diffusers' plain flow-match scheduler runs one-stage flow matching; the pyramidal sampler is what the model needs
SCHEDULERS = {"default": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)}
# what the release's pipeline does: latents normalised per frame (frame 0 like an image), see the importer
LATENT_NORM = {"first_frame": {"shift": -0.04, "scale": 1 / 1.8726}, "other_frames": {"shift": -0.2343,
                                                                                       "scale": 1 / 3.0986}}
PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"  # appended to every prompt at inference by the release
NEGATIVE_PROMPT = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
                   "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror")


# ---- the conventions the release was trained with -------------------------------------------------------------------
@dataclass(frozen=True)
class MinifluxSchedule(StageSchedule):
    """Pyramid Flow's scheduler (PyramidFlowMatchEulerDiscreteScheduler, shift 1) in fastpost's stage terms.

    - sigmas live on the grid (1000 - i) / 1000 (float32); stage ends are read there at int(b * 1000): 0.667,
      0.334, 0; starts are the renoise-corrected ends of the previous stage: 1.0, 0.80024, 0.50075;
    - lam (upstream's "ratio") runs 1 -> 0 in a stage; x = end + lam (start - end); the target is start - end
      (d x / d lam: not divided by the stage width); Euler steps in lam;
    - the model timestep is NOT 1000 sigma: the stages lie end to end over [1000, 1] in proportion to their
      sigma lengths, windows [1000, 744], [744, 386], [386, 1], and t moves linearly with lam;
    - training draws lam on the 1/1000 grid (1, 0.999, ..., 0.001); inference uses linspace(1, 0.001, n) + [0];
    - stage weights 1:2:1; patches (p1 p2 c); positions on the current unit's token grid; the empty prompt for
      caption dropout is the encoding of "" (not zeros).
    """

    stage_range: tuple[float, ...] = PAPER_STAGE_RANGE
    gamma: float = 1.0 / 3.0
    num_train_timesteps: int = 1000

    channels_last: ClassVar[bool] = True
    default_stage_weights: ClassVar[tuple[float, ...] | None] = (1.0, 2.0, 1.0)
    null_text: ClassVar[str] = "empty_prompt"

    def _sigma_at(self, index: int) -> float:
        n = self.num_train_timesteps
        return (torch.tensor(float(n - index), dtype=torch.float32) / n).item()  # upstream's float32 grid

    def sigma_end(self, stage: int) -> float:
        n = self.num_train_timesteps
        index = min(int(self.stage_range[stage + 1] * n), n)
        return self._sigma_at(index) if index < n else 0.0

    def timestep_window(self, stage: int) -> tuple[float, float]:
        """(t_max, t_min): the model timesteps at lam = 1 and at lam = 0 of a stage."""
        n, k = self.num_train_timesteps, self.num_stages
        lengths = [self.sigma_start(i) - self.sigma_end(i) for i in range(k)]
        total = sum(lengths)
        start = 0.0 if stage == 0 else sum(lengths[:stage]) / total
        end = 1.0 if stage == k - 1 else sum(lengths[:stage + 1]) / total
        times = lambda i: (torch.tensor(self._sigma_at(i), dtype=torch.float32) * n).item()  # noqa: E731
        return times(int(start * n)), times(min(int(end * n), n - 1))

    def lam_from_uniform(self, u_B: torch.Tensor) -> torch.Tensor:
        n = self.num_train_timesteps
        index = (u_B * n).long().clamp(0, n - 1)
        return index.double() * (-1.0 / n) + 1.0  # np.linspace(1, 0, n + 1)[index]

    def model_timestep(self, stage: int, lam):
        t_max, t_min = self.timestep_window(stage)
        return t_max + (t_min - t_max) * (1.0 - lam)  # np.linspace(t_max, t_min, n + 1)[index]

    def target_scale(self, stage: int) -> float:
        return 1.0

    def lam_grid(self, stage: int, steps: int) -> list[float]:
        if steps < 1:
            raise ValueError(f"each stage needs at least one step, got {steps}")
        n = self.num_train_timesteps
        last = (n - 1) * (-1.0 / n) + 1.0  # the smallest training ratio, 0.001
        return [*torch.linspace(1.0, last, steps, dtype=torch.float64).tolist(), 0.0]

    def positions(self, frames: int, frame_start: int, h_tokens: int, w_tokens: int, level: int,
                  current_hw: tuple[int, int]) -> torch.Tensor:
        """[F*h*w, 3]: (latent frame, row, column) on the current unit's token grid; a coarser clip's rows are
        where linear interpolation (align_corners=False) of arange(H) to h samples puts them."""
        def axis(n: int, full: int) -> torch.Tensor:
            i = torch.arange(n, dtype=torch.float64)
            return i if n == full else (i + 0.5) * (full / n) - 0.5

        f = torch.arange(frame_start, frame_start + frames, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(f, axis(h_tokens, current_hw[0]), axis(w_tokens, current_hw[1]),
                                          indexing="ij"), dim=-1)
        return grid.reshape(-1, 3)


def joint_mask(text_mask_BT: torch.Tensor, frame_BS: torch.Tensor, token_mask_BS: torch.Tensor | None):
    """Bool [B, 1, T+S, T+S] over [text; video] (True: may attend): upstream's group ids (valid text and video 1,
    padded text 0) must match and the key's frame must be <= the query's (text is frame 0). Batch padding (a
    fastpost addition; upstream runs stages as separate sequences) is its own group, so no real token sees it."""
    b, t = text_mask_BT.shape
    video_group = torch.ones_like(frame_BS, dtype=torch.long)
    if token_mask_BS is not None:
        video_group = torch.where(token_mask_BS, video_group, 2)
    group = torch.cat([text_mask_BT.long().clamp(max=1), video_group], dim=1)
    frame = torch.cat([torch.zeros(b, t, dtype=frame_BS.dtype, device=frame_BS.device), frame_BS], dim=1)
    mask = (group[:, :, None] == group[:, None, :]) & (frame[:, None, :] <= frame[:, :, None])
    return mask[:, None]


@dataclass
class FluxJointInputs:
    """What every block's attention needs besides its hidden states, passed in diffusers' image_rotary_emb slot."""

    cos: torch.Tensor  # [B, T+S, head_dim] fp32, full sequence (attention takes this rank's video rows)
    sin: torch.Tensor
    mask: torch.Tensor  # [B, 1, T+S, T+S] bool
    n_text: int


def rope_tables(model: nn.Module, ids_BN3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (cos, sin) [B, N, head_dim] from the model's own FluxPosEmbed (one row of ids at a time)."""
    b, n, _ = ids_BN3.shape
    cos, sin = model.pos_embed(ids_BN3.reshape(b * n, 3))
    return cos.reshape(b, n, -1).float(), sin.reshape(b, n, -1).float()


def _rope(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb (use_real, unbind -1) with per-sample tables."""
    real, imag = x_BSHD.reshape(*x_BSHD.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    cos, sin = cos_BSD[:, :, None], sin_BSD[:, :, None]
    return (x_BSHD.float() * cos + rotated.float() * sin).to(x_BSHD.dtype)


class FluxSPProcessor:
    """Attention processor for both Flux block types: per-sample RoPE, the joint mask, and Ulysses SP through the
    model's SPState (text replicated on every rank, video split). Double-stream blocks pass the text as
    encoder_hidden_states; single-stream blocks pass [text; video] as one tensor (split here at n_text)."""

    def __init__(self, state: SPState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb: FluxJointInputs | None = None):
        ctx = image_rotary_emb
        if not isinstance(ctx, FluxJointInputs):
            raise TypeError("pyramid_flux blocks run through fastpost.models.pyramid_flux.forward_packed (per-sample "
                            "RoPE and the causal mask); FluxTransformer2DModel.forward is not supported here")
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        single = encoder_hidden_states is None
        if single:  # [text; video] in one tensor, projected with the same weights
            n = ctx.n_text
            (tq, q), (tk, k), (tv, v) = ((t[:, :n], t[:, n:]) for t in (q, k, v))
        else:
            e = encoder_hidden_states
            tq, tk, tv = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        n = tq.shape[1]
        cos_t, sin_t = ctx.cos[:, :n], ctx.sin[:, :n]
        cos_v, sin_v = (shard_sequence(t[:, n:], 1, self.state.sp) for t in (ctx.cos, ctx.sin))
        q, k = _rope(q, cos_v, sin_v), _rope(k, cos_v, sin_v)
        tq, tk = _rope(tq, cos_t, sin_t), _rope(tk, cos_t, sin_t)
        out, text_out = self.state.attention(q, k, v, text=(tq, tk, tv), text_first=True, mask=ctx.mask)
        out, text_out = out.flatten(2).to(q.dtype), text_out.flatten(2).to(q.dtype)
        if single:
            return torch.cat([text_out, out], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(text_out)


def _install_processor(block: nn.Module, state: SPState) -> None:
    block.attn.set_processor(FluxSPProcessor(state))


_processors_and_hooks = sequence_parallel_on_blocks(_install_processor, gather_attr="norm_out", blocks_attr=BLOCKS)


def apply_sequence_parallel(model: nn.Module, dims, attention_backend: str = "auto") -> SPState:
    """Step 1 of parallelize: fastpost's processor on every block (+ the split/gather hooks with SP on), and the
    model's forward becomes the packed call, so that FSDP's root hooks (which gather the embedders and norm_out)
    run around it as they do around any forward."""
    state = _processors_and_hooks(model, dims, attention_backend)
    model.forward = types.MethodType(_forward, model)  # a bound method: deepcopy rebinds it to the copy
    model._fastpost_packed_forward = True
    return state


# ---- the model call -------------------------------------------------------------------------------------------------
def forward_packed(model: nn.Module, packed: Packed, timesteps_B: torch.Tensor, text: dict) -> torch.Tensor:
    """Velocity patches [B, S, 4 C] ((p1 p2 c) features) of a packed sequence. `text`: prompt_embeds [B, T, 4096],
    prompt_attention_mask [B, T], pooled_prompt_embeds [B, 768]; timesteps_B in upstream units ([1, 1000]).
    The model must have been through the family's apply_sequence_parallel / parallelize (the builder does it)."""
    if not getattr(model, "_fastpost_packed_forward", False):
        raise ValueError("this FluxTransformer2DModel has not been prepared for pyramid_flux: build it with "
                         "fastpost.builder.build_model or call FAMILY.apply_sequence_parallel(model, dims) first")
    return model(packed, timesteps_B, text)


def _forward(model: nn.Module, packed: Packed, timesteps_B: torch.Tensor, text: dict) -> torch.Tensor:
    if text.get("pooled_prompt_embeds") is None:
        raise ValueError("pyramid_flux needs pooled_prompt_embeds (the CLIP-L pooled prompt) in every batch: import "
                         "upstream text features with `fastpost import-pyramid`")
    dtype = compute_dtype(model)
    embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
    b, t = embeds.shape[:2]
    mask_BT = text.get("prompt_attention_mask")
    mask_BT = torch.ones(b, t, dtype=torch.bool, device=embeds.device) if mask_BT is None else mask_BT.bool()
    x = model.x_embedder(packed.tokens.to(dtype))
    temb = model.time_text_embed(timesteps_B.to(dtype), pooled.to(dtype))
    txt = model.context_embedder(embeds.to(dtype))
    ids = torch.cat([torch.zeros(b, t, 3, device=x.device), packed.positions.to(x.device)], dim=1)
    cos, sin = rope_tables(model, ids)
    ctx = FluxJointInputs(cos, sin, joint_mask(mask_BT.to(x.device), packed.positions[..., 0], packed.token_mask), t)
    for name in BLOCKS:
        for block in getattr(model, name):
            txt, x = block(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=ctx)
    return model.proj_out(model.norm_out(x, temb))


def predict(model, noisy_latents_BCFHW, timesteps_B, prompt_embeds_BTD, prompt_mask_BT=None):
    raise ValueError("pyramid_flux models are trained and sampled stage-wise with the CLIP pooled prompt: use "
                     "recipe: pyramid_flow and python -m fastpost.sampling.pyramid (recipe: finetune does not apply)")


def video_tokens(config, latent_shape_BCFHW: tuple) -> int:
    _, _, frames, height, width = latent_shape_BCFHW
    return frames * (height // PATCH) * (width // PATCH)


# ---- planning (fastpost plan) ---------------------------------------------------------------------------------------
VAE_SPATIAL, VAE_TEMPORAL = 8, 8  # the causal video VAE: 8x spatial, 8x temporal (pixel frames 8k + 1)
TEXT_LENGTH = 128  # T5 max_length of the release


def plan_sequence(config, height: int, width: int, frames: int) -> tuple[int, int]:
    """The longest packed sequence recipe pyramid_flow trains (frame_per_unit 1, all history): the last unit at
    the finest stage, the unit before it at full resolution, the one before that at 1/2, the rest at 1/4."""
    if height % (VAE_SPATIAL * PATCH * 4) or width % (VAE_SPATIAL * PATCH * 4) or (frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"{height}x{width}x{frames}: height and width must be multiples of "
                         f"{VAE_SPATIAL * PATCH * 4} (VAE 8 x patch 2 x 2^(stages-1)), frames 8k + 1")
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    tokens = (height // VAE_SPATIAL // PATCH) * (width // VAE_SPATIAL // PATCH)
    full = min(latent_frames, 2)
    half = 1 if latent_frames > 2 else 0
    quarter = max(latent_frames - 3, 0)
    return full * tokens + half * tokens // 4 + quarter * tokens // 16, TEXT_LENGTH


def probe(model: nn.Module, config, grid: tuple[int, int, int], text: int):
    """One packed forward of the planner's probe model on an f x h x w token grid."""
    from fastpost.distributed.parallel_dims import ParallelDims
    from fastpost.models.pyramid.packing import Segment, pack

    apply_sequence_parallel(model, ParallelDims(world_size=1))
    f, h, w = grid
    channels = config["in_channels"] // (PATCH * PATCH)
    packed = pack([Segment(torch.randn(1, channels, f, h * PATCH, w * PATCH), 0, 0)], PATCH, MinifluxSchedule())
    inputs = {"prompt_embeds": torch.randn(1, text, config["joint_attention_dim"]),
              "prompt_attention_mask": torch.ones(1, text, dtype=torch.bool),
              "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"])}
    return lambda: forward_packed(model, packed, torch.tensor([500.0]), inputs)


PYRAMID = PyramidSpec(schedule=MinifluxSchedule, forward=forward_packed, patch=PATCH, guidance=(7.0, 5.0),
                      first_frame_steps=(20, 20, 20), steps=(10, 10, 10), plan_sequence=plan_sequence, probe=probe)

FAMILY = ModelFamily(
    name="pyramid_flux",
    diffusers_class=FluxTransformer2DModel,
    block_class=(FluxTransformerBlock, FluxSingleTransformerBlock),
    pipeline_class="FluxPipeline",  # LoRA export: FluxPipeline.save_lora_weights (diffusers' Flux LoRA keys)
    flavors=FLAVORS,
    prediction_type="flow_matching",
    scheduler_class="FlowMatchEulerDiscreteScheduler",
    scheduler_configs=SCHEDULERS,
    sequence_parallel_fn=apply_sequence_parallel,
    video_tokens_fn=video_tokens,
    predict_fn=predict,
    vae=None,  # the causal video VAE is not fastpost's: latents come from upstream's extractor (importer) or vae_class
    text=None,  # T5-XXL (128, masked) + CLIP-L pooled: from upstream's text features or fastpost's preprocessing
    pipeline=PipelineFacts("flow_euler", fps=24, steps=10, guidance_scale=7.0),
    scheduler_samplers={"FlowMatchEulerDiscreteScheduler": "flow_euler"},
    # diffusers' Flux LoRA names: the attention projections of both block types
    lora_targets=r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)$",
    default_flavor="debug",
    blocks_attr=BLOCKS,
    latent_patch=(1, PATCH, PATCH),
    pyramid=PYRAMID,
    notes=dict(checkpoint="rain1011/pyramid-flow-miniflux: diffusion_transformer_384p / _768p / _image",
               latent_norm=LATENT_NORM, prompt_suffix=PROMPT_SUFFIX, negative_prompt=NEGATIVE_PROMPT,
               text="T5-XXL max_length 128 with its mask + CLIP-L pooler output; caption dropout 10% to the "
                    "encoding of \"\"", recipe="pyramid_flow", fps=24),
)

__all__ = ["FAMILY", "FLAVORS", "FluxJointInputs", "FluxSPProcessor", "MinifluxSchedule", "forward_packed",
           "joint_mask", "rope_tables"]
