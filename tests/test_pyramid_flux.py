"""pyramid_flux against unmodified diffusers (fp32, CPU): the released folder layout loads through the family and a
single-frame clip equals FluxTransformer2DModel.forward; a multi-clip temporal-pyramid batch (history at stage 0,
the previous unit at stage 1, the current unit, padded text, batch padding) equals a test-only reference of
upstream's position and mask rules run through the same diffusers blocks with diffusers' own attention processor
and an explicit SDPA mask; Ulysses SP at world 2 (3 heads) equals world 1 in output and every gradient, and
so does pyramidal sampling with CFG (t2v, i2v; SP, and CFG parallel); the schedule's numbers equal upstream's scheduler."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastpost.builder import ModelSpec, build_model
from fastpost.distributed import ParallelDims
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.models import get_family
from fastpost.models.pyramid.packing import Segment, pack, pad_batch, unpack_segment
from fastpost.models.pyramid.sampling import PyramidSampleConfig, model_velocity, sample
from fastpost.models.pyramid_flux import MinifluxSchedule, forward_packed
from tests._harness import run_distributed
from tests._parity import make_model

FAMILY = get_family("pyramid_flux")
SCHED = MinifluxSchedule()
UPSTREAM_KEYS = {"interp_condition_pos": True, "use_flash_attn": False, "use_gradient_checkpointing": False,
                 "use_temporal_causal": True}


def _tokens_p1p2c(x_BCFHW):  # upstream: 'b c t h w -> b t h w c' then 'b t (h p1) (w p2) c -> b (t h w) (p1 p2 c)'
    b, c, f, h, w = x_BCFHW.shape
    x = x_BCFHW.permute(0, 2, 3, 4, 1).reshape(b, f, h // 2, 2, w // 2, 2, c)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, f * (h // 2) * (w // 2), 4 * c)


def _text(b=2, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False  # padded text in sample 1
    return {"prompt_embeds": torch.randn(b, t, 16, generator=g), "prompt_attention_mask": mask,
            "pooled_prompt_embeds": torch.randn(b, 8, generator=g)}


def _plain():
    return FAMILY.apply_sequence_parallel, ParallelDims(world_size=1)


def test_released_layout_loads_and_single_frame_equals_diffusers(tmp_path):
    ref = make_model(FAMILY, "debug").eval()
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(UPSTREAM_KEYS, _class_name="PyramidFluxTransformer")  # as the released folders have it
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = build_model(FAMILY, ModelSpec(pretrained=str(tmp_path), trainable=False), ParallelDims(world_size=1),
                           shard=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 1, 6, 10, generator=g)  # one frame, 3 x 5 tokens
    text = _text()
    text["prompt_attention_mask"][:] = True  # diffusers' forward has no mask
    t = torch.tensor([744.0, 386.5])
    packed = pack([Segment(x, 0, 1)], 2, SCHED)
    with torch.no_grad():
        ours = forward_packed(model, packed, t, text)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(5.0), indexing="ij"),
                              -1).reshape(-1, 3)
        theirs = ref(hidden_states=_tokens_p1p2c(x), encoder_hidden_states=text["prompt_embeds"],
                     pooled_projections=text["pooled_prompt_embeds"], timestep=t / 1000, img_ids=img_ids,
                     txt_ids=torch.zeros(6, 3)).sample
    assert torch.equal(packed.tokens, _tokens_p1p2c(x))
    assert (ours - theirs).abs().max().item() < 2e-5, (ours - theirs).abs().max()


# ---- the multi-clip causal case --------------------------------------------------------------------------------------
def _clips(seed=2):
    """Per sample, upstream's stage input list (oldest first): sample 0 = [2 history frames at stage 0, the
    previous unit at stage 1, the current unit at stage 1]; sample 1 = [a first-frame unit alone]."""
    g = torch.Generator().manual_seed(seed)
    s0 = [torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 1, 8, 8, generator=g),
          torch.randn(1, 4, 1, 8, 8, generator=g)]
    s1 = [torch.randn(1, 4, 1, 14, 14, generator=g)]  # 49 tokens: the padded length is odd
    segments0 = [Segment(s0[0], 0, 2), Segment(s0[1], 2, 1), Segment(s0[2], 3, 1)]
    segments1 = [Segment(s1[0], 0, 2)]
    return [s0, s1], [segments0, segments1]


def _upstream_ids(clips):
    """_prepare_pyramid_image_ids: frames counted clip by clip; rows/columns of coarser clips are
    F.interpolate(arange(train), size, mode='linear') of the current (last) clip's token grid."""
    th, tw = clips[-1].shape[-2] // 2, clips[-1].shape[-1] // 2
    ids, start = [], 0
    for c in clips:
        f, h, w = c.shape[2], c.shape[3] // 2, c.shape[4] // 2
        hp = torch.arange(th).float() if h == th else F.interpolate(torch.arange(th)[None, None].float(), h,
                                                                    mode="linear").squeeze(0, 1)
        wp = torch.arange(tw).float() if w == tw else F.interpolate(torch.arange(tw)[None, None].float(), w,
                                                                    mode="linear").squeeze(0, 1)
        grid = torch.zeros(f, h, w, 3)
        grid[..., 0] += torch.arange(start, start + f)[:, None, None]
        grid[..., 1] += hp[None, :, None]
        grid[..., 2] += wp[None, None, :]
        ids.append(grid.reshape(-1, 3))
        start += f
    return torch.cat(ids)


