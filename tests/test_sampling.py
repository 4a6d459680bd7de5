"""Sampling: world 1 equals the diffusers pipelines; SP / CFG-parallel / replicated layouts equal world 1 (fp32,
CPU gloo); training-checkpoint and LoRA loading; mp4 + metadata outputs; clear errors for bad jobs.

Geometry: 48x80 pixels -> 6x10 latents -> 15 tokens per latent frame; CogVideoX 3 frames = 45 tokens, Mochi 2 = 30,
divisible by neither sp=2 nor sp=4 (and 3 heads divide neither), so padding paths always run.
"""

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from fastpost.config import load_config
from fastpost.models import get_family
from tests._parity import make_model
from fastpost.sampling import SampleConfig, SampleModelConfig, SampleParallelConfig, VideoSampler, check_parallel, main
from fastpost.noise import linear_quadratic_sigmas as linear_quadratic_schedule
from fastpost.sampling import SampleError, read_prompts
from tests._harness import run_distributed

TOL = 1e-5
FRAMES = {"cogvideox": 9, "mochi": 7, "cogvideox15": 9}
TEXT_LEN = {"cogvideox": 8, "mochi": 16, "cogvideox15": 8}
PROMPTS = [{"prompt": "a red ball", "negative_prompt": "blue square"}, {"prompt": "green tree", "seed": 5}]
ERRORS: dict[str, float] = {}  # measured errors, printed at the end (pytest -s) for docs/sampling.md


def _pipeline(family: str, root: Path, flavor: str = "debug") -> Path:
    """A diffusers pipeline folder: tiny T5 + VAE, and a transformer with every weight perturbed (diffusers
    zero-initialises gates and RoPE frequencies, which would hide errors)."""
    import diffusers
    from transformers import AutoTokenizer, T5EncoderModel

    from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae

    fam = get_family(family)
    text = build_tiny_text_encoder(root / "_text", d_model=16)
    vae_cls = getattr(diffusers, fam.vae.class_name)
    vae = vae_cls.from_pretrained(build_tiny_vae(root / "_vae", fam))
    if family == "cogvideox":
        pipe_cls, scheduler = diffusers.CogVideoXPipeline, fam.make_scheduler(flavor)
    else:  # the real mochi-1-preview scheduler config: the inverted convention MochiPipeline expects
        pipe_cls, scheduler = diffusers.MochiPipeline, diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    transformer = make_model(fam, flavor, seed=0)
    if family == "mochi":  # the tiny Mochi VAE keeps Mochi's 12 latent channels, like the debug flavor
        transformer = fam.diffusers_class.from_config({**transformer.config, "in_channels": 12})
        transformer.load_state_dict(_perturbed(transformer).state_dict())
    pipe = pipe_cls(tokenizer=AutoTokenizer.from_pretrained(text), text_encoder=T5EncoderModel.from_pretrained(text),
                    vae=vae, transformer=transformer, scheduler=scheduler)
    out = root / f"pipe_{family}_{flavor}"
    pipe.save_pretrained(out)
    return out


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    paths = {"cogvideox": _pipeline("cogvideox", root / "c"), "mochi": _pipeline("mochi", root / "m"),
             "cogvideox15": _pipeline("cogvideox", root / "c15", "debug-1.5"), "root": root}
    paths["prompts"] = root / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return paths


def _cfg(comp, family: str, **kw) -> SampleConfig:
    model = dict(family=family.replace("15", ""), flavor="debug-1.5" if family == "cogvideox15" else "debug",
                 pretrained=str(comp[family]))
    model = SampleModelConfig(**{**model, **kw.pop("model", {})})
    base = dict(prompt=PROMPTS[0]["prompt"], negative_prompt=PROMPTS[0]["negative_prompt"], height=48, width=80,
                num_frames=FRAMES[family], steps=3, guidance_scale=5.0, seed=3, progress_bar=False)
    return SampleConfig(**{**base, **kw}, model=model)


def _record(name: str, err: float, tol: float = TOL) -> None:
    ERRORS[name] = err
    assert err <= tol, f"{name}: max latent error {err:.2e} > {tol:.0e}"


# ---- world 1 against the diffusers pipelines ----------------------------------------------------------------------
def test_linear_quadratic_schedule_matches_mochi_pipeline():
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule as reference

    for n in (2, 3, 7, 64):
        assert linear_quadratic_schedule(n, 0.025) == reference(n, 0.025)
    with pytest.raises(ValueError, match="steps >= 2"):
        linear_quadratic_schedule(1, 0.025)


