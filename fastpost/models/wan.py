"""Wan 2.1 / 2.2 text-to-video on diffusers' WanTransformer3DModel, with Ulysses sequence parallelism.

What the diffusers 0.42.1 forward does, and where SP goes in:
  rope(latents) -> (cos, sin) [1, S, 1, head_dim] for the whole video; patch_embedding -> video tokens [B, S, D]
  condition_embedder(t, text[, image]) -> temb, timestep_proj ([B, 6, D]; Wan 2.2 TI2V with per-token timesteps:
      [B, S, 6, D]), projected text (and CLIP image tokens, concatenated in front of the text: I2V)
  blocks: per-token adaLN / FFN; attn1 = self-attention over the video (q/k RMSNorm over ALL heads of a token,
          "rms_norm_across_heads", then RoPE); attn2 = cross-attention of each video token to the text (and, with
          added_kv_proj_dim, a second attention to the image tokens, summed). attn1 is the only op mixing tokens.
  norm_out (+ per-sample or per-token shift/scale) -> proj_out -> unpatchify
So: split `hidden_states` entering block 0 (and a per-token timestep_proj entering every block), gather entering
`norm_out`, and replace every attn1 processor by `WanSPAttnProcessor`: q/k/v are projected and RMS-normalised on
this rank's tokens with all heads (the norm spans the heads, so it runs before the all-to-all, where every head of
a token is still local), RoPE is sliced to this rank's positions, and the Ulysses all-to-all runs the attention.
attn2 keeps diffusers' processor: each local query attends to the full, replicated text (and image) keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock, _get_qkv_projections
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from fastpost.components import TextSpec, VaeSpec
from fastpost.distributed.fsdp import compute_dtype
from fastpost.distributed.ulysses import SPState, shard_sequence
from fastpost.models import ModelFamily, PipelineFacts, sequence_parallel_on_blocks

_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=3,  # divides neither sp=2 nor sp=4: the head padding path is always exercised
    attention_head_dim=8,  # RoPE splits head_dim into t/h/w parts: 4 / 2 / 2
    in_channels=4,  # the tiny Wan VAE's z_dim
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)
# Real sizes: the diffusers_config dicts of diffusers' scripts/convert_wan_to_diffusers.py, which wrote the
# transformer/config.json of the Wan-AI/*-Diffusers checkpoints. Common: head_dim 128, patch (1, 2, 2), UMT5-XXL text
# (4096), freq_dim 256, eps 1e-6, cross_attn_norm, rms_norm_across_heads.
_REAL = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, eps=1e-6, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", out_channels=16)
_14B = dict(_REAL, num_attention_heads=40, num_layers=40, ffn_dim=13824)
FLAVORS = {
    "debug": _TINY,  # Wan 2.1 T2V layout
    # Wan 2.1 I2V layout: CLIP image tokens (image_dim) through added k/v projections in attn2, and the first-frame
    # conditioning concatenated on channels: noise (4) + frame mask (4 = the VAE's temporal factor) + image latents (4)
    "debug-i2v": {**_TINY, "in_channels": 12, "image_dim": 16, "added_kv_proj_dim": 24},
    "debug-ti2v": {**_TINY, "num_attention_heads": 5},  # Wan 2.2 TI2V layout (per-token timesteps), 5 heads
    "t2v-1.3b": {**_REAL, "num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960, "in_channels": 16},
    "t2v-14b": {**_14B, "in_channels": 16},
    "i2v-14b-480p": {**_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    "i2v-14b-720p": {**_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    "2.2-ti2v-5b": {**_REAL, "num_attention_heads": 24, "num_layers": 30, "ffn_dim": 14336, "in_channels": 48,
                    "out_channels": 48},
    # Wan 2.2 A14B: two experts of this layout each (transformer/ = high noise, transformer_2/ = low noise)
    "2.2-t2v-a14b": {**_14B, "in_channels": 16},
    "2.2-i2v-a14b": {**_14B, "in_channels": 36},
}
# The pipelines' scheduler (same script): UniPC on flow sigmas, flow_shift 3.0 (2.1, 2.2 A14B) or 5.0 (2.2 TI2V);
# a checkpoint's scheduler/scheduler_config.json overrides this (ModelFamily.scheduler_config).
_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
SCHEDULERS = {"default": _UNIPC, "2.2-ti2v-5b": {**_UNIPC, "flow_shift": 5.0},
              "debug-ti2v": {**_UNIPC, "flow_shift": 5.0}}
# Wan 2.2 A14B (pipeline model_index.json boundary_ratio): the high-noise expert owns t >= ratio * 1000
BOUNDARY_RATIOS = {"2.2-t2v-a14b": 0.875, "2.2-i2v-a14b": 0.9}


def apply_wan_rope(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding (interleaved pairs; cos/sin [1, S, 1, head_dim], float64 as diffusers
    computes them), computed the same way so the numbers match it."""
    x1, x2 = x_BSHD.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x_BSHD)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x_BSHD)


