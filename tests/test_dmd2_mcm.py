"""DMD2 and MCM distillation: dp2 x sp2 == world 1, kill -9 + exact resume (every model, optimizer and the image
loader), a fast version of scripts/distill_proof.py, the samplers in `fastpost sample`, the transformers
discriminator backbone."""

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fastpost.config import from_dict
from fastpost.trainer import TrainConfig, Trainer
from tests._harness import run_distributed, write_random_shards

LATENT = (4, 3, 10, 10)  # 75 video tokens: sp=2 pads; CogVideoX debug has 3 heads: sp=2 pads heads too
LORA = {"enabled": True, "rank": 4, "alpha": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd_mcm")
    write_random_shards(root / "videos", 8, LATENT, 8, 16)
    # single-frame latents; 8 = 4 batches of 2: the epoch pads alike at dp 1 and 2
    write_random_shards(root / "images", 8, (4, 1, 10, 10), 8, 16, seed=7)
    return root


RECIPES = {
    # LoRA generator and LoRA critic as two adapters of one frozen base (the teacher: adapters off), CFG real
    # score, the GAN head and backward simulation: every optional path of the recipe
    "dmd2": {"num_teacher_steps": 8, "generator_steps": 2, "critic_updates": 1, "real_guidance": 2.0,
             "critic": "lora", "critic_lora": {"rank": 4, "alpha": 4}, "gan_weight": 0.1, "gan_critic_weight": 0.1,
             "backward_simulation": True, "critic_optim": {"lr": 2e-3}},
    "mcm": {"num_teacher_steps": 8, "phases": 2, "skip_steps": 2, "guidance_max": 2.0, "raw_weight": 0.5,
            "image_batch_size": 2, "image_mix": 0.5, "adv_weight": 0.1, "disc_updates": 2},
}


def job(out, data, recipe, steps, **extra) -> dict:
    args = dict(RECIPES[recipe])
    if recipe == "mcm":
        args["images"] = str(data / "images")
    cfg = {"output_dir": str(out), "steps": steps, "seed": 5, "recipe": recipe, "recipe_args": args,
           "model": {"family": "cogvideox", "flavor": "debug"}, "optim": {"lr": 1e-3}, "lora": LORA,
           "data": {"path": str(data / "videos"), "batch_size": 1},
           # a metrics record per step (the trainer writes them at logging steps): the kill below waits for step 3
           "checkpoint": {"every_steps": 2}, "logging": {"progress_bar": False, "every_steps": 1}}
    cfg.update(extra)
    return cfg


def metrics(out) -> dict[int, dict[str, float]]:
    """step -> every loss-like metric of its phases (the last record of a step wins: a killed run, its resume)."""
    recs = {}
    for line in Path(out, "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = {k: v for k, v in r.items() if k.startswith(("loss", "denoise", "dmd", "gan", "d_",
                                                                          "motion", "adv", "regression"))}
    return recs