def _pipe_latents(comp, family: str, scheduler=None, **kw) -> torch.Tensor:
    import diffusers

    pipe_cls = diffusers.MochiPipeline if family == "mochi" else diffusers.CogVideoXPipeline
    pipe = pipe_cls.from_pretrained(comp[family])
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=PROMPTS[0]["prompt"], negative_prompt=PROMPTS[0]["negative_prompt"], height=48, width=80,
                num_frames=FRAMES[family], num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                max_sequence_length=TEXT_LEN[family], generator=torch.Generator().manual_seed(3))
    out = pipe(**{**args, **kw}).frames
    return out if family == "mochi" else out.permute(0, 2, 1, 3, 4)  # CogVideoX pipelines return BFCHW


def _mine(comp, family: str, **kw) -> torch.Tensor:
    return VideoSampler(_cfg(comp, family, **kw)).generate(0)


def test_world1_matches_diffusers_pipelines(comp):
    import diffusers

    _record("cogvideox ddim vs CogVideoXPipeline",
            (_mine(comp, "cogvideox") - _pipe_latents(comp, "cogvideox")).abs().max().item())
    _record("cogvideox ddim dynamic-cfg vs CogVideoXPipeline",
            (_mine(comp, "cogvideox", dynamic_cfg=True)
             - _pipe_latents(comp, "cogvideox", use_dynamic_cfg=True)).abs().max().item())
    _record("cogvideox ddim no-cfg vs CogVideoXPipeline",
            (_mine(comp, "cogvideox", guidance_scale=1.0)
             - _pipe_latents(comp, "cogvideox", guidance_scale=1.0)).abs().max().item())
    # DPM draws fresh noise every step: this also checks the generator is used exactly as the pipeline does
    _record("cogvideox dpm vs CogVideoXPipeline+DPM",
            (_mine(comp, "cogvideox", sampler="dpm", steps=4)
             - _pipe_latents(comp, "cogvideox", diffusers.CogVideoXDPMScheduler, num_inference_steps=4)
             ).abs().max().item())
    # 1.5 (patch_size_t=2): 3 latent frames are padded to 4 exactly as the pipeline pads them
    _record("cogvideox-1.5 ddim vs CogVideoXPipeline",
            (_mine(comp, "cogvideox15") - _pipe_latents(comp, "cogvideox15")).abs().max().item())

    mine = _mine(comp, "mochi")
    # MochiPipeline calls the model at fl(fl(1 - s) * 1000), fastpost's Mochi predict() at fl(1000 - fl(1000 s)):
    # float32 rounding of the timestep (12.499989 vs 12.5) moves this perturbed tiny model's output by up to 5e-5
    # per step. With the pipeline fed fastpost's timestep values everything else must agree to 1e-5.
    _record("mochi flow_euler vs MochiPipeline (stock timesteps)",
            (mine - _pipe_latents(comp, "mochi")).abs().max().item(), tol=1e-3)
    # 2e-5: fastpost attends to each sample's valid text in ONE batched masked call (no host sync), diffusers per
    # sample over the valid tokens only; the same math, another fp32 summation order (issue 17; measured 1.25e-5)
    _record("mochi flow_euler vs MochiPipeline (same model timesteps)",
            (mine - _pipe_latents(comp, "mochi", _SameTimestepsScheduler)).abs().max().item(), tol=2e-5)
    # flavor null: the pipeline dir's own (inverted) scheduler config, run in fastpost's convention
    _record("mochi flavor=null (pipeline scheduler config) vs flavor=debug",
            (_mine(comp, "mochi", model={"flavor": None}) - mine).abs().max().item())


