"""Training the Wan family: finetune (LoRA and full) and PCM distillation at sp2 equal world 1; the LoRA exports
(diffusers format and ComfyUI's native Wan names) load in WanPipeline.load_lora_weights and reproduce the trained
model; kill -9 + resume of a Wan LoRA run is exact.

Latents 4 x 3 x 6 x 10: 45 video tokens (odd), 3 heads: sp2 pads both. Prompts: Wan's 512 zero-padded tokens.
"""

import pytest
import torch

from fastpost.config import from_dict
from fastpost.models import get_family
from fastpost.trainer import TrainConfig, Trainer
from tests._harness import run_distributed, write_random_shards
from tests.test_trainer import read_losses

LATENT, TEXT_LEN, TEXT_DIM = (4, 3, 6, 10), 512, 16
FAMILY = get_family("wan")
LORA = {"enabled": True, "rank": 4, "alpha": 8}  # alpha != rank: both exports must carry the scale
JOBS = {
    "lora": dict(steps=2, lora=LORA, checkpoint={"every_steps": 2}),
    "full": dict(steps=2),
    "distill": dict(steps=2, lora=LORA, recipe="distill",
                    recipe_args={"num_teacher_steps": 8, "phases": 2, "target": "ema", "ema_decay": 0.5}),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_shards")
    write_random_shards(root, 8, LATENT, TEXT_LEN, TEXT_DIM)
    return root


def job(out, shards, **sections) -> dict:
    cfg = {"output_dir": str(out), "steps": 3, "seed": 3, "model": {"family": "wan", "flavor": "debug"},
           "optim": {"lr": 3e-3, "warmup_steps": 1}, "data": {"path": str(shards), "batch_size": 1},
           "checkpoint": {"every_steps": 0}, "logging": {"progress_bar": False}}
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def _fit_all(rank, world, cfgs):
    for cfg in cfgs:
        Trainer(from_dict(TrainConfig, cfg)).fit()


def test_finetune_lora_full_and_distill_sp2_match_world1_and_lora_exports_load(shards, tmp_path):
    run_distributed(_fit_all, 1, [job(tmp_path / f"w1_{n}", shards, **kw) for n, kw in JOBS.items()])
    run_distributed(_fit_all, 2, [job(tmp_path / f"sp2_{n}", shards, parallel={"ulysses": 2}, **kw)
                                  for n, kw in JOBS.items()])
    for name, kw in JOBS.items():
        w1, sp2 = read_losses(tmp_path / f"w1_{name}"), read_losses(tmp_path / f"sp2_{name}")
        assert sorted(w1) == sorted(sp2) == list(range(1, kw["steps"] + 1)), name
        for s in w1:
            assert abs(w1[s] - sp2[s]) <= 1e-5 * max(1.0, abs(w1[s])), (name, s, w1[s], sp2[s])
    assert (tmp_path / "sp2_full" / "transformer" / "config.json").is_file()
    _check_lora_exports(tmp_path / "sp2_lora", tmp_path)


def _check_lora_exports(run_dir, tmp_path):
    """Both exports, loaded by WanPipeline.load_lora_weights onto the flavor's seeded base, give the trained model's
    output (rebuilt from the final DCP checkpoint); the ComfyUI file goes through diffusers' converter of native
    Wan LoRAs (blocks.N.self_attn.q ...), which checks the names and the alpha scale."""
    import torch.distributed.checkpoint as dcp
    from diffusers import WanPipeline
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from fastpost.export import COMFY_LORA_FILE
    from fastpost.lora import LoRAConfig, inject_lora
    from fastpost.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    ours = FAMILY.load(None, "debug")
    inject_lora(ours, from_dict(LoRAConfig, LORA), FAMILY.lora_target_modules)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    state = {"model": get_model_state_dict(ours, options=options)}
    dcp.load(state, checkpoint_id=str(run_dir / "checkpoints" / "step_00000002"))
    set_model_state_dict(ours, state["model"], options=options)

    pipe_dir = build_tiny_pipeline(tmp_path / "pipe", "wan", "debug", seed=0)  # base = the flavor at init_seed 0
    g = torch.Generator().manual_seed(7)
    x, emb = torch.randn(1, *LATENT, generator=g), torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    t = torch.tensor([500])
    outs = {}
    for name, kwargs in (("base", None), ("diffusers", {}), ("comfyui", {"weight_name": COMFY_LORA_FILE})):
        pipe = WanPipeline.from_pretrained(pipe_dir)
        if kwargs is not None:
            pipe.load_lora_weights(run_dir / "lora", **kwargs)
        with torch.no_grad():
            outs[name] = FAMILY.predict(pipe.transformer, x, t, emb)
    with torch.no_grad():
        want = FAMILY.predict(ours, x, t, emb)
    assert (outs["base"] - want).abs().max() > 1e-4, "the LoRA changed nothing: the comparison would be vacuous"
    assert (outs["diffusers"] - want).abs().max() <= 1e-5
    assert (outs["comfyui"] - want).abs().max() <= 1e-5


def test_kill9_resume_is_exact_for_wan_lora(shards, tmp_path):
    """A Wan LoRA run (with EMA) SIGKILLed after step 3 of 8 and resumed from its newest complete checkpoint equals
    an uninterrupted run: losses at every step and every tensor of the final checkpoint (model, AdamW, EMA).
    tests/test_trainer.py's pattern, with the run forked from the harness's preloaded forkserver instead of a fresh
    `fastpost train` process (same Trainer; a fresh interpreter was measured at 80 s for this test on 2 busy cores)."""
    import multiprocessing
    import multiprocessing.forkserver
    import os
    import signal
    import time

    from fastpost.distributed.parallel_dims import free_port
    from tests._harness import _PRELOAD, _worker
    from tests.test_trainer import _final_state

    def cfg_of(out, **kw):
        return job(out, shards, steps=8, lora=LORA, checkpoint={"every_steps": 2, **kw}, ema_decay=0.9)

    run_distributed(_fit_all, 1, [cfg_of(tmp_path / "ref")])
    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)
    proc = multiprocessing.get_context("forkserver").Process(
        target=_worker, args=(0, 1, free_port(), _fit_all, ([cfg_of(tmp_path / "run")],)))
    proc.start()
    deadline = time.time() + 240
    while time.time() < deadline and max(_losses(tmp_path / "run") or [0]) < 3 and proc.is_alive():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    killed_at = max(_losses(tmp_path / "run"))
    assert proc.exitcode == -signal.SIGKILL and killed_at < 8, (proc.exitcode, killed_at)
    run_distributed(_fit_all, 1, [cfg_of(tmp_path / "run", resume="latest")])
    want, got = read_losses(tmp_path / "ref"), read_losses(tmp_path / "run")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in want), (killed_at, got, want)
    a, b = _final_state(tmp_path / "ref"), _final_state(tmp_path / "run")
    assert a.keys() == b.keys() and sum(isinstance(v, torch.Tensor) for v in a.values()) > 10
    assert any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


