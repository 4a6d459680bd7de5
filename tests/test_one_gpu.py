"""One consumer GPU (issue 22): frozen-weight storage, the optimizers by name, block / activation offload.

- storage: one step's LoRA gradients with the frozen base stored in bf16 / fp8 are within a stated tolerance of
  fp32 storage; FSDP2 over 2 ranks with float8 shards equals world 1; the LoRA export of a float8 run loads in
  diffusers and reproduces the trained model there.
- optimizers: each resumes bit-exactly from a checkpoint in a fresh trainer (what kill -9 leaves; the kill itself
  is tests/test_trainer.py's), and holds exactly the state the planner assumes (8-bit <= 0.3x fp32).
- offload: losses and gradients equal to no offloading (on CPU the copies are no-ops; the code path runs).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastpost.builder import ModelSpec, build_model
from fastpost.distributed import ParallelDims
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.offload import OffloadConfig
from fastpost.lora import LoRAConfig
from fastpost.models import get_family
from fastpost.optim import AdamW8bit, AdamWOffload, build_optimizer, measured_state_bytes, state_bytes
from fastpost.trainer import OptimConfig
from tests._harness import run_distributed, write_random_shards

FAMILY = get_family("cogvideox")
LORA = LoRAConfig(enabled=True, rank=4, alpha=8)
# relative L2 error of all LoRA gradients together vs fp32 storage, one step of the tiny CogVideoX (measured:
# bf16 0.0024, e4m3 0.030, e5m2 0.053 -- the stored weights themselves carry 2^-9 / 2^-4 / 2^-3 relative rounding)
TOLERANCE = {"bfloat16": 0.01, "float8_e4m3fn": 0.06, "float8_e5m2": 0.10}


def _batch():
    g = torch.Generator().manual_seed(0)
    cfg = FAMILY.config("debug")
    return (torch.randn(2, 4, 3, 10, 10, generator=g), torch.tensor([100, 700]),
            torch.randn(2, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g))


def _step(storage=None, offload=None, ac="none", dims=None, lora=LORA):
    """(loss, LoRA grads) of one forward+backward; lora_B is drawn non-zero so every adapter gets a gradient."""
    model, _ = build_model(FAMILY, ModelSpec(flavor="debug", lora=lora, storage_dtype=storage),
                           dims or ParallelDims(world_size=1), ac=ACConfig(mode=ac), offload=offload)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                value = torch.randn(p.shape, generator=g) * 0.1
                if hasattr(p, "device_mesh"):  # an FSDP shard: this rank's rows of the same full tensor
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, p.device_mesh, p.placements)
                p.copy_(value)
    x, t, e = _batch()
    loss = FAMILY.predict(model, x, t, e).float().square().mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model


def _rel(a: dict, b: dict) -> float:
    diff = torch.cat([(a[k].full_tensor() if hasattr(a[k], "full_tensor") else a[k]).flatten() - b[k].flatten()
                      for k in b])
    return (diff.norm() / torch.cat([v.flatten() for v in b.values()]).norm()).item()


def test_stored_base_gradients_within_tolerance_of_fp32():
    _, ref, _ = _step()
    for storage, tol in TOLERANCE.items():
        _, grads, model = _step(storage)
        err = _rel(grads, ref)
        assert 0 < err < tol, (storage, err)
        stored = {p.dtype for n, p in model.named_parameters() if "transformer_blocks" in n and "to_q" in n
                  and "lora" not in n and n.endswith("weight")}
        assert stored == {getattr(torch, storage)}
        # norms, embeddings and the output projection stay in the compute dtype; the adapters stay fp32
        assert model.norm_final.weight.dtype == model.proj_out.weight.dtype == torch.float32
        assert model.transformer_blocks[0].norm1.linear.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_full_finetune_with_storage_dtype_is_an_error():
    with pytest.raises(ValueError, match="enable lora or unset model.storage_dtype"):
        build_model(FAMILY, ModelSpec(flavor="debug", storage_dtype="float8_e4m3fn"), ParallelDims(world_size=1))


def test_block_and_activation_offload_equal_no_offload():
    for storage in (None, "float8_e4m3fn"):
        ref_loss, ref, _ = _step(storage, ac="full")
        for offload in (OffloadConfig(blocks=True), OffloadConfig(activations=True),
                        OffloadConfig(blocks=True, activations=True, prefetch=2)):
            loss, grads, model = _step(storage, offload, ac="full")
            assert loss == ref_loss, offload
            assert all(torch.equal(grads[k], ref[k]) for k in ref), offload
    with pytest.raises(ValueError, match="ac.mode: full"):
        _step(offload=OffloadConfig(activations=True), ac="selective")


LORA96 = LoRAConfig(enabled=True, rank=96, alpha=96)  # 96 x 48 adapters: large enough for 8-bit moments


def _step_and_update(dims=None):
    """fp8-stored base, one step's loss and LoRA grads, then one 8-bit AdamW update: the updated adapters."""
    loss, grads, model = _step("float8_e4m3fn", dims=dims, lora=LORA96)
    params = [p for p in model.parameters() if p.requires_grad]
    AdamW8bit(params, lr=1e-2, weight_decay=1e-2).step()
    full = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return loss, grads, full, model


