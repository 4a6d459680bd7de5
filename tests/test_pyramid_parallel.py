"""Pyramid under Ulysses SP (world 2) equals one process (fp32): predict() outputs and gradients (45 video tokens,
odd; block-causal and full attention; text masks), the pyramid_flow loss and gradients on a padded batch of
mixed-resolution temporal-pyramid sequences (odd length), and autoregressive pyramidal sampling with CFG and i2v."""

import copy
import json

import torch
import torch.distributed as dist

from fastpost.distributed import ParallelDims
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.models import get_family
from tests._parity import Batch, make_model, parallel_errors, reference
from fastpost.models.pyramid.sampling import PyramidSampleConfig, model_velocity, sample
from fastpost.recipes import RecipeContext, get_recipe
from tests._harness import run_distributed

TOL = 1e-5
FAMILY = get_family("pyramid")
RECIPE_SEED = 57  # draws stages (2, 0, 2, 1), units (0, 1, 3, 1), two empty prompts; padded length 171 (odd)


def predict_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 3, 6, 10, generator=g)  # 3 x 3 x 5 = 45 tokens: sp=2 pads
    mask = torch.tensor([[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return Batch(latents, torch.rand(2, generator=g) * 1000, torch.randn(2, 8, 16, generator=g), mask,
                 torch.randn(latents.shape, generator=g))


def recipe_batch() -> dict:
    g = torch.Generator().manual_seed(5)
    return {"latents": torch.randn(4, 4, 6, 8, 24, generator=g), "prompt_embeds": torch.randn(4, 8, 16, generator=g),
            "prompt_attention_mask": torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [1] * 8, [1] * 6 + [0] * 2])}


def recipe_loss_and_grads(model, dims=None):
    recipe_cls = get_recipe("pyramid_flow")
    recipe = recipe_cls(recipe_cls.Config(frame_per_unit=2, caption_dropout=0.25),
                        RecipeContext.for_model(FAMILY, model, dims))
    loss, metrics = recipe.loss(recipe_batch(), torch.Generator().manual_seed(RECIPE_SEED))
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g.detach().clone()
    return loss.detach(), metrics, grads


def sample_latents(model, first_frame=None):
    g = torch.Generator().manual_seed(3)
    embeds, mask = torch.randn(2, 8, 16, generator=g), torch.tensor([[1] * 8, [1] * 4 + [0] * 4], dtype=torch.bool)
    cfg = PyramidSampleConfig(steps_per_stage=(1, 2, 1), guidance_scale=3.0, video_guidance_scale=2.0,
                              frame_per_unit=2)
    fn = model_velocity(model, embeds, mask)
    return sample(fn, (2, 4, 4, 8, 24), cfg, torch.Generator().manual_seed(4), first_frame)


def _world2(rank, world):
    dims = ParallelDims(ulysses=2, world_size=world)
    dims.build_mesh("cpu")
    results = {}
    # 1. predict(): block-causal (debug) and full attention (debug-full), FSDP and SP-only, AC
    batch = predict_batch()
    for flavor in ("debug", "debug-full"):
        init, pred, grads = reference(FAMILY, flavor, batch)
        results[f"predict {flavor} sp2 fsdp"], plain = parallel_errors(FAMILY, init, pred, grads, dims, batch)
        results[f"predict {flavor} sp2 no-fsdp"], _ = parallel_errors(FAMILY, init, pred, grads, dims, batch,
                                                                      sp_only=True)
        errs, ac_grads = parallel_errors(FAMILY, init, pred, grads, dims, batch, ac="selective")
        errs["grad_vs_no_ac"] = max((ac_grads[n] - plain[n]).abs().max().item() for n in plain)
        results[f"predict {flavor} sp2 fsdp ac=selective"] = errs

    # 2. the pyramid_flow loss: per-sample stages/units, temporal-pyramid history, padding, caption dropout
    init = make_model(FAMILY, "debug")
    ref_loss, ref_metrics, ref_grads = recipe_loss_and_grads(copy.deepcopy(init))
    assert ref_metrics["seq_len"] % 2 == 1, ref_metrics  # the padded sequence does not divide over sp=2
    model = FAMILY.parallelize(copy.deepcopy(init), dims, ACConfig(mode="full"), FSDPConfig())
    loss, metrics, grads = recipe_loss_and_grads(model, dims)
    assert metrics == ref_metrics
    results["pyramid_flow loss sp2 fsdp+ac"] = {
        "loss": abs(loss.item() - ref_loss.item()),
        "grad": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)}
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-3

    # 3. sampling: the same loop on every rank, the model splits internally
    plain_model = make_model(FAMILY, "debug").eval()
    sp_model = copy.deepcopy(plain_model)
    FAMILY.apply_sequence_parallel(sp_model, dims)
    seen = {"plain": [], "sp": []}  # tokens reaching the last block: SP must really split every call
    for key, m in (("plain", plain_model), ("sp", sp_model)):
        m.transformer_blocks[-1].register_forward_pre_hook(
            lambda mod, args, kwargs, key=key: seen[key].append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    first = torch.randn(2, 4, 1, 8, 24, generator=torch.Generator().manual_seed(6))
    for name, ff in (("t2v", None), ("i2v", first)):
        ref = sample_latents(plain_model, ff)
        out = sample_latents(sp_model, ff)
        assert out.shape == (2, 4, 4, 8, 24)
        assert seen["sp"] == [-(-n // 2) for n in seen["plain"]] and max(seen["plain"]) > 1, seen
        results[f"sampling {name} sp2 (max |x| {ref.abs().max().item():.1f})"] = {
            "latents": (out - ref).abs().max().item()}
    other = torch.empty_like(out)
    dist.broadcast(other.copy_(out), src=0)
    assert torch.equal(other, out)  # every SP rank holds the same sample

    if rank == 0:
        print(json.dumps({k: {m: f"{e:.1e}" for m, e in v.items()} for k, v in results.items()}, indent=1))
    bad = {k: v for k, v in results.items() if max(v.values()) > TOL}
    assert not bad, f"rank {rank}: errors above {TOL}: {bad}"


def test_pyramid_sequence_parallel_matches_one_process():
    run_distributed(_world2, 2)
