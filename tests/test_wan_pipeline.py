"""Wan outside the transformer: UMT5 prompts and VAE latents exactly as WanPipeline makes them, preprocessing with
the Wan VAE, `fastpost sample` (UniPC and flow Euler) equal to WanPipeline at world 1, SP and CFG-parallel layouts
equal to world 1, and a LoRA export that WanPipeline.load_lora_weights applies.

Geometry: 48x80 pixels, 9 frames -> latents 3 x 6 x 10 -> 45 video tokens (odd); 3 heads: padding paths run.
"""

import json
from pathlib import Path

import pytest
import torch

from fastpost.models import get_family
from fastpost.sampling import SampleConfig, SampleModelConfig, VideoSampler, main
from tests._harness import run_distributed
from tests._parity import make_model

FAMILY = get_family("wan")
TOL = 1e-5
# an html entity and runs of spaces: WanPipeline's prompt_clean (ftfy, html unescape, whitespace) changes the tokens
PROMPT, NEGATIVE = "a red  ball &amp; a  blue   cube", "green tree"


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A tiny Wan pipeline folder (UMT5 + tokenizer, Wan VAE, UniPC flow_shift 3), transformer weights perturbed."""
    from fastpost.tiny import build_tiny_pipeline

    out = build_tiny_pipeline(tmp_path_factory.mktemp("wan") / "pipe", "wan", "debug")
    make_model(FAMILY, "debug", seed=0).save_pretrained(out / "transformer")
    return out


def _pipeline(pipe_dir, scheduler=None):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(pipe_dir)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cfg(pipe_dir, **kw) -> SampleConfig:
    # cfg_batched=false: cond and uncond as two batch-1 calls, as WanPipeline makes them
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=48, width=80, num_frames=9, steps=4,
                guidance_scale=5.0, seed=3, progress_bar=False, cfg_batched=False)
    return SampleConfig(**{**base, **kw}, model=SampleModelConfig(family="wan", pretrained=str(pipe_dir)))


def _pipe_latents(pipe, steps=4, **kw) -> torch.Tensor:
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=48, width=80, num_frames=9, num_inference_steps=steps,
                guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(3), **kw).frames


def test_text_and_latents_as_wan_pipeline(pipe_dir, tmp_path):
    from fastpost.components import denormalize_latents, load_vae
    from fastpost.data.text import TextEncoder

    pipe = _pipeline(pipe_dir)
    te = TextEncoder.from_pretrained(pipe_dir, family=FAMILY)
    embeds, mask = te.encode([PROMPT, NEGATIVE], FAMILY.text.max_length(pipe.transformer.config))
    want = pipe.encode_prompt([PROMPT, NEGATIVE], do_classifier_free_guidance=False, max_sequence_length=512)[0]
    # ~5e-7 apart (measured): the pipeline runs UMT5 with autograd on, fastpost under no_grad
    assert embeds.shape == want.shape == (2, 512, 16)
    torch.testing.assert_close(embeds, want, rtol=0, atol=1e-6)
    assert int(mask[0].sum()) < 512 and embeds[0, int(mask[0].sum()):].abs().max() == 0  # trimmed and zero-padded
    te.prompt_clean = None  # the cleaning matters for this prompt
    assert (te.encode([PROMPT], 512)[0] - want[:1]).abs().max() > 1e-2

    # the pipeline decodes z / (1 / latents_std) + latents_mean: the inverse of what preprocessing stores
    vae = load_vae(pipe_dir, spec=FAMILY.vae)
    assert FAMILY.vae_factors(vae.config) == (8, 4) and FAMILY.vae.frame_multiple(vae.config) == 4
    z = torch.randn(2, 4, 3, 6, 10)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(denormalize_latents(vae, z), z / inv_std + mean, rtol=0, atol=1e-6)

    # preprocessing with the Wan VAE and UMT5: 11 frames -> 9 (4k+1) -> 3 latent frames, normalised as above
    from fastpost.config import from_dict
    from fastpost.data import preprocess as pp
    from fastpost.data.shards import ShardDataset
    from fastpost.data.synthetic import SyntheticConfig, generate

    generate(SyntheticConfig(out_dir=str(tmp_path / "synth"), num_videos=1, num_images=0, frames=[11],
                             sizes=[(48, 80)], seed=2))
    cfg = from_dict(pp.PreprocessConfig, dict(data=str(tmp_path / "synth"), output_dir=str(tmp_path / "out"),
                                              vae=str(pipe_dir), text_encoder=str(pipe_dir), max_frames=11,
                                              resolutions=[[48, 80]]))
    assert pp.preprocess(cfg, FAMILY)["samples_written"] == 1
    ds = ShardDataset(tmp_path / "out")
    assert ds.header["vae"]["family"] == "wan" and ds.header["text_encoder"]["max_length"] == 512
    pixels, _ = pp.load_pixels(tmp_path / "synth" / ds[0]["source"], cfg, 4)
    assert pixels.shape[1] == 9
    with torch.no_grad():
        raw = vae.encode(pixels[None]).latent_dist.mean
    assert torch.equal(ds[0]["latents"], pp.normalize_latents(vae, raw)[0]) and ds[0]["latents"].shape == (4, 3, 6, 10)
    # the stored prompt embeddings are the pipeline's for that caption
    cap = pipe.encode_prompt([ds[0]["caption"]], do_classifier_free_guidance=False, max_sequence_length=512)[0]
    torch.testing.assert_close(ds[0]["prompt_embeds"], cap[0], rtol=0, atol=1e-6)


def test_world1_matches_wan_pipeline(pipe_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    errs = {"unipc": (VideoSampler(_cfg(pipe_dir)).generate(0) - _pipe_latents(_pipeline(pipe_dir))).abs().max()}
    # flow Euler: WanPipeline with FlowMatchEulerDiscreteScheduler(shift=3) == sampler flow_euler on linear sigmas
    mine = VideoSampler(_cfg(pipe_dir, sampler="flow_euler", sampler_args={"sigma_schedule": "linear"},
                             scheduler_overrides={"shift": 3.0})).generate(0)
    errs["flow_euler"] = (mine - _pipe_latents(_pipeline(pipe_dir, FlowMatchEulerDiscreteScheduler(shift=3.0)))
                          ).abs().max()
    # fp32 rounding relative to |latents| (~6 here): fastpost's attention call and diffusers' SDPA call differ by
    # ~1e-6 relative per forward (measured 4e-6 on outputs of 4), which 4 guided steps carry to ~2e-5 (measured
    # 2.3e-5 UniPC, 3.2e-5 Euler); with the same processor the world-1 forward is bitwise the same
    scale = max(1.0, mine.abs().max().item())
    assert max(errs.values()) <= TOL * scale, errs
    assert mine.abs().max() > 0.5  # it moved from the noise


def _argv(pipe_dir, out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/wan/sample_debug.yaml", "--prompt", PROMPT, "--output-dir", str(out),
            f"model.pretrained={pipe_dir}", f"negative_prompt={NEGATIVE}", "steps=3", "seed=11", "save_latents=true",
            *extra]


def _jobs(rank, world, jobs):
    for name, argv in jobs:
        assert main(argv) == 0, f"rank {rank}: job {name} failed"


def test_sp_and_cfg_parallel_match_world1(pipe_dir, tmp_path):
    assert main(_argv(pipe_dir, tmp_path / "w1")) == 0
    assert main(_argv(pipe_dir, tmp_path / "w1s", "cfg_batched=false")) == 0  # what CFG parallel computes per half
    jobs = [("sp2", _argv(pipe_dir, tmp_path / "sp2", "parallel.ulysses=2")),
            ("cfg2", _argv(pipe_dir, tmp_path / "cfg2", "parallel.cfg=2"))]
    run_distributed(_jobs, 2, jobs)
    load = lambda name: torch.load(next((tmp_path / name).glob("*.latents.pt")))  # noqa: E731
    ref, ref_split = load("w1"), load("w1s")
    scale = max(1.0, ref.abs().max().item())
    assert (load("sp2") - ref).abs().max() <= TOL * scale and (load("cfg2") - ref_split).abs().max() <= TOL * scale
    assert (ref - ref_split).abs().max() <= TOL * scale
    meta = json.loads(next((tmp_path / "sp2").glob("*.json")).read_text())
    assert meta["sampler"] == "unipc" and meta["scheduler_config"]["flow_shift"] == 3.0 and meta["num_frames"] == 9


def test_two_experts_switch_at_the_boundary_like_wan_pipeline(pipe_dir, tmp_path):
    """Wan 2.2 A14B layout: transformer (high noise) denoises t >= boundary_ratio * 1000, transformer_2 (low noise)
    the rest, each with its own guidance scale; world 1 equals WanPipeline with the same two experts."""
    from diffusers import WanPipeline

    single = _pipeline(pipe_dir)
    two = tmp_path / "a14b"
    WanPipeline(tokenizer=single.tokenizer, text_encoder=single.text_encoder, vae=single.vae,
                scheduler=single.scheduler, transformer=single.transformer,
                transformer_2=make_model(FAMILY, "debug", seed=1), boundary_ratio=0.875).save_pretrained(two)
    pipe = _pipeline(two)
    timesteps = pipe.scheduler.set_timesteps(4) or pipe.scheduler.timesteps
    assert (timesteps >= 875).any() and (timesteps < 875).any()  # both experts run
    mine = VideoSampler(_cfg(two, guidance_scale_2=3.0)).generate(0)
    want = _pipe_latents(pipe, guidance_scale_2=3.0)
    assert (mine - want).abs().max() <= TOL * max(1.0, mine.abs().max().item())
    assert (mine - VideoSampler(_cfg(pipe_dir)).generate(0)).abs().max() > 1e-2  # the second expert mattered
