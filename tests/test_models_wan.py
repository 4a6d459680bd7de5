"""Wan (2.1 T2V, the 2.1 I2V layout's image cross-attention, the 2.2 TI2V layout's per-token timesteps) under Ulysses
SP + FSDP2 equals unmodified diffusers, fp32: outputs and every parameter gradient.

Video tokens: 3 x 3 x 5 = 45 per sample (latents 3 x 6 x 10, patch (1, 2, 2)), divisible by neither sp=2 nor sp=4;
3 heads (debug, debug-i2v) and 5 heads (debug-ti2v) divide neither either, so the head padding path always runs.
One world-4 spawn: T2V at sp4, dp2 x sp2 and ulysses2 x ring2; the I2V layout at sp4, TI2V at dp2 x sp2 + AC.
"""

import dataclasses
import json

import pytest
import torch

from fastpost.distributed import ParallelDims
from fastpost.models import get_family
from tests._harness import run_distributed
from tests._parity import Batch, make_model, parallel_errors, reference

TOL = 1e-5
FAMILY = get_family("wan")
N_IMG = 5  # CLIP image tokens of the I2V layout (257 for the real CLIP ViT-H)
TEXT = {"debug": 8, "debug-ti2v": 8, "debug-i2v": 512}  # diffusers' I2V processor takes the last 512 as the text


def _predict_i2v(model, x, t, embeds, mask=None):
    """The I2V layout's call: image tokens ride in front of the text in embeds (image_dim == text_dim here), so the
    batch slices over dp like any other; noise + mask + image latents are 12 input channels."""
    return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds[:, N_IMG:],
                 encoder_hidden_states_image=embeds[:, :N_IMG], return_dict=False)[0]


def family_for(flavor: str):
    return dataclasses.replace(FAMILY, predict_fn=_predict_i2v) if flavor == "debug-i2v" else FAMILY


def make_batch(flavor: str, seed: int = 0, batch: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    in_ch = FAMILY.config(flavor)["in_channels"]
    latents = torch.randn(batch, in_ch, 3, 6, 10, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    if flavor == "debug-ti2v":  # per-token timesteps as Wan 2.2 TI2V's I2V mode: the first frame's tokens at t = 0
        t = t[:, None].expand(batch, 45).clone()
        t[:, :15] = 0
    n_text = TEXT[flavor] + (N_IMG if flavor == "debug-i2v" else 0)
    return Batch(latents, t, torch.randn(batch, n_text, 16, generator=g), None,
                 torch.randn(batch, 4, 3, 6, 10, generator=g))


def _check(results: dict, rank: int) -> None:
    if rank == 0:
        print(json.dumps({k: {m: f"{e:.1e}" for m, e in v.items()} for k, v in results.items()}, indent=1))
    bad = {k: v for k, v in results.items() if max(v.values()) > TOL}
    assert not bad, f"rank {rank}: errors above {TOL}: {bad}"


def _world4(rank, world):
    layouts = {"sp4": dict(ulysses=4), "dp2xsp2": dict(ulysses=2), "ulysses2xring2": dict(ulysses=2, ring=2)}
    dims = {name: ParallelDims(world_size=world, **kw) for name, kw in layouts.items()}
    for d in dims.values():
        d.build_mesh("cpu")
    results = {}
    # T2V on every layout; the I2V image branch (3 heads) at sp4, the TI2V per-token timesteps (5 heads) at sp2
    # with full activation checkpointing (the split hooks must also hold in recompute; the 14B job runs AC full)
    for flavor, names, ac in (("debug", tuple(dims), "none"), ("debug-i2v", ("sp4",), "none"),
                              ("debug-ti2v", ("dp2xsp2",), "full")):
        family, batch = family_for(flavor), make_batch(flavor)
        init, pred, grads = reference(family, flavor, batch)
        for name in names:
            results[f"{flavor} {name} fsdp ac={ac}"], _ = parallel_errors(family, init, pred, grads, dims[name],
                                                                          batch, ac=ac)
    _check(results, rank)


def test_wan_parallel_matches_diffusers():
    run_distributed(_world4, 4)


# ---- single process -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor,ac", [("debug", "selective"), ("debug-i2v", "full"), ("debug-ti2v", "full")])
def test_sp_processor_with_sp_off_equals_diffusers(flavor, ac):
    """parallelize() at world 1 (SP processors installed, no SP/FSDP) with fastpost AC (selective: what the
    T2V-1.3B job file uses): same output/grads."""
    family, batch = family_for(flavor), make_batch(flavor)
    init, pred, grads = reference(family, flavor, batch)
    errs, _ = parallel_errors(family, init, pred, grads, ParallelDims(world_size=1), batch, ac=ac)
    assert max(errs.values()) <= TOL, errs


def test_family_api_and_real_configs():
    model = FAMILY.load(flavor="debug")
    assert len(FAMILY.blocks(model)) == 2 and all(isinstance(b, FAMILY.block_class) for b in FAMILY.blocks(model))
    assert FAMILY.video_tokens(model, (2, 4, 3, 6, 10)) == 45 and FAMILY.pipeline_class == "WanPipeline"
    assert FAMILY.default_sampler() == "unipc" and FAMILY.text.max_length(model.config) == 512
    # published sizes (heads, layers, width, in-channels); tests/test_configs.py builds 1.3B and 14B at real size
    want = {"t2v-1.3b": (12, 30, 1536, 16), "t2v-14b": (40, 40, 5120, 16), "i2v-14b-480p": (40, 40, 5120, 36),
            "2.2-ti2v-5b": (24, 30, 3072, 48), "2.2-t2v-a14b": (40, 40, 5120, 16), "2.2-i2v-a14b": (40, 40, 5120, 36)}
    for flavor, sizes in want.items():
        c = FAMILY.config(flavor)
        assert (c["num_attention_heads"], c["num_layers"], c["num_attention_heads"] * c["attention_head_dim"],
                c["in_channels"]) == sizes, flavor
    assert FAMILY.training_fps(FAMILY.config("t2v-14b")) == 16
    assert FAMILY.training_fps(FAMILY.config("2.2-ti2v-5b")) == 24
    # the VAE factors come from its config: Wan 2.1 8x spatial, the 2.2 TI2V VAE (48 channels) 16x; 4x temporal
    vae22 = {"_class_name": "AutoencoderKLWan", "z_dim": 48, "scale_factor_spatial": 16, "scale_factor_temporal": 4}
    assert FAMILY.vae_factors(vae22) == (16, 4) and FAMILY.vae.latent_channels(vae22) == 48
    sched = FAMILY.make_scheduler("2.2-ti2v-5b")
    assert type(sched).__name__ == "UniPCMultistepScheduler" and sched.config.flow_shift == 5.0
    with pytest.raises(ValueError, match=r"multiples of the patch size"):
        FAMILY.predict(model, torch.randn(1, 4, 2, 5, 6), torch.ones(1), torch.randn(1, 8, 16))