class _SameTimestepsScheduler:
    """Built lazily (diffusers import) by from_config: MochiPipeline's scheduler calling the model at the timestep
    values fastpost passes, 1000 - 1000 s; the Euler update itself is untouched (it indexes sigmas by step)."""

    @staticmethod
    def from_config(config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        class Same(FlowMatchEulerDiscreteScheduler):
            def set_timesteps(self, *args, sigmas=None, **kwargs):
                super().set_timesteps(*args, sigmas=sigmas, **kwargs)
                s = torch.from_numpy(np.asarray(sigmas).astype(np.float32))
                self.timesteps = 1000.0 - s * 1000

        return Same.from_config(config)


PLUGIN = '''
from dataclasses import dataclass
import torch
from fastpost.noise import linear_quadratic_sigmas as linear_quadratic_schedule
from fastpost.sampling import register_sampler

@dataclass
class ManualEulerConfig:
    threshold_noise: float = 0.025

@register_sampler("manual_euler", ManualEulerConfig)
class ManualEuler:
    """x <- x + (s_next - s) v on Mochi's sigmas, written against the interface alone."""
    def __init__(self, ctx, cfg):
        self.cfg, self.init_noise_sigma = cfg, 1.0
    def set_timesteps(self, num_steps, device):
        s = linear_quadratic_schedule(num_steps, self.cfg.threshold_noise) + [0.0]
        self.sigmas = torch.tensor(s, dtype=torch.float32, device=device)
        return self.sigmas[:-1] * 1000
    def step(self, model_output, index, timestep, latents):
        return latents + (self.sigmas[index + 1] - self.sigmas[index]) * model_output
'''


def test_sampler_plugin(comp, tmp_path, monkeypatch):
    (tmp_path / "my_sampler_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = _mine(comp, "mochi", sampler="manual_euler", imports=["my_sampler_plugin"])
    _record("mochi plugin sampler (10-line Euler) vs flow_euler", (mine - _mine(comp, "mochi")).abs().max().item())


# ---- parallel layouts against world 1 (the CLI, as torchrun runs it) -------------------------------------------
def _argv(comp, family: str, out: Path, *extra: str) -> list[str]:
    return ["--config", f"configs/{family}/sample_debug.yaml", "--prompt-file", str(comp["prompts"]),
            "--output-dir", str(out), f"model.pretrained={comp[family]}", "height=48", "width=80",
            f"num_frames={FRAMES[family]}", "steps=3", "guidance_scale=5.0", "seed=11", "save_latents=true",
            *(["dynamic_cfg=true"] if family == "cogvideox" else []), *extra]


def _jobs(rank, world, jobs):
    for name, argv in jobs:
        assert main(argv) == 0, f"rank {rank}: job {name} failed"


LAYOUTS = {2: {"sp2": ["parallel.ulysses=2"], "cfg2": ["parallel.cfg=2"]},
           4: {"sp4": ["parallel.ulysses=4"], "cfg2xsp2": ["parallel.cfg=2", "parallel.ulysses=2"],
               "replicas2xsp2": ["parallel.ulysses=2"], "replicas2xcfg2": ["parallel.cfg=2"]}}


def _latents(out: Path) -> list[torch.Tensor]:
    files = sorted(out.glob("*.latents.pt"))
    assert len(files) == len(PROMPTS), f"{out}: expected {len(PROMPTS)} latent files, found {files}"
    return [torch.load(f) for f in files]


def _check_outputs(out: Path, family: str) -> None:
    """Every prompt has an mp4 with the requested frames/size and a complete metadata json; no partial files."""
    assert not list((out / ".partial").glob("*")), "partial files left behind"
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == len(PROMPTS)
    for i, video in enumerate(videos):
        reader = imageio.get_reader(video, format="FFMPEG")
        frames = np.stack([f for f in reader])  # not list(reader): its len() is inf for ffmpeg streams
        reader.close()
        assert frames.shape == (FRAMES[family], 48, 80, 3), frames.shape
        meta = json.loads(video.with_suffix(".json").read_text())
        expected = {"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "sampler", "model", "lora",
                    "height", "width", "num_frames", "decoded_frames", "fps", "latent_shape", "parallel",
                    "elapsed_s", "video"}
        assert expected <= set(meta), expected - set(meta)
        assert meta["prompt"] == PROMPTS[i]["prompt"] and meta["video"] == video.name
        assert meta["seed"] == PROMPTS[i].get("seed", 11 + i)
        assert meta["negative_prompt"] == PROMPTS[i].get("negative_prompt", "")
        assert meta["decoded_frames"] == FRAMES[family] and meta["steps"] == 3
        assert meta["model"]["family"] == family and meta["elapsed_s"]["total"] > 0


def test_parallel_layouts_match_world1(comp, tmp_path):
    # fp32 tolerance 1e-5 relative to the latent magnitude: the perturbed tiny Mochi reaches |latents| ~ 14, where
    # merely changing the batch size (batched vs split CFG, same math) moves latents by 3.4e-5. Measured: every
    # layout bit-identical to world 1, except Mochi sp4 at 2.8e-5 (below that batching floor).
    refs, refs_split, scales = {}, {}, {}
    for family in ("cogvideox", "mochi"):
        assert main(_argv(comp, family, tmp_path / f"w1_{family}")) == 0
        _check_outputs(tmp_path / f"w1_{family}", family)
        refs[family] = _latents(tmp_path / f"w1_{family}")
        # CFG parallel runs uncond and cond as two batch-1 calls; world 1 does the same with cfg_batched=false
        assert main(_argv(comp, family, tmp_path / f"w1s_{family}", "cfg_batched=false")) == 0
        refs_split[family] = _latents(tmp_path / f"w1s_{family}")
        scale = scales[family] = max(r.abs().max().item() for r in refs[family])
        _record(f"{family} world1 cfg_batched=false vs batched (|latents| <= {scale:.1f})",
                max((a - b).abs().max().item() for a, b in zip(refs_split[family], refs[family])), tol=1e-4)
    for world, layouts in LAYOUTS.items():
        jobs = [(f"{name} {family}", _argv(comp, family, tmp_path / f"w{world}_{name}_{family}", *extra))
                for name, extra in layouts.items() for family in ("cogvideox", "mochi")]
        run_distributed(_jobs, world, jobs)
    for world, layouts in LAYOUTS.items():
        for name in layouts:
            for family in ("cogvideox", "mochi"):
                out = tmp_path / f"w{world}_{name}_{family}"
                ref, how = (refs_split, "cfg_batched=false") if "cfg2" in name else (refs, "batched")
                err = max((a - b).abs().max().item() for a, b in zip(_latents(out), ref[family]))
                _record(f"{family} world{world} {name} vs world 1 ({how})", err, tol=TOL * max(1.0, scales[family]))
    _check_outputs(tmp_path / "w4_cfg2xsp2_mochi", "mochi")
    meta = json.loads(next((tmp_path / "w4_replicas2xsp2_cogvideox").glob("*.json")).read_text())
    assert meta["parallel"] == {"world_size": 4, "replicas": 2, "cfg": 1, "ulysses": 2}


# ---- weights from training runs ---------------------------------------------------------------------------------
def test_training_checkpoint_and_lora_loading(comp, tmp_path):
    from fastpost.checkpoint import CheckpointManager
    from fastpost.lora import LoRAConfig, inject_lora

    fam = get_family("cogvideox")
    text_vae = dict(vae=str(comp["cogvideox"]), text_encoder=str(comp["cogvideox"]))
    # full finetune checkpoint holding the pipeline's transformer weights == the pipeline itself
    model = make_model(fam, "debug", seed=0)
    CheckpointManager(tmp_path / "full" / "checkpoints").save(
        3, {"model": (model, torch.optim.AdamW(model.parameters()))}, {}, {})
    cfg = _cfg(comp, "cogvideox")
    cfg.model = SampleModelConfig(family="cogvideox", flavor="debug", checkpoint=str(tmp_path / "full" / "checkpoints"),
                                  **text_vae)
    _record("cogvideox full DCP checkpoint vs pretrained dir",
            (VideoSampler(cfg).generate(0) - _mine(comp, "cogvideox")).abs().max().item())

    # LoRA run: seeded flavor base + adapter; its DCP checkpoint (adapter only) vs its diffusers-format export
    torch.manual_seed(0)
    base = fam.load(None, "debug")
    inject_lora(base, LoRAConfig(enabled=True, rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    trainable = [p for p in base.parameters() if p.requires_grad]
    CheckpointManager(tmp_path / "lora_run" / "checkpoints").save(1, {"model": (base, torch.optim.AdamW(trainable))}, {}, {})
    (tmp_path / "lora_run" / "config.yaml").write_text("lora: {enabled: true, rank: 4, alpha: 8.0}\n")
    # diffusers-format export with the adapter metadata (alpha != rank must survive; fastpost.lora.export_lora
    # drops it in this revision), the way diffusers' own training scripts save
    import diffusers
    from peft import get_peft_model_state_dict

    diffusers.CogVideoXPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(base),
        transformer_lora_adapter_metadata=base.peft_config["default"].to_dict())

    def flavor_run(**model_kw):
        cfg = _cfg(comp, "cogvideox")
        cfg.model = SampleModelConfig(family="cogvideox", flavor="debug", init_seed=0, **text_vae, **model_kw)
        return VideoSampler(cfg).generate(0)

    with_ckpt = flavor_run(checkpoint=str(tmp_path / "lora_run" / "checkpoints" / "step_00000001"))
    with_dir = flavor_run(lora=str(tmp_path / "lora"))
    _record("cogvideox LoRA DCP checkpoint vs diffusers LoRA dir", (with_ckpt - with_dir).abs().max().item())
    assert (with_dir - flavor_run()).abs().max().item() > 1e-3, "the LoRA changed nothing: the test would be vacuous"


# ---- errors -------------------------------------------------------------------------------------------------------
def test_clear_errors(comp, tmp_path, capsys):
    par = lambda **kw: SampleConfig(prompt="x", parallel=SampleParallelConfig(**kw))  # noqa: E731
    with pytest.raises(SampleError, match=r"parallel.cfg must be 1 or 2.*got 3"):
        check_parallel(par(cfg=3), 4)
    with pytest.raises(SampleError, match=r"2 x 2 = 4 does not divide the world size 6"):
        check_parallel(par(cfg=2, ulysses=2), 6)
    with pytest.raises(SampleError, match=r"parallel.ulysses = 1 x 4 = 4 does not divide the world size 2"):
        check_parallel(par(ulysses=4), 2)
    with pytest.raises(SampleError, match=r"guidance_scale=1.0 <= 1 disables classifier-free guidance"):
        check_parallel(SampleConfig(prompt="x", guidance_scale=1.0, parallel=SampleParallelConfig(cfg=2)), 2)
    assert check_parallel(par(cfg=2, ulysses=2), 8) == 2  # two replicas

    with pytest.raises(SampleError, match=r"prompt file '.*nope.txt' does not exist"):
        VideoSampler(_cfg(comp, "cogvideox", prompt=None, prompt_file=str(tmp_path / "nope.txt")))
    with pytest.raises(SampleError,
                       match=r"resolution 50x80 .* multiples of 16 \(VAE spatial factor 8 x patch size 2\)"):
        VideoSampler(_cfg(comp, "cogvideox", height=50))
    with pytest.raises(SampleError, match=r"resolution 48x72 .* multiples of 16"):
        VideoSampler(_cfg(comp, "mochi", width=72))
    with pytest.raises(SampleError,
                       match=r"num_frames=8 is not valid for the AutoencoderKLCogVideoX VAE: it needs 4k\+1"):
        VideoSampler(_cfg(comp, "cogvideox", num_frames=8))
    with pytest.raises(SampleError, match=r"num_frames=9 is not valid for the AutoencoderKLMochi VAE: it needs 6k\+1"):
        VideoSampler(_cfg(comp, "mochi", num_frames=9))
    with pytest.raises(ValueError, match=r"sampler 'flow_euler' integrates flow_matching models"):
        VideoSampler(_cfg(comp, "cogvideox", sampler="flow_euler"))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['sampler_args.bogus'\]"):
        VideoSampler(_cfg(comp, "cogvideox", sampler_args={"bogus": 1}))
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; registered: \[.*'ddim'.*'flow_euler'"):
        VideoSampler(_cfg(comp, "cogvideox", sampler="nope"))

    # prompt files: text (blank lines skipped) and jsonl (line-numbered errors)
    (tmp_path / "p.txt").write_text("a red ball\n\n  green tree \n")
    items = read_prompts(None, str(tmp_path / "p.txt"), "neg", 4)
    assert [(i.prompt, i.negative_prompt, i.seed) for i in items] == [("a red ball", "neg", 4),
                                                                       ("green tree", "neg", 5)]
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(SampleError, match=r"p.jsonl:2: each line must be an object with a string \"prompt\""):
        read_prompts(None, str(tmp_path / "p.jsonl"), "", 0)
    with pytest.raises(SampleError, match=r"exactly one of prompt"):
        read_prompts(None, None, "", 0)

    # the CLI: exit code 2 and the message on stderr, no traceback
    assert main(["--prompt-file", str(tmp_path / "missing.jsonl"), f"model.pretrained={comp['cogvideox']}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--prompt", "x", "model.bogus=1"]) == 2
    assert "unknown config key(s) ['model.bogus']" in capsys.readouterr().err
    assert main(["--prompt", "x", "parallel.cfg=2", "parallel.ulysses=2"]) == 2
    assert "does not divide the world size 1" in capsys.readouterr().err


def test_job_files_parse():
    for family in ("cogvideox", "mochi"):
        cfg = load_config(SampleConfig, f"configs/{family}/sample_debug.yaml")
        assert cfg.model.family == family and cfg.prompt


def test_report_errors():
    """Runs last: prints the measured errors (pytest -s) for docs/sampling.md."""
    for name, err in ERRORS.items():
        print(f"{name:60s} {err:.2e}")