class WanSPAttnProcessor:
    """WanAttnProcessor for self-attention (attn1) with the video split over the SP group.

    hidden_states: this rank's tokens [B, S_local, D]; rotary_emb: the full-video (cos, sin) [1, S, 1, head_dim].
    With SP off it computes exactly what diffusers' processor does, through fastpost's attention backends.
    """

    def __init__(self, state: SPState):
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSPAttnProcessor is for Wan's self-attention (attn1): no encoder states, no mask")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        # rms_norm_across_heads: the norm spans all heads of a token, which are all on this rank before the all-to-all
        q_BSHD = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k_BSHD = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v_BSHD = v.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            cos, sin = (shard_sequence(t, 1, self.state.sp) for t in rotary_emb)  # this rank's positions
            q_BSHD, k_BSHD = apply_wan_rope(q_BSHD, cos, sin), apply_wan_rope(k_BSHD, cos, sin)
        out = self.state.attention(q_BSHD, k_BSHD, v_BSHD).flatten(2).type_as(q_BSHD)
        return attn.to_out[1](attn.to_out[0](out))  # linear, dropout


# ---- inputs -------------------------------------------------------------------------------------------------------
def video_tokens(config, latent_shape_BCFHW: tuple) -> int:
    _, _, frames, height, width = latent_shape_BCFHW
    p_t, p_h, p_w = config.patch_size
    return frames // p_t * (height // p_h) * (width // p_w)


