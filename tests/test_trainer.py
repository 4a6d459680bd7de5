"""Trainer + finetune recipe: world 1 == world 4 (dp2 x sp2), kill -9 + resume reproduces the loss sequence,
the exported LoRA reproduces fastpost's output inside a diffusers pipeline, full export round-trips."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastpost.config import from_dict
from tests._harness import run_distributed, write_random_shards
from fastpost.trainer import OptimConfig, TrainConfig, Trainer, lr_lambda

LATENT = (4, 3, 10, 10)  # 3 latent frames of 5x5 patches: 75 video tokens, odd, so sp=2 pads
TEXT_LEN, TEXT_DIM = 8, 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_random_shards(root, 16, LATENT, TEXT_LEN, TEXT_DIM)
    return root


def job(out, shards, **sections) -> dict:
    cfg = {
        "output_dir": str(out), "steps": 6, "seed": 3,
        "model": {"family": "cogvideox", "flavor": "debug"},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
        "data": {"path": str(shards), "batch_size": 1},
        "checkpoint": {"every_steps": 0},
        "logging": {"progress_bar": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def read_losses(out) -> dict[int, float]:
    """step -> loss; a step logged twice (a killed run, then its resume) keeps the last value."""
    losses = {}
    for line in Path(out, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def _train_worker(rank, world, cfg):
    Trainer(from_dict(TrainConfig, cfg)).fit()  # the harness tears the process group down


def test_world1_equals_dp2_sp2_for_the_same_global_batch(shards, tmp_path):
    # world 1 reads the two batches of a global step one after the other (grad_accum 2); world 4 reads them on
    # its two dp ranks, each split over 2 SP ranks. Same samples, same noise (keyed by global batch index).
    run_distributed(_train_worker, 1, job(tmp_path / "w1", shards, grad_accum=2))
    run_distributed(_train_worker, 4, job(tmp_path / "w4", shards, parallel={"ulysses": 2}))
    w1, w4 = read_losses(tmp_path / "w1"), read_losses(tmp_path / "w4")
    assert sorted(w1) == sorted(w4) == list(range(1, 7))
    for step in w1:
        assert abs(w1[step] - w4[step]) <= 1e-5 * max(1.0, abs(w1[step])), (step, w1[step], w4[step])
    # The full-finetune export is a diffusers folder and both layouts trained the same weights. Compared by the
    # relative update error (measured 2.3e-4): attn norm_k.bias has an exactly-zero true gradient (a bias on k
    # adds the same q.b to every logit of a softmax row), so AdamW turns its rounding noise into full-size steps
    # (2e-4 apart); every other parameter agrees to 4e-7.
    from diffusers import CogVideoXTransformer3DModel

    from fastpost.models import get_family

    sd1 = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "w1" / "transformer").state_dict()
    sd4 = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "w4" / "transformer").state_dict()
    torch.manual_seed(0)
    init = get_family("cogvideox").load(None, "debug").state_dict()
    diff = sum(((sd1[k] - sd4[k]) ** 2).sum() for k in sd1).sqrt()
    update = sum(((sd1[k] - init[k]) ** 2).sum() for k in sd1).sqrt()
    assert update > 0.1 and diff / update <= 1e-3, (diff.item(), update.item())


def _cli_train(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "fastpost.cli", "train", "--config", str(config), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_state(run_dir: Path) -> dict:
    """Every tensor of a run's final DCP checkpoint (models, all optimizers, recipe tensors, EMA), by key."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return flatten_state_dict(_load_state_dict_from_keys(checkpoint_id=str(step)))[0]


def _kill9_and_resume(tmp_path: Path, cfg_of) -> tuple[Path, Path]:
    """An uninterrupted run and a run SIGKILLed at step >= 6 of 14 then resumed: equal losses at every step and
    bit-identical final checkpoints (every model, optimizer, recipe tensor and EMA)."""
    for name in ("ref", "run"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg_of(tmp_path / name)))

    ref = _cli_train(tmp_path / "ref.yaml")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    # kill -9 once step 6 is logged: the step-4 checkpoint is complete (saves are synchronous), step 8's is not
    run = _cli_train(tmp_path / "run.yaml")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and max(read_losses(tmp_path / "run") or [0]) >= 6):
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = max(read_losses(tmp_path / "run"))
    assert killed_at < 14, "the run finished before it could be killed"
    resumed = _cli_train(tmp_path / "run.yaml", "--resume", "latest")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "step_0000000" in out, out

    want, got = read_losses(tmp_path / "ref"), read_losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 15))
    for step in range(1, 15):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step], killed_at)
    a, b = _final_state(tmp_path / "ref"), _final_state(tmp_path / "run")
    assert a.keys() == b.keys()
    assert sum(isinstance(v, torch.Tensor) for v in a.values()) > 10
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    return tmp_path / "ref", tmp_path / "run"


