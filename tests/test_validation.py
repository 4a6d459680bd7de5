"""Validation videos during training: the sampler over the training model itself (no copy), step 0 included,
mp4 + json under output_dir/validation/step_N, and the video in the tensorboard event file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastpost.config import ConfigError, from_dict
from fastpost.trainer import TrainConfig, Trainer
from tests._harness import run_distributed, write_random_shards


@pytest.fixture(scope="module")
def mochi_job(tmp_path_factory):
    from fastpost.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("validation")
    build_tiny_pipeline(root / "pipe", "mochi", "debug")
    write_random_shards(root / "shards", 4, (12, 2, 4, 4), 16, 16)
    return root


def _job(root: Path, out: Path, **validation) -> dict:
    return {"output_dir": str(out), "steps": 2, "seed": 1,
            "model": {"family": "mochi", "pretrained": str(root / "pipe")},
            "lora": {"enabled": True, "rank": 4},
            "data": {"path": str(root / "shards"), "batch_size": 1},
            "checkpoint": {"every_steps": 0},
            "logging": {"progress_bar": False, "tensorboard": True},
            "validation": {"every_steps": 2, "prompts": ["a red ball"], "steps": 2,
                           "guidance_scale": 3.0, "height": 32, "width": 32, "num_frames": 7, **validation}}


def _train(rank, world, cfg):
    trainer = Trainer(from_dict(TrainConfig, cfg))
    trainer.fit()


def test_validation_videos_at_step_0_and_every_n_with_tensorboard(mochi_job, tmp_path):
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    # the LoRA's id_token (issue 22) goes in front of every validation prompt, as in front of every caption
    run_distributed(_train, 1, {**_job(mochi_job, out), "id_token": "BW_STYLE, "})
    videos = {}
    for step in (0, 2):
        folder = out / "validation" / f"step_{step:08d}"
        mp4s = sorted(folder.glob("*.mp4"))
        assert [p.stem for p in mp4s] == ["0000_bw_style_a_red_ball"]
        meta = json.loads((folder / "0000_bw_style_a_red_ball.json").read_text())
        assert meta["prompt"] == "BW_STYLE, a red ball"
        assert meta["step"] == step and meta["decoded_frames"] == 7 and meta["seed"] == 0
        frames = iio.imread(mp4s[0])  # ffmpeg reads it back
        assert frames.shape == (7, 32, 32, 3)
        videos[step] = frames
        assert not (folder / ".partial").exists()
    # LoRA B starts at zero, so step 0 is the base model; two steps of training changed the samples
    assert not (videos[0] == videos[2]).all()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    images = events.Images("validation/00")
    assert [e.step for e in images] == [0, 2]
    assert images[0].encoded_image_string[:6] == b"GIF89a" and (images[0].width, images[0].height) == (32, 32)


def test_validation_config_is_checked_at_start(mochi_job, tmp_path):
    from fastpost.models import get_family
    from fastpost.validation import ValidationConfig, Validator

    with pytest.raises(ConfigError, match="every_n"):
        from_dict(TrainConfig, _job(mochi_job, tmp_path, every_n=3))
    kw = dict(family=get_family("mochi"), model=None, out_dir=tmp_path, rank=0, device=torch.device("cpu"),
              flavor=None, allow_pickle=False)
    with pytest.raises(ValueError, match="validation.prompts"):
        Validator(ValidationConfig(every_steps=1, prompts=[]), pretrained=str(mochi_job / "pipe"), **kw)
    with pytest.raises(ValueError, match="use_ema needs ema_decay"):
        Validator(ValidationConfig(every_steps=1, prompts=["x"], use_ema=True), pretrained=None, **kw)
    with pytest.raises(ValueError, match="pipeline folder"):
        Validator(ValidationConfig(every_steps=1, prompts=["x"]), pretrained=str(mochi_job / "shards"), **kw)