def _fsdp_worker(rank, world, expected):
    dims = ParallelDims(world_size=world, ulysses=1)
    dims.build_mesh("cpu")
    loss, grads, params, model = _step_and_update(dims)
    from torch.distributed.tensor import DTensor

    shard = model.transformer_blocks[0].attn1.to_q.base_layer.weight
    assert isinstance(shard, DTensor) and shard.to_local().dtype == torch.float8_e4m3fn  # stored as fp8 shards
    assert abs(loss - expected[0]) < 1e-6
    assert _rel(grads, expected[1]) < 1e-5
    assert _rel(params, expected[2]) < 1e-6  # the 8-bit moments of sharded (DTensor) adapters, row-blocked


def test_fsdp_float8_shards_and_8bit_adamw_equal_world1():
    loss, grads, params, _ = _step_and_update()
    run_distributed(_fsdp_worker, 2, (loss, {k: v.detach() for k, v in grads.items()}, params))


# ---- optimizers ---------------------------------------------------------------------------------------------------
def test_state_bytes_match_the_planner_and_8bit_is_small():
    # one CogVideoX-2b block's LoRA (rank 128 on 1920-wide attention projections) plus a small bias-like tensor
    shapes = [(128, 1920), (1920, 128)] * 4 + [(64,)]
    for name in ("adamw", "adamw8bit", "prodigy", "adamw_offload"):
        params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]
        opt = build_optimizer(params, OptimConfig(name=name, lr=1.0 if name == "prodigy" else 1e-3))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert measured_state_bytes(opt) == state_bytes(name, shapes), name
    assert state_bytes("adamw8bit", shapes) <= 0.3 * state_bytes("adamw", shapes)


def test_8bit_adamw_tracks_adamw_and_offload_equals_adamw():
    """A noisy quadratic, 200 steps: the offloaded AdamW is torch's AdamW exactly; the 8-bit one lands within 25%
    of its loss (measured 1.16x: the quantised moments add noise at the noise floor)."""
    torch.manual_seed(0)
    target = torch.randn(64, 96)
    runs = {}
    for cls in (torch.optim.AdamW, AdamW8bit, AdamWOffload):
        p = torch.nn.Parameter(torch.zeros(64, 96))
        kw = {"foreach": False} if cls is torch.optim.AdamW else {}
        opt = cls([p], lr=1e-2, weight_decay=1e-2, **kw)
        for i in range(200):
            p.grad = 2 * (p.detach() - target) + torch.randn(64, 96, generator=torch.Generator().manual_seed(i))
            opt.step()
        runs[cls.__name__] = p.detach()
    assert torch.equal(runs["AdamWOffload"], runs["AdamW"])
    loss = {k: (v - target).square().mean().item() for k, v in runs.items()}
    start = target.square().mean().item()
    assert loss["AdamW"] < 0.2 * start and loss["AdamW8bit"] < 1.25 * loss["AdamW"], loss


@pytest.fixture
def world1():
    """One gloo process group in this process for in-process trainers (init_distributed reuses it)."""
    import torch.distributed as dist

    from fastpost.distributed.parallel_dims import free_port

    created = not dist.is_initialized()  # an earlier in-process trainer may have left its world-1 group
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _job(out, shards, optim: dict, **extra) -> dict:
    return {"output_dir": str(out), "steps": 4, "seed": 3, "model": {"family": "cogvideox", "flavor": "debug"},
            "lora": {"enabled": True, "rank": 96, "alpha": 96},  # 96 x 48 adapters: large enough for 8-bit moments
            "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "cosine", **optim},
            "data": {"path": str(shards), "batch_size": 1},
            "checkpoint": {"every_steps": 2, "keep_last": 3}, "logging": {"progress_bar": False}, **extra}


