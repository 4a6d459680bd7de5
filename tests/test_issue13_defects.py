"""Issue 13, the four defects: the objective comes from the checkpoint's scheduler (a contradicting flavor raises);
shards are checked against the model at start-up; CogVideoX 1.5 trains at 49 / 81 frames and on images (first
latent frame repeated in front); the unconditional branch and caption dropout use the stored encoding of ""."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastpost.builder import ModelSpec
from fastpost.config import ConfigError, from_dict
from fastpost.data import preprocess as pp
from fastpost.data import shards
from fastpost.data.checks import (ComponentMismatch, DataModelMismatch, ObjectiveMismatch,
                                  check_shards_for_model, check_text_encoder_for_model, objective_scheduler_config)
from fastpost.data.shards import ShardDataset, ShardError
from fastpost.data.synthetic import SyntheticConfig, generate, write_latent_shards
from fastpost.data.text import TextEncoder
from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae
from fastpost.models import get_family
from fastpost.noise import make_grid
from fastpost.recipes import RecipeContext
from fastpost.recipes.distill import Distill, DistillConfig
from fastpost.recipes.finetune import Finetune, FinetuneConfig
from fastpost.trainer import TrainConfig

COG = get_family("cogvideox")
REPO = Path(__file__).resolve().parents[1]


def _ckpt_with_scheduler(root: Path, config: dict) -> Path:
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "CogVideoXDDIMScheduler", **config}))
    return root


def _ctx(model, pretrained, flavor, data_path=""):
    train_cfg = from_dict(TrainConfig, {"model": {"flavor": flavor, "pretrained": pretrained},
                                        "data": {"path": str(data_path)}})
    return RecipeContext(COG, None, train_cfg, build=lambda spec=None: model,
                         spec=ModelSpec(pretrained=pretrained, flavor=flavor))


def _debug_model(flavor="debug"):
    torch.manual_seed(0)
    return COG.load(None, flavor)


# ---- 1. the objective comes from the checkpoint ------------------------------------------------------------------
def test_distill_and_finetune_take_the_schedule_from_the_checkpoint_and_a_contradicting_flavor_raises(tmp_path):
    five_b = dict(COG.scheduler_configs["default"])  # 5b / 1.5: snr_shift_scale 1.0
    ckpt = str(_ckpt_with_scheduler(tmp_path / "ckpt", five_b))
    model = _debug_model()
    want = make_grid(COG, None, 8, scheduler_config=five_b)
    wrong = make_grid(COG, "debug", 8)  # 2b's snr_shift_scale 3.0: what the old code used
    assert not torch.allclose(want.a, wrong.a)
    # flavor null: the checkpoint's schedule, for the teacher grid and the finetune noise alike
    d = Distill(DistillConfig(num_teacher_steps=8, phases=2, target="student"), _ctx(model, ckpt, None))
    assert torch.allclose(d.grid.a, want.a) and torch.allclose(d.grid.b, want.b)
    f = Finetune(FinetuneConfig(), _ctx(model, ckpt, None))
    ref = COG.noise_schedule(five_b)
    assert torch.equal(f.noise.alphas_cumprod, ref.alphas_cumprod)
    # a flavor whose scheduler agrees (debug-rotary falls back to the default 1.0 config) is accepted
    Distill(DistillConfig(num_teacher_steps=8, phases=2, target="student"), _ctx(model, ckpt, "debug-rotary"))
    # the default flavor "debug" (2b's 3.0) against a 5b checkpoint: one clear error naming the key and the fix
    for recipe, cfg in ((Distill, DistillConfig(num_teacher_steps=8, phases=2, target="student")),
                        (Finetune, FinetuneConfig())):
        with pytest.raises(ObjectiveMismatch, match=r"snr_shift_scale 3\.0 vs 1\.0.*set model\.flavor=null"):
            recipe(cfg, _ctx(model, ckpt, "debug"))
    # no scheduler/ in the checkpoint (a bare transformer dir): the flavor names the schedule
    assert objective_scheduler_config(COG, str(tmp_path), "2b")["snr_shift_scale"] == 3.0


# ---- 2. shards are checked against the model ---------------------------------------------------------------------
def test_synthetic_shards_are_checked_from_their_tensor_shapes(tmp_path):
    config = COG.config("debug")  # in_channels 4, text_embed_dim 16, max_text_seq_length 8
    write_latent_shards(tmp_path / "ok", 4, (4, 3, 8, 8), 8, 16)
    check_shards_for_model(ShardDataset(tmp_path / "ok"), COG, config)  # fits: no error
    cases = {"channels": ((8, 3, 8, 8), 8, 16, r"8 channels .* takes 4-channel latents"),
             "width": ((4, 3, 8, 8), 8, 32, r"width 32 but the transformer takes 16"),
             "length": ((4, 3, 8, 8), 16, 16, r"prompts of 16 tokens but the transformer's max_text_seq_length is 8"
                                              r".*max_text_length=8"),
             "patch": ((4, 3, 7, 8), 8, 16, r"height x width 7x8 is not a multiple of the patch size 2x2")}
    for name, (latent, length, width, message) in cases.items():
        write_latent_shards(tmp_path / name, 2, latent, length, width)
        with pytest.raises(DataModelMismatch, match=message):
            check_shards_for_model(ShardDataset(tmp_path / name), COG, config)
    # CogVideoX 1.5 needs latent frames in multiples of patch_size_t
    with pytest.raises(DataModelMismatch, match=r"3 latent frames .* patch_size_t=2.*repeating the first latent frame"):
        check_shards_for_model(ShardDataset(tmp_path / "ok"), COG, COG.config("debug-1.5"))


def test_preprocessed_headers_are_checked_for_family_vae_normalisation_and_mask(tmp_path):
    config = COG.config("debug")
    header = {"vae": {"family": "cogvideox", "class": "AutoencoderKLCogVideoX",
                      "normalization": {"formula": "(mean - shift_factor) * scaling_factor", "scaling_factor": 0.7,
                                        "shift_factor": 0.0}},
              "text_encoder": {"pass_mask": False, "max_length": 8, "hidden_size": 16}}

    def dataset(name, **changes):
        h = json.loads(json.dumps(header))
        for key, value in changes.items():
            section, field = key.split("__")
            h[section][field] = value
        root = tmp_path / name
        shards.create_manifest(root, h)
        sample = {"latents": torch.zeros(4, 3, 8, 8), "prompt_embeds": torch.zeros(8, 16),
                  "prompt_attention_mask": torch.ones(8, dtype=torch.long)}
        shards.append_manifest(root, shards.write_shard(root, 0, [sample]))
        return ShardDataset(root)

    vae_config = {"_class_name": "AutoencoderKLCogVideoX", "scaling_factor": 0.7}
    check_shards_for_model(dataset("ok"), COG, config, vae_config)
    with pytest.raises(DataModelMismatch, match=r"model family 'mochi' but model\.family is 'cogvideox'"):
        check_shards_for_model(dataset("family", vae__family="mochi"), COG, config)
    with pytest.raises(DataModelMismatch, match=r"AutoencoderKLMochi VAE but cogvideox uses AutoencoderKLCogVideoX"):
        check_shards_for_model(dataset("class", vae__class="AutoencoderKLMochi"), COG, config)
    with pytest.raises(DataModelMismatch, match=r"normalisation .* differs from the pretrained pipeline's VAE"):
        check_shards_for_model(dataset("ok2"), COG, config, {**vae_config, "scaling_factor": 1.15258426})
    with pytest.raises(DataModelMismatch, match=r"pass_mask=True but the cogvideox pipeline .* pass_mask=False"):
        check_shards_for_model(dataset("mask", text_encoder__pass_mask=True), COG, config)


def test_fastpost_train_refuses_shards_of_another_text_length_with_one_line_and_exit_2(tmp_path):
    write_latent_shards(tmp_path / "shards", 4, (4, 3, 8, 8), 16, 16)  # 16 tokens: the old preprocessing default
    job = {"output_dir": str(tmp_path / "out"), "steps": 1, "model": {"family": "cogvideox", "flavor": "debug"},
           "data": {"path": str(tmp_path / "shards")}, "logging": {"progress_bar": False}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    r = subprocess.run([sys.executable, "-m", "fastpost.cli", "train", "--config", str(tmp_path / "job.yaml")],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "prompts of 16 tokens but the transformer's max_text_seq_length is 8" in errors[0]


def test_sampler_side_text_encoder_width_check(tmp_path):
    te = build_tiny_text_encoder(tmp_path / "te", d_model=32)
    with pytest.raises(ComponentMismatch, match=r"outputs width 32 but the transformer takes 16"):
        check_text_encoder_for_model(te, COG.config("debug"))
    check_text_encoder_for_model(te, {**COG.config("debug"), "text_embed_dim": 32})


# ---- preprocessing: text length from the pipeline, CogVideoX 1.5 padding, the "" encoding -------------------------
@pytest.fixture(scope="module")
def pipeline_1_5(tmp_path_factory):
    """A pipeline folder with a tiny CogVideoX VAE and the debug-1.5 transformer config; clips of 49 and 81
    frames and a still, 16x16 pixels."""
    root = tmp_path_factory.mktemp("p15")
    pipe = root / "pipe"
    build_tiny_vae(pipe / "vae", COG)
    COG.diffusers_class.from_config(COG.config("debug-1.5")).save_config(str(pipe / "transformer"))
    te = build_tiny_text_encoder(root / "te")
    generate(SyntheticConfig(out_dir=str(root / "synth"), num_videos=0, num_images=1, sizes=[(16, 16)], seed=3))
    for frames in (49, 81):  # one clip each (the seeded choice among `frames` cannot pin one per clip)
        generate(SyntheticConfig(out_dir=str(root / f"s{frames}"), num_videos=1, frames=[frames], sizes=[(16, 16)],
                                 seed=frames))
    rows = []
    for sub in ("synth", "s49", "s81"):
        for line in (root / sub / "metadata.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append({**row, "path": f"{sub}/{row['path']}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(data=str(root / "metadata.jsonl"), output_dir=str(root / "out"), vae=str(pipe), text_encoder=str(te),
               resolutions=[(16, 16)], max_frames=81)
    report = pp.preprocess(from_dict(pp.PreprocessConfig, cfg), COG)
    assert report["samples_written"] == 3 and report["inputs_failed"] == 0
    return {"root": root, "pipe": pipe, "te": te, "cfg": cfg}


def test_preprocess_reads_the_text_length_from_the_pipeline_and_needs_one(pipeline_1_5, tmp_path):
    ds = ShardDataset(pipeline_1_5["root"] / "out")
    assert ds.header["text_encoder"]["max_length"] == 8 == COG.config("debug-1.5")["max_text_seq_length"]
    assert all(ds[i]["prompt_embeds"].shape == (8, 16) for i in range(len(ds)))
    cfg = {**pipeline_1_5["cfg"], "vae": str(pipeline_1_5["pipe"] / "vae"), "output_dir": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=r"max_text_length is unset .*'max_text_seq_length'"):
        pp.preprocess(from_dict(pp.PreprocessConfig, cfg), COG)


def test_cogvideox_1_5_at_49_and_81_frames_and_images_repeats_the_first_latent_frame(pipeline_1_5):
    ds = ShardDataset(pipeline_1_5["root"] / "out")
    by_frames = {ds[i]["bucket"].split("x")[0]: ds[i] for i in range(len(ds))}
    assert sorted(by_frames) == ["1", "49", "81"]
    vae = pp.load_vae(pipeline_1_5["pipe"])
    cfg = from_dict(pp.PreprocessConfig, pipeline_1_5["cfg"])
    for frames, latent_frames in (("1", 1), ("49", 13), ("81", 21)):
        sample = by_frames[frames]
        latents = sample["latents"]
        assert latents.shape[1] == latent_frames + 1  # 2, 14, 22: multiples of patch_size_t = 2
        pixels, _ = pp.load_pixels(pipeline_1_5["root"] / sample["source"], cfg, 4)
        plain = pp.encode_video(vae, pixels)
        assert plain.shape[1] == latent_frames
        assert torch.equal(latents[:, 1:], plain) and torch.equal(latents[:, 0], plain[:, 0])
    check_shards_for_model(ds, COG, COG.config("debug-1.5"))
    # the debug-1.5 model trains on every one of them (the old shards made predict raise)
    model = _debug_model("debug-1.5")
    recipe = Finetune(FinetuneConfig(), _ctx(model, None, "debug-1.5"))
    for sample in by_frames.values():
        batch = {k: sample[k][None] for k in shards.TENSOR_FIELDS}
        loss, _ = recipe.loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)


def test_empty_prompt_is_stored_and_used_for_guidance_and_caption_dropout(pipeline_1_5):
    root = pipeline_1_5["root"] / "out"
    embeds, mask = shards.read_empty_prompt(root)
    enc = TextEncoder.from_pretrained(pipeline_1_5["te"], family=COG)
    want_e, want_m = enc.encode([""], 8)
    assert torch.equal(embeds, want_e[0]) and torch.equal(mask, want_m[0])
    assert embeds.abs().sum() > 0 and mask.sum() == 1  # not the old zeros: T5 encodes "" as its EOS token
    ds = ShardDataset(root)
    batch = {k: torch.stack([ds[0][k], ds[0][k]]) for k in shards.TENSOR_FIELDS}
    model = _debug_model("debug-1.5")
    # distillation's unconditional branch is the stored "" encoding
    d = Distill(DistillConfig(num_teacher_steps=8, phases=2, target="student"), _ctx(model, None, "debug-1.5", root))
    neg_e, neg_m = d.negative(batch["prompt_embeds"], batch["prompt_attention_mask"])
    assert torch.equal(neg_e, embeds.expand(2, -1, -1)) and torch.equal(neg_m, mask.expand(2, -1))
    # caption_dropout=1: every caption is ""; the loss equals the loss on a batch whose prompts are ""
    empty_batch = {**batch, "prompt_embeds": embeds.expand(2, -1, -1), "prompt_attention_mask": mask.expand(2, -1)}
    for recipe_cls, cfg_cls, extra in ((Finetune, FinetuneConfig, {}),
                                       (Distill, DistillConfig, dict(num_teacher_steps=8, phases=2, target="student"))):
        dropped = recipe_cls(cfg_cls(caption_dropout=1.0, **extra), _ctx(model, None, "debug-1.5", root))
        plain = recipe_cls(cfg_cls(**extra), _ctx(model, None, "debug-1.5", root))
        a = dropped.loss(batch, torch.Generator().manual_seed(1))[0]
        b = plain.loss(empty_batch, torch.Generator().manual_seed(1))[0]
        c = plain.loss(batch, torch.Generator().manual_seed(1))[0]
        assert torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="caption_dropout must be a probability"):
        Finetune(FinetuneConfig(caption_dropout=1.5), _ctx(model, None, "debug-1.5", root))


def test_shards_without_the_empty_prompt_fail_with_the_fix(tmp_path):
    write_latent_shards(tmp_path, 2, (4, 3, 8, 8), 8, 16)
    (tmp_path / shards.EMPTY_PROMPT).unlink()
    with pytest.raises(ShardError, match=r"empty_prompt\.safetensors is missing.*rerun preprocessing"):
        Finetune(FinetuneConfig(caption_dropout=0.1), _ctx(_debug_model(), None, "debug", tmp_path))