def _losses(out):
    try:
        return read_losses(out)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return {}


def test_one_expert_per_job_of_a_two_expert_pipeline(shards, tmp_path):
    """Wan 2.2 A14B layout: model.expert picks transformer/ (high_noise) or transformer_2/ (low_noise) and the
    finetune times lie in that expert's noise levels (sigma >= boundary_ratio, or below it)."""
    from diffusers import WanPipeline

    from fastpost.builder import BuildError
    from fastpost.tiny import build_tiny_pipeline
    from tests._parity import make_model

    single = WanPipeline.from_pretrained(build_tiny_pipeline(tmp_path / "pipe", "wan", "debug"))
    pipe = tmp_path / "a14b"
    WanPipeline(tokenizer=single.tokenizer, text_encoder=single.text_encoder, vae=single.vae,
                scheduler=single.scheduler, transformer=single.transformer,
                transformer_2=make_model(FAMILY, "debug", seed=1), boundary_ratio=0.875).save_pretrained(pipe)
    model = {"family": "wan", "flavor": None, "pretrained": str(pipe)}
    # lr 0: the exported weights are the expert the job loaded
    jobs = {e: job(tmp_path / e, shards, steps=3, model={**model, "expert": e}, optim={"lr": 0.0, "warmup_steps": 0},
                   recipe_args={"timestep_sampling": "uniform"}) for e in ("high_noise", "low_noise")}
    jobs["low_lora"] = job(tmp_path / "low_lora", shards, steps=2, lora=LORA, model={**model, "expert": "low_noise"})
    run_distributed(_fit_all, 1, list(jobs.values()))
    for expert, sub, inside in (("high_noise", "transformer", lambda c: c >= 0.875),
                                ("low_noise", "transformer_2", lambda c: c < 0.875)):
        exported = FAMILY.diffusers_class.from_pretrained(tmp_path / expert / "transformer").state_dict()
        source = FAMILY.diffusers_class.from_pretrained(pipe / sub).state_dict()
        assert all(torch.equal(exported[k], source[k]) for k in source), expert
        import json

        times = [json.loads(line)["t_mean"] for line in (tmp_path / expert / "metrics.jsonl").read_text().splitlines()
                 if "t_mean" in line]
        assert len(times) == 3 and all(inside(c) for c in times), (expert, times)
    with pytest.raises(BuildError, match="set model.expert to high_noise, low_noise or both"):
        Trainer(from_dict(TrainConfig, job(tmp_path / "none", shards, model=model)))
    # the low-noise expert's LoRA: WanPipeline.load_lora_weights(load_into_transformer_2=True) and `fastpost sample`
    # with model.expert=low_noise sample the same video, which differs from the base pipeline's
    from fastpost.sampling import SampleConfig, SampleModelConfig, VideoSampler

    def sample(**model_kw):
        cfg = SampleConfig(prompt="a red ball", negative_prompt="", height=48, width=80, num_frames=9, steps=4,
                           guidance_scale=5.0, seed=3, progress_bar=False, cfg_batched=False,
                           model=SampleModelConfig(family="wan", pretrained=str(pipe), **model_kw))
        return VideoSampler(cfg).generate(0)

    def pipeline(lora: bool):
        p = WanPipeline.from_pretrained(pipe)
        if lora:
            p.load_lora_weights(tmp_path / "low_lora" / "lora", load_into_transformer_2=True)
        p.set_progress_bar_config(disable=True)
        return p(prompt="a red ball", negative_prompt="", height=48, width=80, num_frames=9, num_inference_steps=4,
                 guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(3)).frames

    mine, want = sample(lora=str(tmp_path / "low_lora" / "lora"), expert="low_noise"), pipeline(lora=True)
    scale = max(1.0, want.abs().max().item())
    assert (mine - want).abs().max() <= 1e-5 * scale
    assert (want - pipeline(lora=False)).abs().max() > 1e-3, "the expert's LoRA changed nothing"
    from fastpost.sampling import SampleError

    with pytest.raises(SampleError, match="set model.expert"):
        sample(lora=str(tmp_path / "low_lora" / "lora"))