def test_kill9_resume_reproduces_losses_and_lora_export_loads_in_diffusers(shards, tmp_path):
    """Two optimizers (LoRA + the learned loss weighting, each with its LR schedule) and the trainer's EMA."""
    lora = {"enabled": True, "rank": 4, "alpha": 8}  # alpha != rank: the export must carry the scale

    def cfg_of(out):
        return job(out, shards, steps=14, lora=lora, checkpoint={"every_steps": 4}, ema_decay=0.9,
                   recipe_args={"learned_weighting": True, "weighting_lr": 1e-2})

    ref, _ = _kill9_and_resume(tmp_path, cfg_of)
    state = _final_state(ref)
    assert any(k.startswith("trainables.weighting.optim.state") for k in state), sorted(state)[:10]
    assert any(k.startswith("ema.") for k in state)
    _check_lora_export_in_pipeline(ref, cfg_of(ref), tmp_path, shards)


def test_kill9_resume_is_exact_for_distillation_state(shards, tmp_path):
    """The distillation recipe's own tensors (the EMA consistency target) survive kill -9 bit-exactly."""
    lora = {"enabled": True, "rank": 4, "alpha": 4}

    def cfg_of(out):
        return job(out, shards, steps=14, lora=lora, checkpoint={"every_steps": 4}, recipe="distill",
                   recipe_args={"num_teacher_steps": 8, "phases": 2, "target": "ema", "ema_decay": 0.5})

    ref, _ = _kill9_and_resume(tmp_path, cfg_of)
    assert any(k.startswith("recipe.target.") for k in _final_state(ref))


def _stop_then_resume_worker(rank, world, cfg):
    Trainer(from_dict(TrainConfig, cfg)).fit()


def test_resume_at_another_world_size_continues_the_same_global_batches(shards, tmp_path):
    """Saved at dp2 x sp2 (world 4), resumed at sp2 (world 2, grad_accum 2): DCP reshards model and AdamW, the
    loader continues at the same global batch, and the losses equal an uninterrupted world-4 run."""
    optim = {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}  # the LR may not depend on `steps`
    ckpt = {"every_steps": 0, "resume": "latest"}
    run_distributed(_stop_then_resume_worker, 4, job(tmp_path / "ref", shards, steps=6, optim=optim,
                                                     parallel={"ulysses": 2}))
    run_distributed(_stop_then_resume_worker, 4, job(tmp_path / "run", shards, steps=3, optim=optim,
                                                     parallel={"ulysses": 2}, checkpoint=ckpt))
    run_distributed(_stop_then_resume_worker, 2, job(tmp_path / "run", shards, steps=6, optim=optim, grad_accum=2,
                                                     parallel={"ulysses": 2}, checkpoint=ckpt))
    want, got = read_losses(tmp_path / "ref"), read_losses(tmp_path / "run")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (step, got[step], want[step])


