"""CogVideoX (1.0: 2b / 5b, and 1.5) on diffusers' CogVideoXTransformer3DModel, with Ulysses sequence parallelism.

What the diffusers 0.42.1 forward does, and where SP goes in:
  patch_embed(text, video) -> [text; video] tokens, split into encoder_hidden_states / hidden_states
  blocks: per-token adaLN (CogVideoXLayerNormZero) and FF (on cat[text, video], per token); attention is the
          only op that mixes tokens. CogVideoXAttnProcessor2_0 concatenates [text; video], applies q/k LayerNorm
          per head, RoPE on the video part only, SDPA, one to_out projection, and splits back.
  norm_final -> norm_out -> proj_out -> unpatchify, on video tokens only (older diffusers ran norm_final on
  [text; video] for 1.0; a per-token LayerNorm, so the same numbers; 0.42.1 no longer concatenates)
So: split `hidden_states` entering block 0 (pre-hook), gather it entering `norm_final` (pre-hook), and replace
every block's processor by `CogVideoXSPAttnProcessor`, which keeps text tokens replicated and slices the
full-sequence rotary tables to this rank's video positions exactly the way shard_sequence slices the tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from fastpost.components import TextSpec, VaeSpec
from fastpost.distributed.fsdp import compute_dtype
from fastpost.distributed.ulysses import SPState, shard_sequence
from fastpost.models import ImageConditioning, ModelFamily, PipelineFacts, sequence_parallel_on_blocks

_TINY = dict(
    num_attention_heads=3,  # 3 heads: divides neither sp=2 nor sp=4, so the head padding path is always exercised
    attention_head_dim=16,  # RoPE needs head_dim // 8 * 3 even
    in_channels=4,
    out_channels=4,
    time_embed_dim=4,
    text_embed_dim=16,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=9,  # 3 latent frames
    patch_size=2,
    max_text_seq_length=8,  # 1.0 without RoPE adds a [text; video] sincos table: prompt length must equal this
)
# Real sizes (the transformer/config.json of THUDM/CogVideoX-2b, -5b and CogVideoX1.5-5B); unset keys are
# diffusers' defaults: 16 latent channels, head_dim 64, text dim 4096 (T5-XXL), 226 text tokens, patch 2.
_REAL = dict(attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
             max_text_seq_length=226, patch_size=2, temporal_compression_ratio=4)
FLAVORS = {
    "debug": _TINY,  # 1.0-2b layout: sincos positional embedding, no RoPE
    "debug-rotary": {**_TINY, "use_rotary_positional_embeddings": True},  # 1.0-5b layout
    # 1.5 RoPE slices positions out of a (sample_height/p, sample_width/p) grid: latents may not be larger
    "debug-1.5": {**_TINY, "use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False,
                  "sample_height": 16, "sample_width": 16},
    "2b": {**_REAL, "num_attention_heads": 30, "num_layers": 30, "sample_height": 60, "sample_width": 90,
           "sample_frames": 49},
    "5b": {**_REAL, "num_attention_heads": 48, "num_layers": 42, "sample_height": 60, "sample_width": 90,
           "sample_frames": 49, "use_rotary_positional_embeddings": True},
    "1.5-5b": {**_REAL, "num_attention_heads": 48, "num_layers": 42, "sample_height": 300, "sample_width": 300,
               "sample_frames": 81, "patch_size_t": 2, "patch_bias": False, "use_rotary_positional_embeddings": True},
    # Image-to-video (transformer/config.json of THUDM/CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V): in_channels 32 =
    # 16 noisy + 16 image latents. 5b-I2V adds a *learned* positional table over [text; video] at 60x90 latents
    # (49 frames), so it only runs at 480x720 with 226 text tokens; 1.5-I2V adds the `ofs` embedding instead.
    "5b-I2V": {**_REAL, "in_channels": 32, "num_attention_heads": 48, "num_layers": 42, "sample_height": 60,
               "sample_width": 90, "sample_frames": 49, "use_rotary_positional_embeddings": True,
               "use_learned_positional_embeddings": True},
    "1.5-5b-I2V": {**_REAL, "in_channels": 32, "num_attention_heads": 48, "num_layers": 42, "sample_height": 300,
                   "sample_width": 300, "sample_frames": 81, "patch_size_t": 2, "patch_bias": False,
                   "use_rotary_positional_embeddings": True, "ofs_embed_dim": 512},
    # tiny I2V layouts: 1.0-5b-I2V (RoPE + learned table, so latents must be 6x10 = 48x80 pixels, 9 frames) and
    # 1.5-I2V (ofs); 3 latent frames of 3x5 patches = 45 video tokens, odd, so sp=2 pads
    "debug-I2V": {**_TINY, "in_channels": 8, "use_rotary_positional_embeddings": True,
                  "use_learned_positional_embeddings": True, "sample_height": 6, "sample_width": 10},
    "debug-1.5-I2V": {**_TINY, "in_channels": 8, "use_rotary_positional_embeddings": True, "patch_size_t": 2,
                      "patch_bias": False, "sample_height": 16, "sample_width": 16, "ofs_embed_dim": 4},
}
# Training noise schedule and sampler (scheduler/scheduler_config.json of the checkpoints). v-prediction DDPM
# with zero-terminal-SNR betas; 2b shifts the SNR by 3, 5b and 1.5 do not.
_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
              num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
              set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
SCHEDULERS = {"default": {**_SCHED, "snr_shift_scale": 1.0},
              "2b": {**_SCHED, "snr_shift_scale": 3.0}, "debug": {**_SCHED, "snr_shift_scale": 3.0}}


class CogVideoXSPAttnProcessor:
    """CogVideoXAttnProcessor2_0 with video tokens split over the SP group and text tokens replicated.

    hidden_states is this rank's video chunk [B, S_local, D]; encoder_hidden_states the full text [B, T, D];
    image_rotary_emb the full-sequence (cos, sin) tables [S, head_dim]. With SP off it computes exactly what
    diffusers' processor does (same projections on [text; video], same RoPE, SDPA over the joint sequence).
    """

    def __init__(self, state: SPState):
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if attention_mask is not None:
            # diffusers' CogVideoX pipelines never pass one; a [B, T+S] key mask would need re-slicing per rank
            raise ValueError("CogVideoXSPAttnProcessor takes no attention_mask (CogVideoX attends to all tokens)")
        n_text = encoder_hidden_states.shape[1]
        joint_BND = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # one matmul per projection, as diffusers
        b, n, _ = joint_BND.shape
        heads = attn.heads
        q_BSHD = attn.to_q(joint_BND).view(b, n, heads, -1)
        k_BSHD = attn.to_k(joint_BND).view(b, n, heads, -1)
        v_BSHD = attn.to_v(joint_BND).view(b, n, heads, -1)
        if attn.norm_q is not None:  # LayerNorm over head_dim: per token and head, so layout-independent
            q_BSHD = attn.norm_q(q_BSHD)
        if attn.norm_k is not None:
            k_BSHD = attn.norm_k(k_BSHD)

        tq, q = q_BSHD[:, :n_text], q_BSHD[:, n_text:]
        tk, k = k_BSHD[:, :n_text], k_BSHD[:, n_text:]
        tv, v = v_BSHD[:, :n_text], v_BSHD[:, n_text:]
        if image_rotary_emb is not None:
            # the tables cover the whole video; this rank's rows, padded and chunked like its tokens
            rope = tuple(shard_sequence(t, 0, self.state.sp) for t in image_rotary_emb)
            q = apply_rotary_emb(q, rope, sequence_dim=1)
            if not attn.is_cross_attention:
                k = apply_rotary_emb(k, rope, sequence_dim=1)

        out, text_out = self.state.attention(q, k, v, text=(tq, tk, tv), text_first=True)
        joint_out = torch.cat([text_out, out], dim=1).flatten(2)
        joint_out = attn.to_out[1](attn.to_out[0](joint_out))  # linear, dropout
        return joint_out[:, n_text:], joint_out[:, :n_text]


# ---- inputs -------------------------------------------------------------------------------------------------------
def resize_crop_region_for_grid(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """The centred crop of the base grid that the 1.0 RoPE spans (as diffusers' get_resize_crop_region_for_grid)."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, int(round(tgt_height / h * w))
    else:
        resize_width, resize_height = tgt_width, int(round(tgt_width / w * h))
    top, left = int(round((tgt_height - resize_height) / 2.0)), int(round((tgt_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def rotary_embeddings(config, frames: int, height: int, width: int, device=None):
    """(cos, sin) [F' * H' * W', head_dim] for a latent video of frames x height x width, computed like
    CogVideoXPipeline._prepare_rotary_positional_embeddings (whose pixel sizes are latent sizes x the VAE's 8)."""
    p, p_t = config.patch_size, config.patch_size_t
    grid = (height // p, width // p)
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if p_t is None:  # 1.0: linspace grid over the crop of the base grid
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim,
                                       crops_coords=resize_crop_region_for_grid(grid, base_w, base_h),
                                       grid_size=grid, temporal_size=frames, device=device)
    # 1.5: integer positions sliced from a max-size grid
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


def video_tokens(config, latent_shape_BCFHW: tuple) -> int:
    _, _, frames, height, width = latent_shape_BCFHW
    return frames // (config.patch_size_t or 1) * (height // config.patch_size) * (width // config.patch_size)


def is_image_to_video(config) -> bool:
    """CogVideoX I2V transformers take [noisy; image] latents: in_channels = 2 x out_channels."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return get("out_channels", None) is not None and int(get("in_channels")) == 2 * int(get("out_channels"))


@torch.no_grad()
def encode_image(vae, image_B3HW: torch.Tensor, num_frames: int, generator: torch.Generator | None = None):
    """The first-frame latent [B, C, 1, h, w] as CogVideoXImageToVideoPipeline.prepare_latents makes it: the VAE
    posterior of the single frame (sampled with the pipeline's generator, or its mean for shards), times the VAE's
    scaling_factor, or divided by it where the VAE config says invert_scale_latents (1.5). predict() pads it with
    zeros over the remaining latent frames, as the pipeline does."""
    p = next(vae.parameters())
    dist = vae.encode(image_B3HW[:, :, None].to(device=p.device, dtype=p.dtype)).latent_dist
    z = (dist.mean if generator is None else dist.sample(generator)).float()
    scale = vae.config.scaling_factor
    z = (1 / scale) * z if getattr(vae.config, "invert_scale_latents", False) else scale * z  # the pipeline's rounding
    return {"image_latents": z}


def image_condition(image_latents_BCFHW: torch.Tensor, frames: int) -> torch.Tensor:
    """The image channels the I2V transformer concatenates: the first-frame latent, then zeros up to `frames`.
    (CogVideoXImageToVideoPipeline: 1.0 pads the 13 latent frames with 12 zero frames; 1.5 pads to the already
    patch_size_t-padded count, so the image sits in frame 0 there too.)"""
    b, c, f, h, w = image_latents_BCFHW.shape
    if f > frames:
        raise ValueError(f"image conditioning has {f} latent frames, the video only {frames}")
    return torch.cat([image_latents_BCFHW, image_latents_BCFHW.new_zeros(b, c, frames - f, h, w)], dim=2)


def predict(model: nn.Module, noisy_latents_BCFHW: torch.Tensor, timesteps_B: torch.Tensor,
            prompt_embeds_BTD: torch.Tensor, prompt_mask_BT: torch.Tensor | None = None,
            cond: dict | None = None) -> torch.Tensor:
    """The v-prediction [B, C, F, H, W] for DDPM timesteps (integers in [0, 1000)). Latents and text are cast to
    the compute dtype, the timesteps are not. CogVideoX attends to every text token (its pipelines pad prompts
    to 226 tokens and pass no mask), so prompt_mask_BT is not used. I2V models (in_channels 2C) take
    cond["image_latents"] [B, C, 1, H, W], concatenated on channels after zero padding over the frames."""
    cfg = model.config
    if is_image_to_video(cfg):
        if not cond or cond.get("image_latents") is None:
            raise ValueError("this CogVideoX transformer is image-to-video (in_channels = 2 x out_channels) and needs "
                             "the first frame's image_latents: preprocess with its pipeline (transformer=<dir>) so "
                             "the shards carry them, or sample with image=<path>")
        image = cond["image_latents"].to(noisy_latents_BCFHW)
        if image.shape[0] != noisy_latents_BCFHW.shape[0]:
            image = image.expand(noisy_latents_BCFHW.shape[0], *image.shape[1:])
        noisy_latents_BCFHW = torch.cat([noisy_latents_BCFHW, image_condition(image, noisy_latents_BCFHW.shape[2])],
                                        dim=1)
    _, _, frames, height, width = noisy_latents_BCFHW.shape
    if cfg.patch_size_t is not None and frames % cfg.patch_size_t:
        raise ValueError(f"CogVideoX 1.5 needs latent frames divisible by patch_size_t={cfg.patch_size_t}, got "
                         f"{frames}: preprocess with the transformer's config (a pipeline folder, or transformer=<dir>), which "
                         f"repeats the first latent frame in front as CogVideoX's own finetuning does")
    if height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(f"latent height/width {height}x{width} must be multiples of patch_size={cfg.patch_size}")
    rotary = None
    if cfg.use_rotary_positional_embeddings:
        rotary = rotary_embeddings(cfg, frames, height, width, device=noisy_latents_BCFHW.device)
    ofs = noisy_latents_BCFHW.new_full((1,), 2.0) if cfg.ofs_embed_dim else None  # 1.5 I2V, as its pipeline
    dtype = compute_dtype(model)  # latents and text in the compute dtype; timesteps stay as given
    out_BFCHW = model(
        hidden_states=noisy_latents_BCFHW.permute(0, 2, 1, 3, 4).to(dtype),  # the transformer wants [B,F,C,H,W]
        encoder_hidden_states=prompt_embeds_BTD.to(dtype),
        timestep=timesteps_B,
        ofs=ofs,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    return out_BFCHW.permute(0, 2, 1, 3, 4)


# ---- parallelism --------------------------------------------------------------------------------------------------
def _install_processor(block: nn.Module, state: SPState) -> None:
    block.attn1.set_processor(CogVideoXSPAttnProcessor(state))


# SP processors on every block (with SP off they run plain joint attention through fastpost's attention backends);
# with SP on, video tokens split entering block 0 and gathered entering norm_final
apply_sequence_parallel = sequence_parallel_on_blocks(_install_processor, gather_attr="norm_final")


# ---- the rest of the pipeline ---------------------------------------------------------------------------------------
def vae_factors(vae_config) -> tuple[int, int]:
    """As CogVideoXPipeline: spatial 2 ** (levels - 1), temporal the config's temporal_compression_ratio."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1), int(vae_config["temporal_compression_ratio"])


VAE = VaeSpec("AutoencoderKLCogVideoX", vae_factors, debug_config=dict(  # 65k params (cpu_facts 6)
    block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
    sample_height=64, sample_width=64))
# CogVideoXPipeline: T5-XXL run *without* the attention mask (padding tokens attend to everything), prompts padded
# to max_text_seq_length (226), and the transformer attends to every token
TEXT = TextSpec("T5EncoderModel", max_length_key="max_text_seq_length", pass_mask=False, mask_used=False)
# CogVideoXPipeline: randn [B, F, C, H, W]; 8 fps; 50 steps, guidance 6; size = the transformer's sample size
PIPELINE = PipelineFacts("ddim", "BFCHW", fps=8, steps=50, guidance_scale=6.0, size=None)
LORA_TARGETS = r".*transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$"
# ComfyUI's native CogVideoX (comfy/ldm/cogvideo/model.py) names a block's projections q, k, v, attn_out,
# ff_proj, ff_out in `blocks.N`
COMFY_NAMES = ((r"^transformer_blocks\.", "blocks."), (r"\.attn1\.to_out\.0$", ".attn_out"),
               (r"\.attn1\.to_([qkv])$", r".\1"), (r"\.ff\.net\.0\.proj$", ".ff_proj"), (r"\.ff\.net\.2$", ".ff_out"))


FAMILY = ModelFamily(
    name="cogvideox",
    diffusers_class=CogVideoXTransformer3DModel,
    block_class=CogVideoXBlock,
    pipeline_class="CogVideoXPipeline",
    flavors=FLAVORS,
    prediction_type="v_prediction",
    scheduler_class="CogVideoXDDIMScheduler",
    scheduler_configs=SCHEDULERS,
    sequence_parallel_fn=apply_sequence_parallel,
    video_tokens_fn=video_tokens,
    predict_fn=predict,
    vae=VAE,
    text=TEXT,
    pipeline=PIPELINE,
    scheduler_samplers={"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"},
    lora_targets=LORA_TARGETS,
    comfy_names=COMFY_NAMES,
    # I2V (5b-I2V, 1.5-5b-I2V): the first frame's latent. Training noise as diffusers'
    # examples/cogvideo/train_cogvideox_image_to_video_lora.py (and CogVideo's own finetune): the frame's pixels get
    # Gaussian noise of sigma = exp(N(-3, 0.5)) before the VAE, once per clip when latents are computed
    image=ImageConditioning(fields=("image_latents",), applies=is_image_to_video, encode=encode_image,
                            train_noise_log_sigma=(-3.0, 0.5)),
    # CogVideoX 1.0 was trained at 8 fps, 1.5 (the configs with patch_size_t) at 16
    training_fps_fn=lambda config: 16 if config is not None and dict(config).get("patch_size_t") else 8,
    notes=dict(text_encoder="t5-v1_1-xxl", latent_layout="BCFHW (transformer: BFCHW)"),
)
