"""Pyramid: an MMDiT video model trained with pyramidal flow matching (Jin et al. 2024), owned by fastpost.

Package layout:
  transformer.py  PyramidDiTModel (diffusers ModelMixin + ConfigMixin: save_pretrained / from_pretrained work)
  pyramid.py      the math: stage windows, Down/Up, endpoints, block noise and the renoise correction, units
  packing.py      mixed-resolution token sequences (segments -> patches + 3D positions, and back)
  sampling.py     stage-wise Euler sampling, autoregressive units, CFG, image-to-video; a small CLI
The objective is the recipe fastpost/recipes/pyramid_flow.py; docs/pyramid.md has the derivations.

`predict()` runs the model on one full-resolution segment (all frames, block-causal when config.causal) and
returns the flow-matching velocity noise - x0 at t = 1000 sigma, so the plain `finetune` recipe trains it too
(that is pyramidal flow matching with one stage). There is no diffusers pipeline for this model:
`pipeline_class` is "" and LoRA export through a pipeline's save_lora_weights does not apply.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastpost.distributed.fsdp import compute_dtype
from fastpost.distributed.ulysses import SPState
from fastpost.models import ModelFamily, PipelineFacts, sequence_parallel_on_blocks
from fastpost.models.pyramid.packing import Packed, Segment, pack, unpack_segment
from fastpost.models.pyramid.pyramid import PyramidSpec, StageSchedule
from fastpost.models.pyramid.transformer import PyramidBlock, PyramidDiTModel

FLAVORS = {
    # 3 heads: divisible by neither sp=2 nor sp=4, so the SP head-padding path always runs
    "debug": dict(in_channels=4, patch_size=2, num_layers=2, num_attention_heads=3, attention_head_dim=16,
                  text_embed_dim=16, mlp_ratio=4.0, rope_axes_dim=(4, 6, 6), timestep_freq_dim=64, causal=True),
    "debug-full": dict(in_channels=4, patch_size=2, num_layers=2, num_attention_heads=3, attention_head_dim=16,
                       text_embed_dim=16, mlp_ratio=4.0, rope_axes_dim=(4, 6, 6), timestep_freq_dim=64, causal=False),
    # a real size: SD3-medium's trunk (24 layers x 1536 wide, ~2.0B parameters here), which Pyramid Flow's first
    # release was initialised from; for building without weights (not weight-compatible with any checkpoint)
    "2b": dict(in_channels=16, patch_size=2, num_layers=24, num_attention_heads=24, attention_head_dim=64,
               text_embed_dim=4096, mlp_ratio=4.0, rope_axes_dim=(16, 24, 24), timestep_freq_dim=256, causal=True),
}
# predict() is plain flow matching at full resolution, which a non-shifted flow-match Euler scheduler integrates;
# the pyramidal sampler (sampling.py) is what the model is trained for.
SCHEDULERS = {"default": dict(num_train_timesteps=1000, shift=1.0, invert_sigmas=False, use_dynamic_shifting=False)}


# ---- the model call -----------------------------------------------------------------------------------------------
def forward_packed(model: nn.Module, packed: Packed, timesteps_B: torch.Tensor, prompt_embeds_BTD: torch.Tensor,
                   prompt_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """Velocity patches [B, S, C p^2] of a packed (possibly mixed-resolution, padded) sequence."""
    dtype = compute_dtype(model)  # tokens and text in the compute dtype; timesteps and positions stay fp32
    return model(hidden_states=packed.tokens.to(dtype), encoder_hidden_states=prompt_embeds_BTD.to(dtype),
                 timestep=timesteps_B.float(), positions=packed.positions,
                 encoder_attention_mask=None if prompt_mask_BT is None else prompt_mask_BT.bool(),
                 token_mask=packed.token_mask)


def predict(model: nn.Module, noisy_latents_BCFHW: torch.Tensor, timesteps_B: torch.Tensor,
            prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity noise - x0 [B, C, F, H, W] at t = 1000 sigma (x_sigma = (1 - sigma) x0 + sigma noise) of one
    full-resolution segment holding every frame."""
    p = model.config.patch_size
    packed = pack([Segment(noisy_latents_BCFHW, 0, 0)], p)
    out = forward_packed(model, packed, timesteps_B, prompt_embeds_BTD, prompt_mask_BT)
    return torch.cat(unpack_segment(out, packed, 0, p))


def _forward_text(model: nn.Module, packed: Packed, timesteps_B: torch.Tensor, text: dict) -> torch.Tensor:
    return forward_packed(model, packed, timesteps_B, text["prompt_embeds"], text.get("prompt_attention_mask"))


def video_tokens(config, latent_shape_BCFHW: tuple) -> int:
    _, _, frames, height, width = latent_shape_BCFHW
    return frames * (height // config.patch_size) * (width // config.patch_size)


# ---- parallelism --------------------------------------------------------------------------------------------------
def _install_state(block: nn.Module, state: SPState) -> None:
    block.attn.sp_state = state


# every block's attention gets the model's SPState; with SP on, the video tokens are split entering block 0 and
# gathered entering norm_out (RoPE tables and the mask stay full-sequence: attention slices them)
apply_sequence_parallel = sequence_parallel_on_blocks(_install_state, gather_attr="norm_out")


FAMILY = ModelFamily(
    name="pyramid",
    diffusers_class=PyramidDiTModel,
    block_class=PyramidBlock,
    pipeline_class="",  # no diffusers pipeline exists: sample with fastpost.models.pyramid.sampling (CLI: fastpost.sampling.pyramid)
    flavors=FLAVORS,
    prediction_type="flow_matching",
    scheduler_class="FlowMatchEulerDiscreteScheduler",
    scheduler_configs=SCHEDULERS,
    sequence_parallel_fn=apply_sequence_parallel,
    video_tokens_fn=video_tokens,
    predict_fn=predict,
    vae=None,  # latents (and prompt embeddings) come from shards made with any VAE / text encoder
    text=None,
    pipeline=PipelineFacts("flow_euler"),  # predict() is one-stage flow matching; the pyramidal sampler is sampling.py
    scheduler_samplers={"FlowMatchEulerDiscreteScheduler": "flow_euler"},
    # fastpost's own conventions (t = 1000 sigma, d x / d sigma targets, full-resolution positions)
    pyramid=PyramidSpec(schedule=StageSchedule, forward=_forward_text, patch=lambda config: config.patch_size),
    lora_targets=r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)$",
    notes=dict(text_encoder="any (prompt_embeds [B, T, text_embed_dim] from the latent shards)",
               latent_layout="BCFHW", recipe="pyramid_flow",
               sampler="fastpost.models.pyramid.sampling.sample",
               model_convention="timestep 1000 * sigma, predicts d x / d sigma (noise - x0 for one stage)"),
)

__all__ = ["FAMILY", "FLAVORS", "PyramidDiTModel", "apply_sequence_parallel", "forward_packed",
           "predict", "video_tokens"]
