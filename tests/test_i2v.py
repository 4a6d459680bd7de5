"""Image-to-video (CogVideoX-5b-I2V and 1.5-I2V layouts, tiny): `fastpost sample image=` equals
CogVideoXImageToVideoPipeline on the same weights, image and seed; SP and CFG-parallel equal world 1; I2V shards
carry the first frame's latents (and models refuse shards without them); LoRA finetune lowers the loss and its
export loads in the I2V pipeline; full finetune and PCM distillation run on I2V shards."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpost.config import from_dict
from fastpost.models import get_family
from fastpost.sampling import SampleConfig, SampleModelConfig, VideoSampler, main
from fastpost.sampling.writer import SampleError
from tests._harness import run_distributed, write_random_shards
from tests._parity import make_model

FAM = get_family("cogvideox")
TOL = 1e-5
PROMPT, NEGATIVE, TEXT_LEN = "a red ball", "blue square", 8


def _pipeline(root: Path, flavor: str) -> Path:
    """A saved CogVideoXImageToVideoPipeline: tiny T5 + VAE (1.5: invert_scale_latents, as its VAE config) and a
    perturbed transformer of the flavor."""
    import diffusers
    from transformers import AutoTokenizer, T5EncoderModel

    from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae

    text = build_tiny_text_encoder(root / f"_text_{flavor}", d_model=16)
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(build_tiny_vae(
        root / f"_vae_{flavor}", FAM, invert_scale_latents="1.5" in flavor))
    pipe = diffusers.CogVideoXImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(text), text_encoder=T5EncoderModel.from_pretrained(text), vae=vae,
        transformer=make_model(FAM, flavor, seed=0), scheduler=FAM.make_scheduler(flavor))
    out = root / f"pipe_{flavor}"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import imageio.v2 as imageio

    root = tmp_path_factory.mktemp("i2v")
    rng = np.random.default_rng(0)
    imageio.imwrite(root / "first.png", rng.integers(0, 255, (60, 100, 3), dtype=np.uint8))  # resized to 48x80
    return {"root": root, "image": root / "first.png", "1.0": _pipeline(root, "debug-I2V"),
            "1.5": _pipeline(root, "debug-1.5-I2V")}


def _pipe_latents(pipe_dir: Path, image: Path, **kw) -> torch.Tensor:
    from diffusers import CogVideoXImageToVideoPipeline
    from diffusers.utils import load_image

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    args = dict(image=load_image(str(image)), prompt=PROMPT, negative_prompt=NEGATIVE, height=48, width=80,
                num_frames=9, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(3))
    return pipe(**{**args, **kw}).frames.permute(0, 2, 1, 3, 4)  # BFCHW -> BCFHW


def _mine(pipe_dir: Path, image: Path, **kw) -> torch.Tensor:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image and str(image), height=48, width=80,
                num_frames=9, steps=3, guidance_scale=5.0, seed=3, progress_bar=False)
    cfg = SampleConfig(**{**base, **kw},
                       model=SampleModelConfig(family="cogvideox", pretrained=str(pipe_dir)))
    return VideoSampler(cfg).generate(0)


def test_world1_sampling_equals_cogvideox_image_to_video_pipeline(env):
    ours = {}
    for layout in ("1.0", "1.5"):  # 1.0-5b-I2V (RoPE + learned positions), 1.5-I2V (ofs, patch_size_t 2)
        ours[layout], ref = _mine(env[layout], env["image"]), _pipe_latents(env[layout], env["image"])
        assert ours[layout].shape == ref.shape, (layout, ours[layout].shape, ref.shape)
        # fp32 tolerance relative to the latent magnitude (|latents| ~ 6), as in test_sampling; measured: 0 for both
        # (the image latent scaled as the pipeline rounds it: (1 / scale) * z, not z / scale, which was 1.2e-5 off)
        err, scale = (ours[layout] - ref).abs().max().item(), max(1.0, ref.abs().max().item())
        assert err <= TOL * scale, f"{layout}: max latent error {err:.2e} (|latents| {scale:.1f}) vs the pipeline"
    # the image matters: another image gives other latents (the comparison above is not vacuous)
    import imageio.v2 as imageio

    imageio.imwrite(env["root"] / "other.png", np.zeros((48, 80, 3), dtype=np.uint8))
    assert (_mine(env["1.0"], env["root"] / "other.png") - ours["1.0"]).abs().max() > 1e-3
    # a text-to-video model refuses image=, an I2V model refuses a prompt without one
    with pytest.raises(SampleError, match="image-to-video: pass image="):
        _mine(env["1.0"], None)
    t2v = SampleModelConfig(family="cogvideox", flavor="debug", vae=str(env["1.0"]), text_encoder=str(env["1.0"]))
    with pytest.raises(SampleError, match="text-to-video"):
        VideoSampler(SampleConfig(prompt=PROMPT, image=str(env["image"]), height=48, width=80, num_frames=9,
                                  model=t2v))


def _jobs(rank, world, jobs):
    for name, argv in jobs:
        assert main(argv) == 0, f"rank {rank}: job {name} failed"


def _argv(env, out: Path, *extra: str) -> list[str]:
    return ["--prompt-file", str(env["root"] / "prompts.jsonl"), "--output-dir", str(out), "model.family=cogvideox",
            f"model.pretrained={env['1.0']}", "height=48", "width=80", "num_frames=9", "steps=3",
            "guidance_scale=5.0", "seed=11", "save_latents=true", "progress_bar=false", *extra]


def test_sp_and_cfg_parallel_equal_world1(env, wan_pipe, tmp_path):
    # one jsonl line with its own "image" (relative to the prompt file); 45 video tokens and 3 heads at sp 2
    (env["root"] / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPT, "image": "first.png"}) + "\n")
    assert main(_argv(env, tmp_path / "w1")) == 0
    assert main(_argv(env, tmp_path / "w1s", "cfg_batched=false")) == 0
    # Wan 2.1 I2V (CLIP tokens stay replicated: the image branch is cross-attention)
    wan = ["model.family=wan", f"model.pretrained={env['root'] / 'wan_i2v'}", "cfg_batched=false"]
    assert main(_argv(env, tmp_path / "wan_w1", *wan)) == 0
    run_distributed(_jobs, 2, [("sp2", _argv(env, tmp_path / "sp2", "parallel.ulysses=2")),
                               ("cfg2", _argv(env, tmp_path / "cfg2", "parallel.cfg=2")),
                               ("wan sp2", _argv(env, tmp_path / "wan_sp2", *wan, "parallel.ulysses=2")),
                               ("wan cfg2", _argv(env, tmp_path / "wan_cfg2", *wan, "parallel.cfg=2"))])
    load = lambda name: torch.load(next((tmp_path / name).glob("*.latents.pt")))  # noqa: E731
    assert (load("sp2") - load("w1")).abs().max() <= TOL
    assert (load("cfg2") - load("w1s")).abs().max() <= TOL
    scale = max(1.0, load("wan_w1").abs().max().item())
    assert (load("wan_sp2") - load("wan_w1")).abs().max() <= TOL * scale
    assert (load("wan_cfg2") - load("wan_w1")).abs().max() <= TOL * scale
    meta = json.loads(next((tmp_path / "sp2").glob("*.json")).read_text())
    assert meta["image"] == str(env["root"] / "first.png") and meta["parallel"]["ulysses"] == 2


# ---- training ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(env):
    """I2V shards of 2 synthetic clips, written by `fastpost preprocess` with the 1.0-I2V pipeline."""
    from fastpost.data import preprocess as pp
    from fastpost.data.synthetic import SyntheticConfig, generate

    root = env["root"]
    generate(SyntheticConfig(out_dir=str(root / "synth"), num_videos=2, frames=[9], sizes=[(48, 80)], seed=2))
    cfg = dict(data=str(root / "synth" / "metadata.jsonl"), output_dir=str(root / "shards"), vae=str(env["1.0"]),
               text_encoder=str(env["1.0"]), resolutions=[(48, 80)], samples_per_shard=1, max_frames=9)
    pp.preprocess(from_dict(pp.PreprocessConfig, cfg), FAM)
    return root / "shards"


def test_i2v_shards_carry_the_first_frame_and_t2v_shards_are_refused(env, shards, tmp_path):
    from fastpost.builder import read_config
    from fastpost.data.checks import DataModelMismatch, check_shards_for_model
    from fastpost.data.loader import ShardLoader
    from fastpost.data.shards import ShardDataset, ShardError

    ds = ShardDataset(shards)
    assert ds.header["conditioning"]["fields"] == ["image_latents"]
    assert ds.header["conditioning"]["inputs"] == ["text", "image"]
    sample = ds[0]
    assert sample["image_latents"].shape == (4, 1, 6, 10) and sample["latents"].shape == (4, 3, 6, 10)
    # the stored conditioning is the noised first frame's latent: close to, not equal to, the clean video's frame 0
    gap = (sample["image_latents"][:, 0] - sample["latents"][:, 0]).abs().max()
    assert 0 < gap < sample["latents"].abs().max()
    batch = next(iter(ShardLoader(shards, batch_size=2, shuffle=False)))
    assert batch["cond"]["image_latents"].shape == (2, 4, 1, 6, 10)
    config = read_config(env["1.0"])
    check_shards_for_model(ds, FAM, config)  # fits
    write_random_shards(tmp_path / "t2v", 2, (4, 3, 6, 10), TEXT_LEN, 16)
    with pytest.raises(DataModelMismatch, match=r"image-to-video .* needs the first frame's \['image_latents'\]"):
        check_shards_for_model(ShardDataset(tmp_path / "t2v"), FAM, config)
    with pytest.raises(ShardError, match="carry no \\['image_latents'\\]"):
        ShardLoader(tmp_path / "t2v", 1, require=FAM.cond_fields(config))


def _train(env, shards, out: Path, **sections) -> Path:
    from fastpost.trainer import TrainConfig, Trainer

    cfg = {"output_dir": str(out), "steps": 8, "seed": 3,
           "model": {"family": "cogvideox", "pretrained": str(env["1.0"])},
           "optim": {"lr": 1e-2, "warmup_steps": 0}, "data": {"path": str(shards), "batch_size": 2},
           "checkpoint": {"every_steps": 0}, "logging": {"progress_bar": False}, **sections}
    Trainer(from_dict(TrainConfig, cfg)).fit()
    return out


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_lora_finetune_lowers_the_loss_and_loads_in_the_i2v_pipeline(env, shards, tmp_path):
    from diffusers import CogVideoXImageToVideoPipeline

    from fastpost.data.loader import ShardLoader

    run = _train(env, shards, tmp_path / "lora", lora={"enabled": True, "rank": 4, "alpha": 8},
                 recipe_args={"image_dropout": 0.25})
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(env["1.0"])
    base = CogVideoXImageToVideoPipeline.from_pretrained(env["1.0"]).transformer
    pipe.load_lora_weights(run / "lora")
    # the v-prediction loss on fixed samples, noise and timesteps, before and after (with the image conditioning)
    batch = next(iter(ShardLoader(shards, batch_size=2, shuffle=False)))
    g = torch.Generator().manual_seed(7)
    x0, eps, t = batch["latents"], torch.randn(batch["latents"].shape, generator=g), torch.tensor([200, 700])
    abar = FAM.make_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    x_t, v = abar.sqrt() * x0 + (1 - abar).sqrt() * eps, abar.sqrt() * eps - (1 - abar).sqrt() * x0
    with torch.no_grad():
        loss = {name: ((FAM.predict(m, x_t, t, batch["prompt_embeds"], None, cond=batch["cond"]) - v) ** 2
                       ).mean().item() for name, m in (("trained", pipe.transformer), ("base", base))}
    assert loss["trained"] < 0.9 * loss["base"], loss
    assert all(np.isfinite(_losses(run)))


def test_full_finetune_and_pcm_distill_run_on_i2v_shards(env, shards, tmp_path):
    full = _train(env, shards, tmp_path / "full", steps=2)
    assert (full / "transformer" / "config.json").is_file() and all(np.isfinite(_losses(full)))
    pcm = _train(env, shards, tmp_path / "pcm", steps=2, recipe="distill", lora={"enabled": True, "rank": 4},
                 recipe_args={"num_teacher_steps": 8, "phases": 2, "guidance_min": 1.0, "guidance_max": 3.0})
    assert len(_losses(pcm)) == 2 and all(np.isfinite(_losses(pcm)))


# ---- Wan 2.1 I2V ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_pipe(env):
    """A tiny WanImageToVideoPipeline: UMT5 + Wan VAE + UniPC from the tiny Wan pipeline, the perturbed debug-i2v
    transformer (CLIP tokens of width image_dim 16, 12 = 4 noise + 4 mask + 4 image channels), a tiny CLIP."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from fastpost.tiny import build_tiny_pipeline

    wan = get_family("wan")
    t2v = WanPipeline.from_pretrained(build_tiny_pipeline(env["root"] / "wan_t2v", "wan", "debug"))
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, transformer=make_model(wan, "debug-i2v", seed=0),
                                   image_encoder=clip, image_processor=processor)
    out = env["root"] / "wan_i2v"
    pipe.save_pretrained(out)
    return out


