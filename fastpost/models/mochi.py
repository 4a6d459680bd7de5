"""Mochi-1 on diffusers' MochiTransformer3DModel, with Ulysses sequence parallelism.

What the diffusers 0.42.1 forward does, and where SP goes in:
  time_embed(t, text, mask) -> temb and projected text (attention pooling over valid tokens; replicated)
  patch_embed per frame -> video tokens [B, F*H'*W', D]; MochiRoPE(pos_frequencies) -> (cos, sin) [S, H, D/2]
  blocks: per-token modulated RMSNorms and FFs; MochiAttnProcessor2_0 projects video (to_q/k/v) and text
          (add_q/k/v_proj) separately, RMS-normalises q/k per head, applies RoPE to the video only, then attends
          *per sample* over [video; that sample's valid text tokens] and returns the text output compacted to the
          front (valid outputs first, zeros after), whatever the mask's pattern. The last block is
          context_pre_only: no to_add_out, its text output is discarded.
  norm_out -> proj_out -> unpatchify
So: split `hidden_states` entering block 0, gather it entering `norm_out`, and replace every block's processor by
`MochiSPAttnProcessor`. RoPE tables are computed from the full sequence (pos_frequencies is a trained parameter)
and sliced per rank like the tokens; the per-sample loop becomes one batched masked call (identical on every
rank: the mask is replicated).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers import MochiTransformer3DModel
from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

from fastpost.attention import apply_interleaved_rope
from fastpost.components import TextSpec, VaeSpec
from fastpost.distributed.fsdp import compute_dtype
from fastpost.distributed.ulysses import SPState, shard_sequence
from fastpost.models import ModelFamily, PipelineFacts, sequence_parallel_on_blocks

FLAVORS = {
    "debug": dict(
        patch_size=2,
        num_attention_heads=3,  # divides neither sp=2 nor sp=4: the head padding path is always exercised
        attention_head_dim=8,
        num_layers=2,  # the last block is context_pre_only, so 2 layers cover both block kinds
        pooled_projection_dim=16,
        in_channels=12,  # MochiPipeline normalises 12 latent channels (the tiny Mochi VAE has 12)
        qk_norm="rms_norm",
        text_embed_dim=16,  # the caption attention pool has 8 heads: must be a multiple of 8
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ),
    # genmo/mochi-1-preview transformer/config.json: 12 latent channels, T5-XXL text (4096), 256 text tokens
    "mochi-1": dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48,
                    pooled_projection_dim=1536, in_channels=12, qk_norm="rms_norm", text_embed_dim=4096,
                    time_embed_dim=256, activation_fn="swiglu", max_sequence_length=256),
}
# fastpost's flow-matching convention (see predict): x_t = (1 - s) x0 + s noise, t = 1000 s, target noise - x0.
# A plain (non-inverted) FlowMatchEulerDiscreteScheduler integrates it; the checkpoint ships invert_sigmas=True
# because Mochi itself is called with 1000 (1 - s) and predicts x0 - noise, which predict() translates.
SCHEDULERS = {"default": dict(num_train_timesteps=1000, shift=1.0, invert_sigmas=False,
                              use_dynamic_shifting=False)}


class MochiSPAttnProcessor:
    """MochiAttnProcessor2_0 with video tokens split over the SP group and text tokens replicated.

    hidden_states: this rank's video chunk [B, S_local, D]; encoder_hidden_states: full text [B, T, D_text];
    attention_mask: [B, T] valid text tokens; image_rotary_emb: full-sequence (cos, sin) [S, H, head_dim/2].
    """

    def __init__(self, state: SPState):
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (heads, -1)))  # BSHD
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (heads, -1)))
        v = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        tq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1)))
        tk = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1)))
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        if image_rotary_emb is not None:
            cos, sin = (shard_sequence(t, 0, self.state.sp) for t in image_rotary_emb)
            q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)

        # diffusers attends per sample over [video; that sample's valid text] and returns the text output
        # compacted to the front. Here: one batched call for any mix of masks, with no host sync (it used to
        # branch on the masks with .item() in every layer): a stable sort moves each sample's valid tokens to the
        # front in order, a key-padding mask drops the rest (flash-attn runs it as varlen), and the text rows of
        # dropped tokens are zeroed, which is diffusers' layout exactly.
        valid = attention_mask.bool()
        order_BT = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        valid_BT = torch.gather(valid, 1, order_BT)  # a prefix: n_valid(b) trues, then falses
        index = order_BT[:, :, None, None].expand_as(tq)
        text = tuple(torch.gather(t, 1, index) for t in (tq, tk, tv))
        n_video = self.state.seq_len if self.state.sp is not None else q.shape[1]  # joint unpadded video length
        key_valid = torch.cat([valid_BT.new_ones(valid_BT.shape[0], n_video), valid_BT], dim=1)
        out, text_out = self.state.attention(q, k, v, text=text, text_first=False, mask=key_valid[:, None, None])
        text_out = torch.where(valid_BT[:, :, None, None], text_out, torch.zeros((), dtype=text_out.dtype,
                                                                                  device=text_out.device))

        out = attn.to_out[1](attn.to_out[0](out.flatten(2)))  # linear, dropout
        text_out = text_out.flatten(2)
        if hasattr(attn, "to_add_out"):  # absent in the last (context_pre_only) block
            text_out = attn.to_add_out(text_out)
        return out, text_out


# ---- inputs -------------------------------------------------------------------------------------------------------
def video_tokens(config, latent_shape_BCFHW: tuple) -> int:
    _, _, frames, height, width = latent_shape_BCFHW
    return frames * (height // config.patch_size) * (width // config.patch_size)


def predict(model: nn.Module, noisy_latents_BCFHW: torch.Tensor, timesteps_B: torch.Tensor,
            prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity noise - x0 [B, C, F, H, W] at t = 1000 * sigma (x_t = (1 - sigma) x0 + sigma noise).

    Mochi is called the way MochiPipeline calls it: with timestep 1000 * (1 - sigma) (its scheduler inverts the
    sigmas), and it predicts x0 - noise; both are translated here so recipes see one convention for all flow
    families. prompt_mask_BT marks valid text tokens (all-false is allowed: an empty prompt)."""
    if prompt_mask_BT is None:
        raise ValueError("Mochi needs prompt_mask_BT: it attends only to valid text tokens")
    p = model.config.patch_size
    if noisy_latents_BCFHW.shape[-2] % p or noisy_latents_BCFHW.shape[-1] % p:
        raise ValueError(f"latent height/width {tuple(noisy_latents_BCFHW.shape[-2:])} must be multiples of {p}")
    dtype = compute_dtype(model)  # latents and text in the compute dtype; the timestep stays fp32
    out = model(
        hidden_states=noisy_latents_BCFHW.to(dtype),  # Mochi takes [B, C, F, H, W] itself
        encoder_hidden_states=prompt_embeds_BTD.to(dtype),
        timestep=1000.0 - timesteps_B.float(),
        encoder_attention_mask=prompt_mask_BT.bool(),
        return_dict=False,
    )[0]
    return -out