def _last_step(out) -> int:
    """The last step a running job has logged (0 before any; a line being written is not counted yet)."""
    try:
        lines = Path(out, "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps)


def _fit(rank, world, cfgs):
    for cfg in cfgs:  # several jobs in one spawn: the processes (and their imports) are paid once
        Trainer(from_dict(TrainConfig, cfg)).fit()


def _final_state(run_dir: Path) -> dict:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return flatten_state_dict(_load_state_dict_from_keys(checkpoint_id=str(step)))[0]


def _killable(cfg):
    """A world-1 training process forked from the harness's preloaded forkserver (cheap to start), to SIGKILL."""
    import multiprocessing
    import multiprocessing.forkserver

    from tests import _harness
    from fastpost.distributed.parallel_dims import free_port

    multiprocessing.forkserver.set_forkserver_preload(_harness._PRELOAD)
    proc = multiprocessing.get_context("forkserver").Process(
        target=_harness._worker, args=(0, 1, free_port(), _fit, ([cfg],)))
    proc.start()
    return proc


def test_dp2_sp2_equals_world1_and_kill9_resume_is_exact(data, tmp_path):
    steps = 6  # the kill lands after step 3: steps 4-6 leave a wide window even with both workers busy
    off = {"every_steps": 0}  # only the final checkpoint
    run_distributed(_fit, 1, [job(tmp_path / f"{r}_w1", data, r, steps, grad_accum=2, checkpoint=off) for r in RECIPES])
    run_distributed(_fit, 4, [job(tmp_path / f"{r}_w4", data, r, 3, parallel={"ulysses": 2}, checkpoint=off)
                              for r in RECIPES])
    for r in RECIPES:
        w1, w4 = metrics(tmp_path / f"{r}_w1"), metrics(tmp_path / f"{r}_w4")
        assert sorted(w1) == list(range(1, steps + 1)) and sorted(w4) == [1, 2, 3]
        for s in w4:  # the losses are dp means (the other metrics are rank 0's last micro-batch's)
            assert w1[s].keys() == w4[s].keys() and len(w1[s]) >= 4, (r, w1[s].keys())
            for k in (k for k in w4[s] if k.startswith("loss")):
                assert abs(w1[s][k] - w4[s][k]) <= 1e-5 * max(1.0, abs(w1[s][k])), (r, s, k, w1[s][k], w4[s][k])

    # the export is the generator's adapter alone (the critic's shares its base, under another adapter name)
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "dmd2_w1" / "lora" / "pytorch_lora_weights.safetensors")
    assert exported and not any("critic" in k for k in exported), sorted(exported)[:4]
    assert max(v.abs().max().item() for k, v in exported.items() if "lora_B" in k) > 0, "the generator did not train"

    # kill -9 once step 3 is logged (the step-2 checkpoint is complete), resume: every metric of every step and
    # the final checkpoint (every model, optimizer, recipe tensor) equal the uninterrupted run's bit for bit.
    # Both recipes' runs go at once (two processes), and resume together in one process.
    cfgs = {r: job(tmp_path / f"{r}_run", data, r, steps, grad_accum=2) for r in RECIPES}
    procs, deadline = {r: _killable(cfg) for r, cfg in cfgs.items()}, time.time() + 120
    while time.time() < deadline and any(p.is_alive() and p.exitcode is None for p in procs.values()):
        for r, proc in procs.items():
            if proc.exitcode is None and _last_step(tmp_path / f"{r}_run") >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
        time.sleep(0.02)
    for r, proc in procs.items():
        assert proc.exitcode == -signal.SIGKILL, (r, proc.exitcode)  # killed, not finished or failed
        assert 3 <= max(metrics(tmp_path / f"{r}_run")) < steps
    run_distributed(_fit, 1, [{**cfg, "checkpoint": {"every_steps": 2, "resume": "latest"}} for cfg in cfgs.values()])
    for r in RECIPES:
        log = tmp_path / f"{r}_run" / "metrics.jsonl"
        want, got = metrics(tmp_path / f"{r}_w1"), metrics(log.parent)
        assert got == want, r
        a, b = _final_state(tmp_path / f"{r}_w1"), _final_state(log.parent)
        assert a.keys() == b.keys()
        optims = {"optim"} | {k.split(".")[1] for k in a if k.startswith("trainables.") and ".optim.state." in k}
        assert len(optims) == (3 if r == "dmd2" else 2), optims  # generator, critic, GAN head / student, disc
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
        extra = [Path(tmp_path / f"{r}_{n}" / "checkpoints").glob("step_*/extra_rank00000.safetensors")
                 for n in ("w1", "run")]
        from fastpost.safe_load import load_state

        sa, sb = (load_state(sorted(e)[-1]) for e in extra)
        assert sa["loader"] == sb["loader"] and sa.get("recipe_loaders") == sb.get("recipe_loaders")
        assert ("images" in sa.get("recipe_loaders", {})) == (r == "mcm")


def _proof(rank, world, cfgs, out):
    """Train each job, then sample its student and the teacher (the LoRA base) with the student's few-step
    sampler from 3 noise seeds (2 copies of one prompt)."""
    from fastpost.noise import make_grid, phase_edges
    from fastpost.recipes.distill import phased_sample
    from fastpost.recipes.dmd2 import dmd_sample

    result = {}
    for cfg in cfgs:
        trainer = Trainer(from_dict(TrainConfig, cfg))
        trainer.fit()
        recipe, family = trainer.recipe, trainer.family
        student = recipe.export_model()
        grid = make_grid(family, "debug", 8)
        batch = next(iter(trainer.loader))
        embeds, mask = batch["prompt_embeds"][:1].repeat(2, 1, 1), batch["prompt_attention_mask"][:1].repeat(2, 1)
        outs = {"student": [], "teacher": []}
        for seed in range(3):  # the teacher through the same few-step sampler: diversity lost is training's
            noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(100 + seed))
            for who in ("student", "teacher"):  # the teacher: the LoRA base, adapters off (the same module)
                with recipe._as_teacher() if who == "teacher" else contextlib.nullcontext(student) as model:
                    if cfg["recipe"] == "dmd2":
                        x = dmd_sample(family, model, grid, phase_edges(8, 2), noise, embeds, mask,
                                       generator=torch.Generator().manual_seed(seed))
                    else:
                        x = phased_sample(family, model, grid, phase_edges(8, 2), noise, embeds, mask)
                outs[who].append(x)
        assert not torch.equal(outs["student"][0], outs["teacher"][0]), "the student did not train"
        var = {k: torch.stack(v).var(dim=0).mean().item() for k, v in outs.items()}
        result[cfg["recipe"]] = {"var": var, "finite": all(torch.isfinite(torch.stack(v)).all().item()
                                                           for v in outs.values())}
    Path(out).write_text(json.dumps(result))