def test_wan_i2v_world1_sampling_equals_wan_image_to_video_pipeline(env, wan_pipe):
    from diffusers import WanImageToVideoPipeline
    from diffusers.utils import load_image

    pipe = WanImageToVideoPipeline.from_pretrained(wan_pipe)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=load_image(str(env["image"])), prompt=PROMPT, negative_prompt=NEGATIVE, height=48, width=80,
               num_frames=9, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
               generator=torch.Generator().manual_seed(3)).frames
    # cfg_batched=false: cond and uncond as two batch-1 calls, as WanImageToVideoPipeline makes them
    ours = VideoSampler(SampleConfig(
        prompt=PROMPT, negative_prompt=NEGATIVE, image=str(env["image"]), height=48, width=80, num_frames=9,
        steps=3, guidance_scale=5.0, seed=3, progress_bar=False, cfg_batched=False,
        model=SampleModelConfig(family="wan", pretrained=str(wan_pipe)))).generate(0)
    assert ours.shape == ref.shape == (1, 4, 3, 6, 10)
    err, scale = (ours - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= TOL * scale, f"Wan I2V: max latent error {err:.2e} (|latents| {scale:.1f}) vs the pipeline"


@pytest.fixture(scope="module")
def wan_shards(env, shards, wan_pipe):  # shards: the synthetic clips are written there
    from fastpost.data import preprocess as pp

    cfg = dict(data=str(env["root"] / "synth" / "metadata.jsonl"), output_dir=str(env["root"] / "wan_shards"),
               vae=str(wan_pipe), text_encoder=str(wan_pipe), resolutions=[(48, 80)], max_frames=9)
    pp.preprocess(from_dict(pp.PreprocessConfig, cfg), get_family("wan"))
    return env["root"] / "wan_shards"


def test_wan_i2v_shards_and_lora_finetune_loading_in_the_pipeline(env, wan_pipe, wan_shards, tmp_path):
    from diffusers import WanImageToVideoPipeline

    from fastpost.builder import read_config
    from fastpost.data.checks import check_shards_for_model
    from fastpost.data.loader import ShardLoader
    from fastpost.data.shards import ShardDataset

    wan = get_family("wan")
    ds = ShardDataset(wan_shards)
    assert ds.header["conditioning"]["fields"] == ["image_latents", "image_embeds"]
    assert ds[0]["image_latents"].shape == ds[0]["latents"].shape == (4, 3, 6, 10)
    assert ds[0]["image_embeds"].shape == (17, 16)  # CLIP's 1 + (32 / 8)^2 tokens of width image_dim
    check_shards_for_model(ds, wan, read_config(wan_pipe))

    run = _train({"1.0": wan_pipe}, wan_shards, tmp_path / "wan_lora", steps=6, model={"family": "wan",
                 "pretrained": str(wan_pipe)}, lora={"enabled": True, "rank": 4, "alpha": 8})
    pipe = WanImageToVideoPipeline.from_pretrained(wan_pipe)
    base = WanImageToVideoPipeline.from_pretrained(wan_pipe).transformer
    pipe.load_lora_weights(run / "lora")
    batch = next(iter(ShardLoader(wan_shards, batch_size=2, shuffle=False)))
    g = torch.Generator().manual_seed(7)
    x0, eps, s = batch["latents"], torch.randn(batch["latents"].shape, generator=g), torch.tensor([0.3, 0.8])
    x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    with torch.no_grad():  # the flow-matching loss on fixed samples, noise and times, with the image conditioning
        loss = {name: ((wan.predict(m, x_s, 1000 * s, batch["prompt_embeds"], None, cond=batch["cond"])
                        - (eps - x0)) ** 2).mean().item() for name, m in (("trained", pipe.transformer),
                                                                         ("base", base))}
    assert loss["trained"] < 0.9 * loss["base"], loss


def test_wan_i2v_full_finetune_and_pcm_distill_run(env, wan_pipe, wan_shards, tmp_path):
    wan = {"model": {"family": "wan", "pretrained": str(wan_pipe)}, "steps": 2}
    full = _train(env, wan_shards, tmp_path / "full", **wan)
    assert (full / "transformer" / "config.json").is_file() and all(np.isfinite(_losses(full)))
    pcm = _train(env, wan_shards, tmp_path / "pcm", recipe="distill", lora={"enabled": True, "rank": 4},
                 recipe_args={"num_teacher_steps": 8, "phases": 2, "guidance_min": 1.0, "guidance_max": 3.0}, **wan)
    assert len(_losses(pcm)) == 2 and all(np.isfinite(_losses(pcm)))


def test_a_per_request_view_samples_with_the_requests_image(env):
    """`fastpost serve` runs each request through VideoSampler.with_settings: the request's image is the one used
    (equal to a sampler built with that image), and an I2V request without one fails before any collective."""
    import dataclasses

    import imageio.v2 as imageio

    other = env["root"] / "request.png"
    imageio.imwrite(other, np.full((48, 80, 3), 200, dtype=np.uint8))
    base_cfg = SampleConfig(prompt=PROMPT, negative_prompt=NEGATIVE, image=str(env["image"]), height=48, width=80,
                            num_frames=9, steps=3, guidance_scale=5.0, seed=3, progress_bar=False,
                            model=SampleModelConfig(family="cogvideox", pretrained=str(env["1.0"])))
    base = VideoSampler(base_cfg)
    view = base.with_settings(dataclasses.replace(base_cfg, image=str(other)), base.cond, base.uncond)
    assert torch.equal(view.generate(0), _mine(env["1.0"], other))
    with pytest.raises(SampleError, match="image-to-video: pass image="):
        base.with_settings(dataclasses.replace(base_cfg, image=None), base.cond, base.uncond)