# ---- parallelism --------------------------------------------------------------------------------------------------
def _install_processor(block: nn.Module, state: SPState) -> None:
    block.attn1.processor = MochiSPAttnProcessor(state)  # MochiAttention is a plain module: no set_processor


# SP processors on every block (with SP off they run diffusers' per-sample joint attention through fastpost's
# attention backends); with SP on, video tokens split entering block 0 and gathered entering norm_out
apply_sequence_parallel = sequence_parallel_on_blocks(_install_processor, gather_attr="norm_out")


# ---- the rest of the pipeline ---------------------------------------------------------------------------------------
def vae_factors(vae_config) -> tuple[int, int]:
    """MochiPipeline hard-codes 8 and 6, the products of the real VAE's expansions (read here from the config)."""
    return math.prod(vae_config["spatial_expansions"]), math.prod(vae_config["temporal_expansions"])


# Mochi's GroupNorm is hard-coded to 32 groups, so channels must be multiples of 32 (cpu_facts 6), and MochiPipeline
# reshapes latents_mean/std to 12 channels, so latent_channels stays 12.
VAE = VaeSpec("AutoencoderKLMochi", vae_factors, debug_config=dict(
    encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
    latent_channels=12, layers_per_block=(1, 1, 1, 1, 1), add_attention_block=(False,) * 5))
# MochiPipeline: T5-XXL with the attention mask, 256 tokens (max_sequence_length), and the transformer attends
# only to valid tokens
TEXT = TextSpec("T5EncoderModel", max_length_key="max_sequence_length", pass_mask=True, mask_used=True)
# MochiPipeline: randn [B, C, F, H, W]; 30 fps; 64 steps, guidance 4.5, 480x848x19
PIPELINE = PipelineFacts("flow_euler", "BCFHW", fps=30, steps=64, guidance_scale=4.5, size=(480, 848, 19))
# Anchored on the blocks: a bare "to_q" also matches time_embed.pooler.to_q (measured), which LoRA should not train
LORA_TARGETS = r".*transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)$"


FAMILY = ModelFamily(
    name="mochi",
    diffusers_class=MochiTransformer3DModel,
    block_class=MochiTransformerBlock,
    pipeline_class="MochiPipeline",
    flavors=FLAVORS,
    prediction_type="flow_matching",
    scheduler_class="FlowMatchEulerDiscreteScheduler",
    scheduler_configs=SCHEDULERS,
    sequence_parallel_fn=apply_sequence_parallel,
    video_tokens_fn=video_tokens,
    predict_fn=predict,
    vae=VAE,
    text=TEXT,
    pipeline=PIPELINE,
    scheduler_samplers={"FlowMatchEulerDiscreteScheduler": "flow_euler"},
    lora_targets=LORA_TARGETS,
    notes=dict(text_encoder="t5-v1_1-xxl", latent_layout="BCFHW",
               model_convention="timestep 1000 * (1 - sigma), predicts x0 - noise (predict() translates)"),
)