def _expert_records(out) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if any(k.startswith("loss_") for k in r)}


def test_both_experts_in_one_job_train_the_expert_owning_each_steps_time(shards, tmp_path):
    """model.expert=both on a two-expert pipeline (boundary 0.5, uniform times): each step trains only the expert
    owning its drawn time (the other's weights and AdamW state are bit-identical across that step, and the step's
    times lie on the expert's side); both LoRAs load in WanPipeline (transformer and transformer_2) and give the
    trained experts' outputs; a fresh trainer resumed at step 3 ends bit-identical to the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from diffusers import WanPipeline
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from fastpost.builder import BuildError
    from fastpost.lora import LoRAConfig, inject_lora
    from fastpost.tiny import build_tiny_pipeline
    from tests._parity import make_model
    from tests.test_trainer import _final_state

    single = WanPipeline.from_pretrained(build_tiny_pipeline(tmp_path / "pipe", "wan", "debug"))
    pipe = tmp_path / "a14b"
    WanPipeline(tokenizer=single.tokenizer, text_encoder=single.text_encoder, vae=single.vae,
                scheduler=single.scheduler, transformer=single.transformer,
                transformer_2=make_model(FAMILY, "debug", seed=1), boundary_ratio=0.5).save_pretrained(pipe)
    model = {"family": "wan", "flavor": None, "pretrained": str(pipe), "expert": "both"}

    def both(out, steps, **ckpt):
        return job(out, shards, steps=steps, lora=LORA, model=model, recipe_args={"timestep_sampling": "uniform"},
                   checkpoint={"every_steps": 1, "keep_last": 10, **ckpt})

    full = job(tmp_path / "full", shards, steps=2, model=model, recipe_args={"timestep_sampling": "uniform"})
    run_distributed(_fit_all, 1, [both(tmp_path / "ref", 6), full])
    import shutil

    for step in (1, 2, 3):  # a fresh trainer resumes from the uninterrupted run's step-3 checkpoint
        shutil.copytree(tmp_path / "ref" / "checkpoints" / f"step_{step:08d}",
                        tmp_path / "run" / "checkpoints" / f"step_{step:08d}")
    run_distributed(_fit_all, 1, [both(tmp_path / "run", 6, resume="latest")])
    ref = _expert_records(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 7))
    phases = {s: next(k[len("loss_"):] for k in r if k.startswith("loss_")) for s, r in ref.items()}
    assert set(phases.values()) == {"high_noise", "low_noise"}, phases
    for s, phase in phases.items():
        c = ref[s][f"t_mean_{phase}"]
        assert (c >= 0.5) if phase == "high_noise" else (c < 0.5), (s, phase, c)
    ckpts = sorted((tmp_path / "ref" / "checkpoints").glob("step_*"))
    states = [_state(c) for c in ckpts]
    prefixes = {"high_noise": ("model.", "optim.state."),
                "low_noise": ("trainables.model_2.model.", "trainables.model_2.optim.state.")}
    for s in range(2, 7):  # step s: checkpoint s-1 -> s; the LR schedules (param_groups) advance for both
        before, after = states[s - 2], states[s - 1]
        for expert, owned in prefixes.items():
            keys = {k for k in (*before, *after) if k.startswith(owned)}
            assert any(k.startswith(owned[0]) for k in keys), expert
            same = all(k in before and k in after and (torch.equal(before[k], after[k])
                       if isinstance(before[k], torch.Tensor) else before[k] == after[k]) for k in keys)
            assert same == (expert != phases[s]), (s, phases[s], expert)
    # resumed == uninterrupted: every step's loss and the final checkpoint's every tensor
    run = _expert_records(tmp_path / "run")
    assert sorted(run) == [4, 5, 6]
    assert all(run[s][f"loss_{phases[s]}"] == ref[s][f"loss_{phases[s]}"] for s in run), (run, ref)
    a, b = _final_state(tmp_path / "ref"), _final_state(tmp_path / "run")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    # the exports: lora/ into transformer, lora_transformer_2/ into transformer_2 == the trained experts
    g = torch.Generator().manual_seed(7)
    x, emb = torch.randn(1, *LATENT, generator=g), torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    t = torch.tensor([500])
    loaded = WanPipeline.from_pretrained(pipe)
    with torch.no_grad():
        untrained = {a: FAMILY.predict(getattr(loaded, a), x, t, emb) for a in ("transformer", "transformer_2")}
    loaded.load_lora_weights(tmp_path / "ref" / "lora")
    loaded.load_lora_weights(tmp_path / "ref" / "lora_transformer_2", load_into_transformer_2=True)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    for name, sub, attr in (("model", "transformer", "transformer"), ("model_2", "transformer_2", "transformer_2")):
        ours = FAMILY.diffusers_class.from_pretrained(pipe / sub)
        inject_lora(ours, from_dict(LoRAConfig, LORA), FAMILY.lora_target_modules)
        sd = get_model_state_dict(ours, options=options)
        dcp.load({"model": sd} if name == "model" else {"trainables": {name: {"model": sd}}},
                 checkpoint_id=str(ckpts[-1]))
        set_model_state_dict(ours, sd, options=options)
        with torch.no_grad():
            want = FAMILY.predict(ours, x, t, emb)
            got = FAMILY.predict(getattr(loaded, attr), x, t, emb)
        assert (untrained[attr] - want).abs().max() > 1e-4, f"{name}: the LoRA changed nothing"
        assert (got - want).abs().max() <= 1e-5, name
    # full: transformer/ and transformer_2/ are the final checkpoint's experts; the one no step drew is the source's
    drawn = {next(k[len("loss_"):] for k in r if k.startswith("loss_")) for r in _expert_records(tmp_path / "full").values()}
    final = _final_state(tmp_path / "full")
    for expert, sub, prefix in (("high_noise", "transformer", "model."), ("low_noise", "transformer_2",
                                                                          "trainables.model_2.model.")):
        exported = FAMILY.diffusers_class.from_pretrained(tmp_path / "full" / sub).state_dict()
        source = FAMILY.diffusers_class.from_pretrained(pipe / sub).state_dict()
        assert all(torch.equal(exported[k], final[prefix + k]) for k in source), sub
        assert all(torch.equal(exported[k], source[k]) for k in source) == (expert not in drawn), (sub, drawn)
    with pytest.raises(BuildError, match="needs a two-expert pipeline folder"):
        Trainer(from_dict(TrainConfig, job(tmp_path / "single", shards, model={"expert": "both"})))


def _state(ckpt) -> dict:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return flatten_state_dict(_load_state_dict_from_keys(checkpoint_id=str(ckpt)))[0]