def test_fast_proof_losses_fall_without_collapse(data, tmp_path):
    """A few dozen steps of each recipe from a random teacher: finite, the trained objectives fall, and the
    few-step samples vary over seeds at least half as much as the teacher's (no collapse)."""
    cfgs = [job(tmp_path / "dmd2", data, "dmd2", 16, checkpoint={"every_steps": 0}, optim={"lr": 3e-3},
                recipe_args={**RECIPES["dmd2"], "critic": "full", "critic_optim": {"lr": 1e-3}}),
            job(tmp_path / "mcm", data, "mcm", 16, checkpoint={"every_steps": 0}, optim={"lr": 3e-3},
                recipe_args={**RECIPES["mcm"], "images": str(data / "images")})]
    run_distributed(_proof, 1, cfgs, str(tmp_path / "proof.json"))
    proof = json.loads((tmp_path / "proof.json").read_text())

    def first_last(run, key):
        vals = [m[key] for _, m in sorted(metrics(tmp_path / run).items())]
        assert all(map(lambda v: v == v and abs(v) < 1e6, vals)), (run, key, vals)
        return sum(vals[:4]) / 4, sum(vals[-4:]) / 4

    first, last = first_last("dmd2", "denoise_critic")  # the full critic fits the generator's samples
    assert last < 0.8 * first, (first, last)
    first, last = first_last("mcm", "d_real_disc")  # the discriminator learns to tell the image set from fakes
    assert last < first, (first, last)
    for r, res in proof.items():
        assert res["finite"], r
        assert res["var"]["student"] >= 0.5 * res["var"]["teacher"], (r, res["var"])


def test_dmd_sampler_plugs_into_fastpost_sample(tmp_path):
    """`sampler: dmd` in fastpost sample: with renoise ddim the same latents as the recipe's dmd_sample; with
    fresh noise (from the per-video generator) reproducible for a seed and different from ddim."""
    from fastpost.models import get_family
    from fastpost.noise import make_grid, phase_edges
    from fastpost.recipes.dmd2 import dmd_sample
    from fastpost.sampling import SampleConfig, SampleModelConfig, VideoSampler
    from fastpost.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe", "cogvideox")
    cfg = SampleConfig(prompt="a red circle", height=64, width=64, num_frames=9, steps=2, guidance_scale=1.0, seed=3,
                       progress_bar=False, sampler="dmd",
                       sampler_args={"num_teacher_steps": 8, "generator_steps": 4, "renoise": "ddim"},
                       model=SampleModelConfig(family="cogvideox", flavor="debug", pretrained=str(pipe)))
    sampler = VideoSampler(cfg)
    got = sampler.generate(0)
    noise = sampler._bcfhw(sampler.initial_noise(sampler._sampler_ctx(sampler.items[0].seed).generator))
    family = get_family("cogvideox")
    grid = make_grid(family, None, 8, scheduler_config=sampler.scheduler_config)
    embeds, mask = (x[:1] for x in sampler.cond)
    want = dmd_sample(family, sampler.model, grid, phase_edges(8, 4)[::2], noise, embeds, mask, mode="ddim")
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    fresh = VideoSampler(SampleConfig(**{**cfg.__dict__, "sampler_args": {**cfg.sampler_args, "renoise": "fresh"}}))
    a, b = fresh.generate(0), fresh.generate(0)  # the per-video generator is re-seeded for each generation
    assert torch.equal(a, b) and (a - got).abs().max() > 1e-3 and torch.isfinite(a).all()
    from fastpost.sampling.samplers import build_sampler

    with pytest.raises(ValueError, match="runs a divisor of 4 steps, got steps=3"):
        build_sampler("dmd", cfg.sampler_args, sampler._sampler_ctx(0)).set_timesteps(3, "cpu")


def test_transformers_backbone_discriminator_trains_its_adapter_and_head_only():
    """A tiny random DINOv2 (no download) as the MCM discriminator: frozen backbone, gradients reach the
    latent->RGB adapter and the head, and a step of its own optimizer moves the logits."""
    from fastpost.recipes.mcm import BackboneDiscriminator

    torch.manual_seed(0)
    disc = BackboneDiscriminator(4, None, {"model_type": "dinov2", "hidden_size": 16, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "intermediate_size": 32, "image_size": 16,
                                           "patch_size": 8})
    frames = torch.randn(6, 4, 10, 10)
    disc(frames).mean().backward()
    grads = {n: p.grad is not None for n, p in disc.named_parameters()}
    assert all(v for n, v in grads.items() if not n.startswith("backbone.")) and \
        not any(v for n, v in grads.items() if n.startswith("backbone.")), grads
    opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-2)
    before = disc(frames).detach()
    opt.step()
    assert (disc(frames).detach() - before).abs().max() > 0
    with pytest.raises(ValueError, match="needs a model_type"):
        BackboneDiscriminator(4, None, {"hidden_size": 16})