def test_every_optimizer_resumes_bit_exactly(tmp_path, world1):
    from fastpost.config import from_dict
    from fastpost.trainer import TrainConfig, Trainer

    root, shards = tmp_path, tmp_path / "shards"
    write_random_shards(shards, 8, (4, 3, 10, 10), 8, 16)
    for name in ("adamw", "adamw8bit", "prodigy", "adamw_offload"):
        optim = {"name": name, **({"lr": 1.0} if name == "prodigy" else {})}
        ref = Trainer(from_dict(TrainConfig, _job(root / name / "ref", shards, optim)))
        ref_losses = ref.fit()
        ckpt = root / name / "ref" / "checkpoints" / "step_00000002"
        resumed = Trainer(from_dict(TrainConfig, _job(root / name / "resumed", shards, optim,
                                                      checkpoint={"every_steps": 0, "resume": str(ckpt)})))
        assert resumed.step == 2
        losses = resumed.fit()
        ref.guard.close(), resumed.guard.close()
        assert losses == ref_losses[2:], (name, losses, ref_losses)
        for (n, a), b in zip(ref.trainable.items(), resumed.trainable.values()):
            assert torch.equal(a, b), (name, n)
        opt = ref.optimizers["model"]
        shapes = [tuple(p.shape) for p in ref.params["model"]]
        if name == "prodigy":  # keeps no copy of an all-zero initial weight (LoRA B): the planner's 4x is a bound
            assert 0.75 * state_bytes(name, shapes) <= measured_state_bytes(opt) <= state_bytes(name, shapes)
        else:
            assert measured_state_bytes(opt) == state_bytes(name, shapes), name
        if name == "adamw8bit":
            assert any(v.dtype == torch.uint8 for s in opt.state.values() for v in s.values())


