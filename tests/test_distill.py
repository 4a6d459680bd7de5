"""Phased consistency distillation: grid/ODE math, the recipe under dp2 x sp2 == world 1, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from fastpost.config import from_dict
from fastpost.models import get_family
from fastpost.recipes.distill import (
    even_edges, linear_quadratic_sigmas, make_grid, phase_edges, phased_sample, pseudo_huber,
)
from tests._harness import run_distributed, write_random_shards
from fastpost.trainer import TrainConfig, Trainer

LATENT = (4, 3, 10, 10)


class Oracle:
    """The exact prediction for data that is a single point x0*: any correct ODE step lands on x0*."""

    def __init__(self, grid, x0):
        self.grid, self.x0 = grid, x0
        self.prediction_type = grid.prediction_type

    def predict(self, model, x, t, embeds, mask):
        x = x.double()
        i = torch.stack([(self.grid.model_t.double() - ti.double()).abs().argmin() for ti in t])
        a, b = self.grid.coeffs(i, x)
        eps = (x - a * self.x0) / b
        v = eps - self.x0 if self.prediction_type == "flow_matching" else a * eps - b * self.x0
        return v.float()


@pytest.mark.parametrize("family_name,schedule", [("mochi", "uniform"), ("mochi", "linear_quadratic"),
                                                   ("cogvideox", "uniform")])
def test_ddim_on_the_grid_is_exact_for_a_point_mass(family_name, schedule):
    family = get_family(family_name)
    grid = make_grid(family, "debug", 50, schedule)
    assert grid.steps == 50 and float(grid.a[-1]) == 1.0 and float(grid.b[-1]) == 0.0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *LATENT, generator=g, dtype=torch.float64)
    oracle = Oracle(grid, x0)
    noise = torch.randn(2, *LATENT, generator=g)
    for steps in (1, 2, 4, 50):
        out = phased_sample(oracle, None, grid, even_edges(50, steps), noise, None, None)
        assert (out.double() - x0).abs().max() < 1e-4, (family_name, steps)
    # boundary condition f(x, edge) = x: a DDIM step from a point to itself is the identity
    x = torch.randn(2, *LATENT, generator=g, dtype=torch.float64)
    idx = torch.tensor([7, 30])
    assert torch.allclose(grid.ddim(x, torch.randn_like(x), idx, idx), x, atol=1e-10)


def test_linear_quadratic_schedule_matches_mochi_pipeline():
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    assert linear_quadratic_sigmas(64, 0.025) == pytest.approx(linear_quadratic_schedule(64, 0.025), abs=1e-12)


def test_phases_and_pseudo_huber():
    assert phase_edges(50, 4).tolist() == [0, 12, 25, 38, 50] and phase_edges(8, 1).tolist() == [0, 8]
    with pytest.raises(ValueError, match="phases must be in"):
        phase_edges(4, 5)
    x, y = torch.zeros(2, 8), torch.full((2, 8), 0.5)
    assert pseudo_huber(x, y, 1e-3).item() == pytest.approx((0.25 + 1e-6) ** 0.5 - 1e-3)
    assert pseudo_huber(x, x, 1e-3).item() == 0.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_shards")
    write_random_shards(root, 8, LATENT, 8, 16)
    return root


def job(out, shards, steps, **extra) -> dict:
    cfg = {
        "output_dir": str(out), "steps": steps, "seed": 5, "recipe": "distill",
        "recipe_args": {"num_teacher_steps": 8, "phases": 2, "skip_steps": 2, "guidance_min": 1.0,
                        "guidance_max": 3.0, "target": "ema", "ema_decay": 0.9},
        "model": {"family": "cogvideox", "flavor": "debug"},
        "optim": {"lr": 1e-3},
        "data": {"path": str(shards), "batch_size": 1},
        "checkpoint": {"every_steps": 0}, "logging": {"progress_bar": False},
    }
    cfg.update(extra)
    return cfg


def losses(out) -> dict[int, float]:
    recs = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _fit(rank, world, cfg):
    Trainer(from_dict(TrainConfig, cfg)).fit()


def test_distill_dp2_sp2_matches_world1_and_resume_is_exact(shards, tmp_path):
    run_distributed(_fit, 1, job(tmp_path / "w1", shards, 4, grad_accum=2))
    run_distributed(_fit, 4, job(tmp_path / "w4", shards, 4, parallel={"ulysses": 2}))
    w1, w4 = losses(tmp_path / "w1"), losses(tmp_path / "w4")
    assert sorted(w1) == sorted(w4) == [1, 2, 3, 4]
    for s in w1:
        assert abs(w1[s] - w4[s]) <= 1e-5 * max(1.0, abs(w1[s])), (s, w1[s], w4[s])
    # resume: 2 steps, then a fresh process resumes from the step-2 checkpoint to step 4 (EMA target restored)
    ckpt = {"every_steps": 2, "resume": "latest"}
    run_distributed(_fit, 1, job(tmp_path / "r", shards, 2, grad_accum=2, checkpoint=ckpt))
    run_distributed(_fit, 1, job(tmp_path / "r", shards, 4, grad_accum=2, checkpoint=ckpt))
    r = losses(tmp_path / "r")
    assert [r[s] for s in (1, 2, 3, 4)] == [w1[s] for s in (1, 2, 3, 4)]


def test_phased_sampler_plugs_into_fastpost_sample(tmp_path):
    """`fastpost sample` with `sampler: phased` runs the student's few-step sampler: same latents as phased_sample."""
    from fastpost.tiny import build_tiny_pipeline
    from fastpost.sampling import SampleConfig, SampleModelConfig, VideoSampler

    pipe = build_tiny_pipeline(tmp_path / "pipe", "cogvideox")
    cfg = SampleConfig(prompt="a red circle", height=64, width=64, num_frames=9, steps=2, guidance_scale=1.0, seed=3,
                       progress_bar=False, imports=["fastpost.recipes.distill"], sampler="phased",
                       sampler_args={"num_teacher_steps": 8, "phases": 4},
                       model=SampleModelConfig(family="cogvideox", flavor="debug", pretrained=str(pipe)))
    sampler = VideoSampler(cfg)
    got = sampler.generate(0)
    noise = sampler._bcfhw(sampler.initial_noise(sampler._sampler_ctx(sampler.items[0].seed).generator))
    family = get_family("cogvideox")
    grid = make_grid(family, None, 8, scheduler_config=sampler.scheduler_config)
    embeds, mask = (x[:1] for x in sampler.cond)
    want = phased_sample(family, sampler.model, grid, phase_edges(8, 4)[::2], noise, embeds, mask)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="runs a divisor of 4 steps, got steps=3"):
        VideoSampler(SampleConfig(**{**cfg.__dict__, "steps": 3})).generate(0)


def test_lora_distill_shares_the_base_and_dp2_sp2_matches_world1(shards, tmp_path):
    """LoRA: the teacher is the student with adapters off and the EMA target the student with EMA adapters
    swapped in (no model copies); under FSDP the swap and the switch must be seen by the gathered weights."""
    lora = {"enabled": True, "rank": 4, "alpha": 4}
    run_distributed(_fit, 1, job(tmp_path / "w1", shards, 3, grad_accum=2, lora=lora))
    run_distributed(_fit, 4, job(tmp_path / "w4", shards, 3, parallel={"ulysses": 2}, lora=lora))
    w1, w4 = losses(tmp_path / "w1"), losses(tmp_path / "w4")
    assert sorted(w1) == sorted(w4) == [1, 2, 3]
    for s in w1:
        assert abs(w1[s] - w4[s]) <= 1e-5 * max(1.0, abs(w1[s])), (s, w1[s], w4[s])
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "w4" / "lora" / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0, "the LoRA did not train"