def _grad_routing(rank, world, cfg, out):
    """Per phase, which adapter of the shared base receives gradient (summed over the FSDP shards)."""
    import torch.distributed as dist

    from fastpost.trainer import batch_generator

    trainer = Trainer(from_dict(TrainConfig, cfg))
    recipe, batch = trainer.recipe, next(trainer.loader.forever())
    assert recipe.shared and recipe.critic is recipe.generator
    owned = {name: set(t.parameters()) for name, t in trainer.trainables.items()}
    assert owned["generator"] and owned["critic"] and not owned["generator"] & owned["critic"]
    result = {}
    for phase in ("critic", "generator"):
        recipe.generator.zero_grad(set_to_none=True)
        loss, _ = recipe.loss(batch, batch_generator(0, trainer.dims.dp_rank), phase)
        loss.backward()
        sums = torch.zeros(3, dtype=torch.float64)
        for n, p in recipe.generator.named_parameters():
            g = p.grad.to_local() if p.grad is not None and hasattr(p.grad, "to_local") else p.grad
            k = 0 if n in owned["generator"] else 1 if n in owned["critic"] else 2
            sums[k] += 0.0 if g is None else g.abs().sum().item()
        dist.all_reduce(sums)
        result[phase] = sums.tolist()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def test_shared_base_adapters_get_only_their_own_gradients_under_fsdp(data, tmp_path):
    """Generator and critic as two LoRA adapters of one FSDP2-sharded base: the critic's denoising loss reaches
    only the critic adapter, the DMD loss only the generator's, the frozen base nothing."""
    args = {**RECIPES["dmd2"], "gan_weight": 0.0, "gan_critic_weight": 0.0}
    run_distributed(_grad_routing, 2, job(tmp_path / "g", data, "dmd2", 1, recipe_args=args), str(tmp_path / "g.json"))
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["critic"][0] == 0 and res["critic"][1] > 0 and res["critic"][2] == 0, res
    assert res["generator"][0] > 0 and res["generator"][1] == 0 and res["generator"][2] == 0, res


def _regression(rank, world, cfg, out):
    """Train with the regression loss only; the few-step samples' distance to the teacher's N-step ODE output
    from the same (unseen) noise, before (the generator is the teacher) and after."""
    from fastpost.noise import make_grid, phase_edges
    from fastpost.recipes.distill import phased_sample
    from fastpost.recipes.dmd2 import dmd_sample

    trainer = Trainer(from_dict(TrainConfig, cfg))
    family, grid, edges = trainer.family, make_grid(trainer.family, "debug", 8), phase_edges(8, 2)
    batch = next(iter(trainer.loader))
    embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
    noise = torch.randn(len(embeds), *LATENT, generator=torch.Generator().manual_seed(200))
    with trainer.recipe._as_teacher() as teacher:
        target = phased_sample(family, teacher, grid, torch.arange(9), noise, embeds, mask)

    def dist():
        x = dmd_sample(family, trainer.recipe.generator, grid, edges, noise, embeds, mask, mode="ddim")
        return ((x - target) ** 2).mean().item()

    before = dist()
    trainer.fit()
    Path(out).write_text(json.dumps({"before": before, "after": dist()}))


def test_regression_loss_moves_the_generator_to_the_teachers_paired_outputs(data, tmp_path):
    """DMD (v1)'s regression term alone (dmd_weight 0): its loss falls, and the generator's few-step samples move
    toward the teacher's N-step ODE outputs from the same noise (noise not seen in training)."""
    args = {"num_teacher_steps": 8, "generator_steps": 2, "critic_updates": 0, "critic": "full", "renoise": "ddim",
            "dmd_weight": 0.0, "regression_weight": 1.0}
    cfg = job(tmp_path / "r", data, "dmd2", 12, checkpoint={"every_steps": 0}, optim={"lr": 1e-3},
              lora={"enabled": False}, recipe_args=args)
    cfg["data"]["batch_size"] = 2
    run_distributed(_regression, 1, cfg, str(tmp_path / "r.json"))
    res = json.loads((tmp_path / "r.json").read_text())
    reg = [m["regression_generator"] for _, m in sorted(metrics(tmp_path / "r").items())]
    assert sum(reg[-3:]) < 0.7 * sum(reg[:3]), reg
    assert res["after"] < 0.7 * res["before"], res