def _reference(model, clips, text, t, i):
    """One sample through the diffusers modules and blocks, default processors, an explicit SDPA mask."""
    tm = text["prompt_attention_mask"][i:i + 1]
    n_text = tm.shape[1]
    img_ids = _upstream_ids(clips)
    ids = torch.cat([torch.zeros(n_text, 3), img_ids])
    token_ids = torch.cat([tm.long(), torch.ones(1, img_ids.shape[0], dtype=torch.long)], dim=1)  # valid: 1
    order = ids[:, 0][None]
    mask = (token_ids[:, :, None] == token_ids[:, None, :]) & (order[:, :, None] >= order[:, None, :])
    x = model.x_embedder(torch.cat([_tokens_p1p2c(c) for c in clips], dim=1))
    temb = model.time_text_embed(t[i:i + 1], text["pooled_prompt_embeds"][i:i + 1])
    txt = model.context_embedder(text["prompt_embeds"][i:i + 1])
    rope = model.pos_embed(ids)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        txt, x = block(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope,
                       joint_attention_kwargs={"attention_mask": mask[:, None]})
    out = model.proj_out(model.norm_out(x, temb))
    return out[:, -_tokens_p1p2c(clips[-1]).shape[1]:]


def _ours(model, segments, text, t):
    packed = pad_batch([pack(s, 2, SCHED) for s in segments])
    out = forward_packed(model, packed, t, text)
    return [_tokens_p1p2c(o) for o in unpack_segment(out, packed, -1, 2)], packed


def test_multi_clip_causal_mask_and_positions_equal_reference():
    ref = make_model(FAMILY, "debug").eval()
    model = copy.deepcopy(ref)
    FAMILY.apply_sequence_parallel(model, ParallelDims(world_size=1))
    clips, segments = _clips()
    text, t = _text(), torch.tensor([612.0, 1000.0])
    with torch.no_grad():
        ours, packed = _ours(model, segments, text, t)
        assert packed.token_mask is not None  # sample 1 is padded
        for i in range(2):
            theirs = _reference(ref, clips[i], text, t, i)
            assert (ours[i] - theirs).abs().max().item() < 2e-5, (i, (ours[i] - theirs).abs().max())
        pos = packed.positions[0]  # history 2 x (2x2), previous 4x4, current 4x4 tokens: frames 0, 1 | 2 | 3
        assert pos[:40, 0].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 16 + [3.0] * 16
        assert pos[:4, 1].tolist() == [0.5, 0.5, 2.5, 2.5]  # coarse rows on the current 4-row grid


# ---- SP parity ---------------------------------------------------------------------------------------------------------
def _loss_and_grads(model, segments, text, t):
    outs, _ = _ours(model, segments, text, t)
    w = torch.Generator().manual_seed(9)
    loss = sum((o * torch.randn(o.shape, generator=w)).sum() for o in outs)
    loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    return loss.detach(), grads


def _sp_world2(rank, world):
    _, segments = _clips()
    text, t = _text(), torch.tensor([612.0, 1000.0])
    init = make_model(FAMILY, "debug")
    ref = copy.deepcopy(init)
    FAMILY.apply_sequence_parallel(ref, ParallelDims(world_size=1))
    ref_loss, ref_grads = _loss_and_grads(ref, segments, text, t)
    dims = ParallelDims(ulysses=2, world_size=world)
    dims.build_mesh("cpu")
    model = FAMILY.parallelize(copy.deepcopy(init), dims, ACConfig(mode="full"), FSDPConfig())
    loss, grads = _loss_and_grads(model, segments, text, t)
    assert abs(loss.item() - ref_loss.item()) < 1e-4 * max(1.0, abs(ref_loss.item())), (loss, ref_loss)
    err = max((grads[n] - ref_grads[n]).abs().max().item() / max(1.0, ref_grads[n].abs().max().item())
              for n in ref_grads)
    assert err < 1e-5, err
    # sampling with CFG (negative = another prompt, as the release's negative prompt), t2v and i2v
    sp_model = copy.deepcopy(init).eval()
    FAMILY.apply_sequence_parallel(sp_model, dims)
    cfg_dims = ParallelDims(dp_shard=2, world_size=world)  # CFG parallel: rank 0 uncond, rank 1 cond
    cfg_dims.build_mesh("cpu")
    cfg_model = copy.deepcopy(init).eval()
    FAMILY.apply_sequence_parallel(cfg_model, cfg_dims)
    cfg = dict(cfg_group=cfg_dims.submesh("dp_shard").get_group(), cfg_rank=rank)
    for first in (None, torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(6))):
        a, b, c = _sample(ref.eval(), first), _sample(sp_model, first), _sample(cfg_model, first, **cfg)
        rel = ((a - b).abs().max() / a.abs().max()).item()  # projections of [text; video chunk] round differently
        assert rel < 1e-5 and ((a - c).abs().max() / a.abs().max()).item() < 1e-5, (first is None, rel)


