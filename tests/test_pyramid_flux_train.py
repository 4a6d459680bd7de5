"""pyramid_flux through the trainer (the fast version of scripts/pyramid_flux_train_check.py, which adds the full
finetune, sp 2 alone and a kill -9 resume): a LoRA finetune with the release conventions at dp 2 x sp 2 (world 4)
logs the same losses as world 1 with grad_accum 2 (same samples, same draws: keyed by the global batch index)."""

from __future__ import annotations

from pathlib import Path

from scripts.pyramid_flux_debug_data import write
from scripts.pyramid_flux_train_check import _worker, job, losses
from tests._harness import run_distributed


def test_lora_dp2_sp2_equals_world1(tmp_path):
    shards = write(tmp_path / "data", n=8)
    w1 = job(tmp_path / "w1", shards, steps=2, grad_accum=2)
    dp2sp2 = job(tmp_path / "dp2sp2", shards, steps=2, parallel={"ulysses": 2})
    run_distributed(_worker, 1, w1)
    run_distributed(_worker, 4, dp2sp2)
    want, have = losses(Path(w1["output_dir"])), losses(Path(dp2sp2["output_dir"]))
    assert sorted(want) == sorted(have) == [1, 2], (want, have)
    for step in want:
        assert abs(want[step] - have[step]) <= 1e-5 * max(1.0, abs(want[step])), (step, want, have)
