"""NoiseSchedule (fastpost.noise) against the formulas the finetune recipe and the distillation grid use: the same
generator draws in the same order (so losses stay bit-identical), x_t / target / estimates, and the ODE grid."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastpost.models import get_family
from fastpost.noise import FlowMatchingSchedule, TimeSampling, VPSchedule, linear_quadratic_sigmas, make_grid
from fastpost.recipes import RecipeContext
from fastpost.recipes.finetune import Finetune, FinetuneConfig

SHAPE = (3, 4, 2, 6, 6)


@pytest.mark.parametrize("cfg", [FinetuneConfig(), FinetuneConfig(timestep_sampling="uniform", flow_shift=3.0),
                                 FinetuneConfig(logit_mean=0.5, logit_std=1.5, flow_shift=2.0)])
def test_flow_times_are_finetunes_draws(cfg):
    g = torch.Generator().manual_seed(3)  # the SD3 draw finetune always made: shifted logit-normal or uniform
    s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(7, generator=g)) \
        if cfg.timestep_sampling == "logit_normal" else torch.rand(7, generator=g)
    a = cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s)
    b = FlowMatchingSchedule().sample_times(7, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(a, b)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TimeSampling)}
    assert torch.equal(b, FlowMatchingSchedule().sample_times(7, torch.Generator().manual_seed(3),
                                                              TimeSampling(**fields)))


def test_vp_times_are_uniform_ddpm_indices():
    ns = get_family("cogvideox").noise_schedule()
    t = ns.sample_times(1000, torch.Generator().manual_seed(0))
    assert torch.equal(t, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(0)))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) == 999


def test_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    s = torch.rand(SHAPE[0], generator=g, dtype=torch.float64)
    flow = FlowMatchingSchedule()
    sb = s.view(-1, 1, 1, 1, 1)
    assert torch.equal(flow.add_noise(x0, eps, s), (1 - sb) * x0 + sb * eps)
    assert torch.equal(flow.target(x0, eps, s), eps - x0)
    assert torch.equal(flow.model_timestep(s), s * 1000)

    family = get_family("cogvideox")
    abar = family.make_scheduler().alphas_cumprod.float()
    vp = family.noise_schedule(family.scheduler_config())
    assert isinstance(vp, VPSchedule) and torch.equal(vp.alphas_cumprod, abar)
    t = torch.tensor([0, 500, 999])
    ab = abar[t].view(-1, 1, 1, 1, 1)
    x0f, epsf = x0.float(), eps.float()
    assert torch.equal(vp.add_noise(x0f, epsf, t), ab.sqrt() * x0f + (1 - ab).sqrt() * epsf)
    assert torch.equal(vp.target(x0f, epsf, t), ab.sqrt() * epsf - (1 - ab).sqrt() * x0f)
    assert torch.equal(vp.model_timestep(t), t)
    # a:b differ per flavor: 2b shifts the SNR by 3
    vp5 = family.noise_schedule(family.scheduler_config(flavor="5b"))
    assert not torch.equal(vp5.alphas_cumprod, vp.alphas_cumprod)

    # estimates invert add_noise when the prediction is the target (fp64 for flow; VP in fp32)
    for ns, tt, a, b in ((flow, s, x0, eps), (vp, t, x0f, epsf)):
        x_t = ns.add_noise(a, b, tt)
        x0_hat, eps_hat = ns.estimates(x_t, ns.target(a, b, tt), tt)
        tol = 1e-12 if a.dtype == torch.float64 else 2e-5
        assert (x0_hat - a).abs().max() <= tol and (eps_hat - b).abs().max() <= tol


def _loss_as_written_before(family, batch, g, cfg):
    """Finetune's loss as the recipe computed it before NoiseSchedule existed (branching on prediction type)."""
    x0 = batch["latents"].float()
    eps = torch.randn(x0.shape, generator=g)
    if family.prediction_type == "flow_matching":
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(x0.shape[0], generator=g))
        s = cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s)
        sb = s.view(-1, 1, 1, 1, 1)
        pred = family.predict(None, (1 - sb) * x0 + sb * eps, s * 1000, batch["prompt_embeds"], None)
        return F.mse_loss(pred.float(), eps - x0)
    abar_all = family.make_scheduler("debug").alphas_cumprod.float()
    t = torch.randint(0, len(abar_all), (x0.shape[0],), generator=g)
    a = abar_all[t].view(-1, 1, 1, 1, 1)
    pred = family.predict(None, a.sqrt() * x0 + (1 - a).sqrt() * eps, t, batch["prompt_embeds"], None)
    return F.mse_loss(pred.float(), a.sqrt() * eps - (1 - a).sqrt() * x0)


@pytest.mark.parametrize("name", ["mochi", "cogvideox"])
def test_finetune_loss_is_bit_identical(name):
    family = dataclasses.replace(get_family(name), predict_fn=lambda model, x, t, e, m: 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1, 1))
    train_cfg = type("T", (), {"model": type("M", (), {"flavor": "debug"})(),
                               "data": type("D", (), {"path": None})()})()
    cfg = FinetuneConfig(flow_shift=2.0)
    recipe = Finetune(cfg, RecipeContext.for_model(family, None, train_cfg=train_cfg))
    batch = {"latents": torch.randn(SHAPE), "prompt_embeds": torch.randn(3, 4, 8), "prompt_attention_mask": None}
    ours, _ = recipe.loss(batch, torch.Generator().manual_seed(5))
    ref = _loss_as_written_before(family, batch, torch.Generator().manual_seed(5), cfg)
    assert torch.equal(ref, ours)


def test_grid_and_schedule_agree():
    for name, schedule in (("mochi", "uniform"), ("mochi", "linear_quadratic"), ("cogvideox", "uniform")):
        family = get_family(name)
        ns = family.noise_schedule(family.scheduler_config(flavor="debug"))
        grid = make_grid(family, "debug", 10, schedule)
        assert torch.equal(make_grid(ns, None, 10, schedule).a, grid.a)
        assert grid.steps == 10 and float(grid.b[-1]) == 0.0 and float(grid.a[-1]) == 1.0
        if name == "mochi":
            sig = torch.linspace(1.0, 0.0, 11) if schedule == "uniform" else torch.tensor(
                linear_quadratic_sigmas(10, 0.025) + [0.0])
            assert torch.equal(grid.b, sig.double()) and torch.equal(grid.model_t, grid.b * 1000)
        else:
            abar = ns.alphas_cumprod.double()[grid.model_t[:-1]]
            assert torch.equal(grid.a[:-1], abar.sqrt()) and torch.equal(grid.b[:-1], (1 - abar).sqrt())
        # the grid's estimates are the schedule's at the same noise level
        x, pred = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
        idx = torch.tensor([2, 7])
        x0g, epsg = grid.estimates(x, pred, idx)
        a, b = grid.coeffs(idx, x)
        t = grid.b[idx] if name == "mochi" else grid.model_t[idx]
        a_ns, b_ns = ns.coefficients(t)
        assert torch.allclose(a.flatten(), a_ns.double(), atol=1e-7) and torch.allclose(b.flatten(), b_ns.double(),
                                                                                       atol=1e-7)
        x0n, epsn = (v.double() for v in ns.estimates(x, pred, t.double() if name == "mochi" else t))
        assert torch.allclose(x0g, x0n, atol=1e-6) and torch.allclose(epsg, epsn, atol=1e-6)


def test_bad_time_sampling_is_one_clear_error():
    with pytest.raises(ValueError, match="timestep_sampling must be"):
        FlowMatchingSchedule().sample_times(2, torch.Generator(), TimeSampling(timestep_sampling="beta"))