def _sample(model, first, **cfg_parallel):
    text = _text(b=2)
    cfg = PyramidSampleConfig(steps_per_stage=(1, 2, 1), first_frame_steps=(2, 1, 1), guidance_scale=3.0,
                              video_guidance_scale=2.0)
    fn = model_velocity(model, text["prompt_embeds"][1:], text["prompt_attention_mask"][1:],
                        text["prompt_embeds"][:1], text["prompt_attention_mask"][:1], spec=FAMILY.pyramid,
                        schedule=SCHED, pooled_BD=text["pooled_prompt_embeds"][1:],
                        negative_pooled_BD=text["pooled_prompt_embeds"][:1], **cfg_parallel)
    return sample(fn, (1, 4, 3, 8, 8), cfg, torch.Generator().manual_seed(4), first, schedule=SCHED)


def test_sequence_parallel_world2_equals_world1():
    _, segments = _clips()
    lengths = [pack(s, 2, SCHED).tokens.shape[1] for s in segments]
    assert max(lengths) % 2 == 1 and FAMILY.config("debug")["num_attention_heads"] % 2 == 1  # nothing divides
    run_distributed(_sp_world2, 2)


# ---- the schedule ----------------------------------------------------------------------------------------------------
def _upstream_scheduler_numbers(stage, steps):
    """PyramidFlowMatchEulerDiscreteScheduler (shift 1, stage_range thirds, gamma 1/3), re-derived by hand."""
    n = 1000
    sig = (np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / np.float32(n)).astype(np.float32)
    timesteps = sig * np.float32(n)
    starts, ends, ori = [], [], []
    for k, (a, b) in enumerate([(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)]):
        s, e = float(sig[int(a * n)]), (float(sig[int(b * n)]) if int(b * n) < n else 0.0)
        if k:
            o = 1 - s
            s = 1 - (1 / (2 * (1 - o) + o)) * o  # sqrt(1 + 1/gamma) = 2
        starts.append(s)
        ends.append(e)
    dist = [s - e for s, e in zip(starts, ends)]
    r0 = sum(dist[:stage]) / sum(dist)
    r1 = 1.0 if stage == 2 else sum(dist[:stage + 1]) / sum(dist)
    t_max, t_min = float(timesteps[int(r0 * n)]), float(timesteps[min(int(r1 * n), n - 1)])
    per_stage = np.linspace(t_max, t_min, n + 1)[:-1]
    ratios = np.linspace(1, 0, n + 1)[:-1]
    grid_t = np.linspace(per_stage[0], per_stage[-1], steps)
    grid_s = np.concatenate([np.linspace(ratios[0], ratios[-1], steps), [0.0]])
    return starts, ends, (t_max, t_min), grid_t, grid_s, per_stage, ratios


def test_schedule_numbers_equal_upstream():
    for k in range(3):
        starts, ends, window, grid_t, grid_s, per_stage, ratios = _upstream_scheduler_numbers(k, 4)
        assert SCHED.window(k) == pytest.approx((starts[k], ends[k]), abs=1e-12)
        assert SCHED.timestep_window(k) == pytest.approx(window, abs=1e-9)
        lams = SCHED.lam_grid(k, 4)
        assert lams == pytest.approx(grid_s.tolist(), abs=1e-12)
        assert [SCHED.model_timestep(k, lam) for lam in lams[:-1]] == pytest.approx(grid_t.tolist(), abs=1e-9)
        idx = torch.tensor([0, 1, 500, 999])  # training draws: u -> index floor(1000 u)
        lam = SCHED.lam_from_uniform((idx.double() + 0.5) / 1000)
        assert lam.tolist() == pytest.approx(ratios[idx.numpy()].tolist(), abs=1e-12)
        assert SCHED.model_timestep(k, lam).tolist() == pytest.approx(per_stage[idx.numpy()].tolist(), abs=1e-9)
    assert [round(SCHED.window(k)[0], 5) for k in range(3)] == [1.0, 0.80024, 0.50075]
    assert [tuple(round(v) for v in SCHED.timestep_window(k)) for k in range(3)] == [(1000, 744), (744, 386), (386, 1)]
    assert SCHED.default_stage_weights == (1.0, 2.0, 1.0) and SCHED.target_scale(1) == 1.0
    # one Euler step of stage 1 (3 steps): upstream x + (sigma_{i+1} - sigma_i) v on its ratio grid
    _, _, _, _, grid_s, _, _ = _upstream_scheduler_numbers(1, 3)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 1, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    lams = SCHED.lam_grid(1, 3)
    ours = x + SCHED.euler_step(1, lams[1], lams[2]) * v
    assert torch.allclose(ours, x + (grid_s[2] - grid_s[1]) * v, atol=1e-14, rtol=0)