def test_float8_run_lora_export_loads_in_diffusers(tmp_path, world1):
    from fastpost.config import from_dict
    from fastpost.trainer import TrainConfig, Trainer

    shards = tmp_path / "shards"
    write_random_shards(shards, 4, (4, 3, 10, 10), 8, 16)
    cfg = _job(tmp_path / "fp8", shards, {"name": "adamw8bit"}, checkpoint={"every_steps": 0})
    cfg["model"]["storage_dtype"] = "float8_e4m3fn"
    trainer = Trainer(from_dict(TrainConfig, cfg))
    trainer.fit()
    trainer.guard.close()
    x, t, e = _batch()
    with torch.no_grad():
        want = FAMILY.predict(trainer.model, x, t, e)
    # diffusers' own model from the same seeded init, its block linears rounded through float8 as the run stored
    # them, plus the exported adapter: the trained function
    torch.manual_seed(0)
    model = FAMILY.diffusers_class.from_config(FAMILY.config("debug"))
    with torch.no_grad():
        for name, module in model.transformer_blocks.named_modules():
            if type(module) is torch.nn.Linear and "norm" not in name:
                module.weight.copy_(module.weight.to(torch.float8_e4m3fn).float())
    model.load_lora_adapter(str(tmp_path / "fp8" / "lora"), prefix="transformer",
                            weight_name="pytorch_lora_weights.safetensors")
    x, t, e = _batch()
    with torch.no_grad():
        out = FAMILY.predict(model, x, t, e)
    assert not math.isnan(out.sum().item())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the merged export: float8 bases leave as bfloat16 with the adapter added (not rounded away in float8)
    from safetensors.torch import load_file

    from fastpost.export import save_transformer

    save_transformer(trainer.model, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    layer = trainer.model.transformer_blocks[0].attn1.to_q
    base = layer.base_layer.weight.detach()
    delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    got = merged["transformer_blocks.0.attn1.to_q.weight"]
    assert base.dtype == torch.float8_e4m3fn and got.dtype == torch.bfloat16
    assert torch.equal(got, (base.float() + delta).to(torch.bfloat16))
    assert not torch.equal(got, base.to(torch.bfloat16))


# ---- id_token -------------------------------------------------------------------------------------------------------
def test_id_token_is_prepended_to_every_caption_and_checked_by_the_train_job(tmp_path, world1):
    from fastpost.config import from_dict
    from fastpost.data import preprocess as pp
    from fastpost.data.shards import ShardDataset
    from fastpost.data.synthetic import SyntheticConfig, generate
    from fastpost.data.text import TextEncoder
    from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae
    from fastpost.trainer import TrainConfig, Trainer

    generate(SyntheticConfig(out_dir=str(tmp_path / "synth"), num_videos=2, num_images=0, frames=[9],
                             sizes=[(32, 32)], seed=2))
    te = str(build_tiny_text_encoder(tmp_path / "te"))
    cfg = from_dict(pp.PreprocessConfig, dict(
        data=str(tmp_path / "synth" / "metadata.jsonl"), output_dir=str(tmp_path / "shards"),
        vae=str(build_tiny_vae(tmp_path / "vae", FAMILY)), text_encoder=te, resolutions=[(32, 32)],
        max_frames=9, max_text_length=8, id_token="BW_STYLE, "))
    pp.preprocess(cfg, FAMILY)
    ds = ShardDataset(tmp_path / "shards")
    text = TextEncoder.from_pretrained(te, family=FAMILY)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["caption"].startswith("BW_STYLE, ") and not sample["caption"].startswith("BW_STYLE, BW")
        embeds, _ = text.encode([sample["caption"]], 8)
        torch.testing.assert_close(sample["prompt_embeds"], embeds[0], rtol=1e-6, atol=1e-6)
    job = {"output_dir": str(tmp_path / "out"), "data": {"path": str(tmp_path / "shards")},
           "model": {"family": "cogvideox", "flavor": "debug"}, "logging": {"progress_bar": False}}
    with pytest.raises(ValueError, match="id_token 'BW_STYLE, '"):
        Trainer(from_dict(TrainConfig, job))


def test_planner_weights_equal_the_built_models_bytes_per_storage_dtype():
    """`fastpost plan`'s weights line is the built model's parameter bytes, per storage dtype (tiny CogVideoX)."""
    from fastpost.config import from_dict
    from fastpost.plan import plan_job
    from fastpost.trainer import TrainConfig

    for storage in (None, "bfloat16", "float8_e4m3fn"):
        _, _, model = _step(storage)
        built = sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = from_dict(TrainConfig, {"model": {"family": "cogvideox", "flavor": "debug", "storage_dtype": storage},
                                      "lora": {"enabled": True, "rank": 4, "alpha": 8},
                                      "plan": {"flavor": "debug", "height": 80, "width": 80, "frames": 9}})
        weights = dict((name.split(" ")[0], b) for name, b in plan_job(cfg, device="cpu").parts)["weights"]
        assert weights == built, (storage, weights, built)


def test_wan_blocks_store_and_offload_too():
    """The Wan family (positional block calls, FFN linears, cross-attention): fp8 storage within tolerance of fp32
    storage (measured 0.017) and block + activation offload exactly equal to none."""
    wan = get_family("wan")
    cfg = wan.config("debug")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, cfg["in_channels"], 3, 8, 8, generator=g), torch.tensor([500])
    e, mask = torch.randn(1, 8, cfg["text_dim"], generator=g), torch.ones(1, 8, dtype=torch.bool)

    def run(storage=None, offload=None, ac="none"):
        model, _ = build_model(wan, ModelSpec(flavor="debug", lora=LORA, storage_dtype=storage),
                               ParallelDims(world_size=1), ac=ACConfig(mode=ac), offload=offload)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        loss = wan.predict(model, x, t, e, mask).float().square().mean()
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _, ref = run()
    assert 0 < _rel(run("float8_e4m3fn")[1], ref) < TOLERANCE["float8_e4m3fn"]
    loss, grads = run("float8_e4m3fn", OffloadConfig(blocks=True, activations=True, prefetch=2), "full")
    want_loss, want = run("float8_e4m3fn", None, "full")
    assert loss == want_loss and all(torch.equal(grads[k], want[k]) for k in want)


def test_planner_suggests_the_one_gpu_options_and_refuses_what_cannot_build():
    from fastpost.config import load_config
    from fastpost.plan import plan_job, suggest
    from fastpost.trainer import TrainConfig

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "cogvideox"
    change, plan = suggest(load_config(TrainConfig, root / "lora_5b.yaml", ["plan.gpu_memory=16GB"]))
    assert change == "model.storage_dtype=float8_e4m3fn optim.name=adamw8bit ac.mode=full" and plan.fits
    for overrides, match in ((["offload.activations=true", "ac.mode=selective"], "ac.mode: full"),
                             (["offload.blocks=true"], "runs without FSDP"),
                             (["offload.blocks=true", "plan.gpus=2"], "for one GPU")):
        with pytest.raises(ValueError, match=match):
            plan_job(load_config(TrainConfig, root / "lora_5b.yaml", overrides))