def _check_lora_export_in_pipeline(run_dir: Path, cfg: dict, tmp_path: Path, shards: Path) -> None:
    """The exported LoRA, loaded by diffusers, gives the same transformer output as fastpost's trained model
    (rebuilt from the final DCP checkpoint), lowers the loss on fixed data, and the pipeline runs with it."""
    import torch.distributed.checkpoint as dcp
    from diffusers import CogVideoXPipeline
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from fastpost.data.text import TextEncoder
    from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae
    from fastpost.lora import LoRAConfig, inject_lora
    from fastpost.models import get_family

    family = get_family("cogvideox")
    torch.manual_seed(cfg.get("model", {}).get("init_seed", 0))
    ours = family.load(None, "debug")
    inject_lora(ours, from_dict(LoRAConfig, cfg["lora"]))
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # the checkpoint holds LoRA tensors only
    state = {"model": get_model_state_dict(ours, options=options)}
    dcp.load(state, checkpoint_id=str(run_dir / "checkpoints" / "step_00000014"))
    set_model_state_dict(ours, state["model"], options=options)

    torch.manual_seed(0)
    base = family.load(None, "debug")
    text_dir = build_tiny_text_encoder(tmp_path / "t5", d_model=TEXT_DIM)
    text = TextEncoder.from_pretrained(text_dir)
    from diffusers import AutoencoderKLCogVideoX

    pipe = CogVideoXPipeline(tokenizer=text.tokenizer, text_encoder=text.model,
                             vae=AutoencoderKLCogVideoX.from_pretrained(build_tiny_vae(tmp_path / "vae", family)),
                             transformer=base, scheduler=family.make_scheduler("debug"))
    pipe.load_lora_weights(run_dir / "lora")

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, *LATENT, generator=g)
    emb = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        a = family.predict(ours, x, t, emb, torch.ones(1, TEXT_LEN))
        b = family.predict(pipe.transformer, x, t, emb, torch.ones(1, TEXT_LEN))
        base_model = family.load(None, "debug")
        base_out = family.predict(base_model, x, t, emb, torch.ones(1, TEXT_LEN))
    assert (a - b).abs().max() <= 1e-5
    assert (a - base_out).abs().max() > 1e-4, "LoRA changed nothing: the comparison would be vacuous"
    # training lowered the v-prediction loss on fixed samples, noise and timesteps (per-step training losses are
    # too noisy to compare: each draws its own timesteps)
    from fastpost.data.loader import ShardLoader

    batch = next(iter(ShardLoader(shards, batch_size=8, shuffle=False)))
    x0, emb = batch["latents"], batch["prompt_embeds"]
    eps = torch.randn(x0.shape, generator=g)
    t = torch.arange(50, 1000, 120)[: x0.shape[0]]
    abar = family.make_scheduler("debug").alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    x_t, v = abar.sqrt() * x0 + (1 - abar).sqrt() * eps, abar.sqrt() * eps - (1 - abar).sqrt() * x0
    with torch.no_grad():
        trained = ((family.predict(ours, x_t, t, emb, None) - v) ** 2).mean().item()
        untrained = ((family.predict(base_model, x_t, t, emb, None) - v) ** 2).mean().item()
    assert trained < 0.95 * untrained, (trained, untrained)
    video = pipe("a red circle", num_inference_steps=2, height=80, width=80, num_frames=9,
                 max_sequence_length=TEXT_LEN, guidance_scale=1.0, output_type="np").frames
    assert video.shape[:2] == (1, 9) and torch.isfinite(torch.as_tensor(video)).all()


def test_nonfinite_losses_are_skipped_then_abort(shards, tmp_path):
    # logging every step: the host reads the device-side skip flags at logging steps only (no sync in between)
    run_distributed(_nan_worker, 1, job(tmp_path / "nan", shards, steps=4, max_bad_steps=2,
                                        logging={"every_steps": 1}))


def _nan_worker(rank, world, cfg):
    trainer = Trainer(from_dict(TrainConfig, cfg))
    with torch.no_grad():  # poison one weight: every loss becomes NaN
        next(iter(trainer.trainable.values())).fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    with pytest.raises(RuntimeError, match="3 consecutive steps with a non-finite loss"):
        trainer.fit()
    # three steps ran with their updates skipped on the device; the third's flush counts 3 > 2 and aborts
    assert trainer.step == 3 and trainer.bad_steps == 3
    for n, p in trainer.trainable.items():  # skipped steps did not touch the weights
        assert torch.equal(p.detach(), before[n]) or torch.isnan(before[n]).all()


def test_lr_schedule_warmup_then_cosine_counted_in_optimizer_steps():
    f = lr_lambda(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=14)
    assert [round(f(s), 3) for s in (0, 3)] == [0.25, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(9) == pytest.approx(0.55)


def test_ema_is_exported_and_resumed_exactly_under_fsdp(shards, tmp_path):
    """EMA of the trainable weights (DTensor shards at world 2): exported to transformer_ema, restored on resume
    (an uninterrupted run and a stop-at-2 + resume run export identical EMA weights)."""
    from diffusers import CogVideoXTransformer3DModel

    ema = {"ema_decay": 0.5}
    run_distributed(_train_worker, 2, job(tmp_path / "a", shards, steps=3, **ema))
    ckpt = {"every_steps": 1, "resume": "latest"}
    run_distributed(_train_worker, 2, job(tmp_path / "b", shards, steps=2, checkpoint=ckpt, **ema))
    run_distributed(_train_worker, 2, job(tmp_path / "b", shards, steps=3, checkpoint=ckpt, **ema))

    def weights(run, name):
        return CogVideoXTransformer3DModel.from_pretrained(tmp_path / run / name).state_dict()

    ema_a, ema_b = weights("a", "transformer_ema"), weights("b", "transformer_ema")
    final_a, final_b = weights("a", "transformer"), weights("b", "transformer")
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    assert max((final_a[k] - final_b[k]).abs().max().item() for k in final_a) <= 1e-6
    assert max((ema_a[k] - final_a[k]).abs().max().item() for k in ema_a) > 1e-4, "EMA export = final weights"