def predict(model: nn.Module, noisy_latents_BCFHW: torch.Tensor, timesteps_B: torch.Tensor,
            prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching velocity noise - x0 [B, C, F, H, W] at t = 1000 * sigma: Wan's own convention, called the way
    WanPipeline calls it. timesteps_B may be per token [B, S] (Wan 2.2 TI2V's expand_timesteps). Wan attends to
    every text token (WanPipeline zero-pads prompts to 512 and passes no mask), so prompt_mask_BT is not used."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = noisy_latents_BCFHW.shape
    if frames % p_t or height % p_h or width % p_w:
        raise ValueError(f"latent frames/height/width {frames}x{height}x{width} must be multiples of the patch size "
                         f"{(p_t, p_h, p_w)}")
    dtype = compute_dtype(model)  # latents and text in the compute dtype; timesteps stay as given
    return model(hidden_states=noisy_latents_BCFHW.to(dtype), timestep=timesteps_B,
                 encoder_hidden_states=prompt_embeds_BTD.to(dtype), return_dict=False)[0]


# ---- parallelism --------------------------------------------------------------------------------------------------
def _install_processor(block: nn.Module, state: SPState) -> None:
    block.attn1.set_processor(WanSPAttnProcessor(state))


_split_and_gather = sequence_parallel_on_blocks(_install_processor, gather_attr="norm_out", blocks_attr="blocks")


def apply_sequence_parallel(model: nn.Module, dims, attention_backend: str = "auto") -> SPState:
    """SP processors on every block's attn1; with SP on, video tokens split entering block 0 and gathered entering
    norm_out, and a per-token timestep_proj [B, S, 6, D] (Wan 2.2 TI2V) split entering every block like the tokens."""
    state = _split_and_gather(model, dims, attention_backend)
    if state.sp is not None:
        def split_temb(module, args, kwargs):
            if "temb" in kwargs:
                if kwargs["temb"].ndim == 4:
                    kwargs = {**kwargs, "temb": shard_sequence(kwargs["temb"], 1, state.sp)}
            elif len(args) > 2 and args[2].ndim == 4:
                args = (*args[:2], shard_sequence(args[2], 1, state.sp), *args[3:])
            return args, kwargs

        for block in model.blocks:
            block.register_forward_pre_hook(split_temb, with_kwargs=True)
    return state


# ---- the rest of the pipeline ---------------------------------------------------------------------------------------
def vae_factors(vae_config) -> tuple[int, int]:
    """As WanPipeline: the VAE config's scale_factor_spatial (2.1: 8, 2.2: 16) and scale_factor_temporal (4)."""
    return int(vae_config.get("scale_factor_spatial") or 8), int(vae_config.get("scale_factor_temporal") or 4)


# z_dim 4 with 4-entry latents_mean/std (the pipeline reshapes them to z_dim channels); lists, not tuples: the
# Wan VAE concatenates [1] + dim_mult
VAE = VaeSpec("AutoencoderKLWan", vae_factors, debug_config=dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[1.5, 0.8, 2.0, 1.2]), channels_key="z_dim")
# WanPipeline._get_t5_prompt_embeds: prompts cleaned (ftfy, html, whitespace), UMT5 run WITH the mask, each prompt
# trimmed to its tokens and zero-padded to 512 (max_sequence_length), and the transformer attends to all 512
TEXT = TextSpec("UMT5EncoderModel", max_length_key="text_max_length", pass_mask=True, zero_padding=True,
                mask_used=False, default_max_length=512, prompt_clean=prompt_clean)
# WanPipeline: randn [B, C, F, H, W] fp32; 16 fps (export_to_video in its docs), 50 steps, guidance 5.0, 480x832x81
PIPELINE = PipelineFacts("unipc", "BCFHW", fps=16, steps=50, guidance_scale=5.0, size=(480, 832, 81))
LORA_TARGETS = r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)$"
# ComfyUI's native Wan (comfy/ldm/wan/model.py, the original Wan checkpoint names): blocks.N.self_attn.{q,k,v,o},
# cross_attn.{q,k,v,o,k_img,v_img}, ffn.0 / ffn.2
COMFY_NAMES = ((r"\.attn1\.to_out\.0$", ".self_attn.o"), (r"\.attn1\.to_([qkv])$", r".self_attn.\1"),
               (r"\.attn2\.to_out\.0$", ".cross_attn.o"), (r"\.attn2\.to_([qkv])$", r".cross_attn.\1"),
               (r"\.attn2\.add_([kv])_proj$", r".cross_attn.\1_img"), (r"\.ffn\.net\.0\.proj$", ".ffn.0"),
               (r"\.ffn\.net\.2$", ".ffn.2"))


FAMILY = ModelFamily(
    name="wan",
    diffusers_class=WanTransformer3DModel,
    block_class=WanTransformerBlock,
    pipeline_class="WanPipeline",
    flavors=FLAVORS,
    prediction_type="flow_matching",
    scheduler_class="UniPCMultistepScheduler",
    scheduler_configs=SCHEDULERS,
    sequence_parallel_fn=apply_sequence_parallel,
    video_tokens_fn=video_tokens,
    predict_fn=predict,
    vae=VAE,
    text=TEXT,
    pipeline=PIPELINE,
    scheduler_samplers={"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "flow_euler"},
    lora_targets=LORA_TARGETS,
    comfy_names=COMFY_NAMES,
    blocks_attr="blocks",
    # Wan 2.1 and 2.2 A14B were trained at 16 fps, 2.2 TI2V-5B (48 latent channels: the 2.2 VAE) at 24
    training_fps_fn=lambda config: 24 if config is not None and dict(config).get("in_channels") == 48 else 16,
    notes=dict(text_encoder="umt5-xxl", latent_layout="BCFHW", boundary_ratios=BOUNDARY_RATIOS,
               model_convention="timestep 1000 * sigma, predicts noise - x0 (fastpost's own)"),
)
