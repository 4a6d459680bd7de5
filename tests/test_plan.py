"""`fastpost plan` against the trainer's real step on CPU, its storage counter, its suggestions and its CLI.

One gloo process (world 1) runs two train steps of the tiny CogVideoX; ~6 s on 2 cores. The full table (tiny and
mid models, AC none/selective/full, world 1 and 2) is benchmarks/bench_plan.py, pasted in docs/performance.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastpost.config import from_dict, load_config
from fastpost.plan import GIB, LiveTensorBytes, parse_bytes, plan_job, suggest
from fastpost.trainer import TrainConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the forkserver workers inherit sys.path and import bench_plan's worker

import bench_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("141GB") == 141 * 10 ** 9
    assert parse_bytes(24) == 24 * GIB
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("12XB")


def test_live_tensor_bytes_counts_views_once_and_frees():
    with LiveTensorBytes() as live:
        a = torch.empty(1024, 256)  # 1 MiB
        view = a.t()  # shares the storage: not counted again
        del a
        assert live.current == 2 ** 20  # the view keeps the storage alive
        b = view.contiguous()  # a second MiB
        del view, b
    assert live.peak == 2 * 2 ** 20 and live.current == 0


def test_predicted_peak_within_15_percent_of_trainer_step(tmp_path):
    bench_plan.prepare(tmp_path, "tiny")
    for ac, r in zip(("none", "full"), bench_plan.measure(tmp_path, "tiny", ["none", "full"], 1)):
        assert abs(r["error"]) < 0.15, (ac, r)
        assert r["peak"] > r["baseline"]  # the step's own allocations were seen


def _real_job(name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs" / name, list(overrides))


def test_checkpointing_and_sequence_parallel_lower_the_activations():
    none, selective, full = (plan_job(_real_job("cogvideox/lora_2b.yaml", f"ac.mode={m}")) for m in
                             ("none", "selective", "full"))
    assert none.total > selective.total > full.total
    sp1 = plan_job(_real_job("cogvideox/lora_2b.yaml", "plan.gpus=2", "ac.mode=full"))
    sp2 = plan_job(_real_job("cogvideox/lora_2b.yaml", "plan.gpus=2", "ac.mode=full", "parallel.ulysses=2"))
    assert sp2.total < sp1.total


def test_suggestion_is_the_cheapest_change_that_fits():
    # 4 GPUs, AC none: 34 GiB predicted. AC first (compute only), then Ulysses (communication)
    for budget, expected in (("8GiB", "parallel.ulysses=1 ac.mode=selective"),
                             ("3GiB", "parallel.ulysses=2 ac.mode=full")):
        cfg = _real_job("cogvideox/lora_2b.yaml", "ac.mode=none", "plan.gpus=4", f"plan.gpu_memory={budget}")
        assert not plan_job(cfg).fits
        change, plan = suggest(cfg)
        assert change == expected and plan.fits
        applied = _real_job("cogvideox/lora_2b.yaml", "plan.gpus=4", f"plan.gpu_memory={budget}",
                            *change.split())
        assert plan_job(applied).fits


def test_cli_plan_exit_codes(capsys):
    from fastpost.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", str(ROOT / "configs/cogvideox/lora_2b.yaml")])
    assert e.value.code == 0 and "fits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", str(ROOT / "configs/cogvideox/lora_2b.yaml"), "--gpu-memory", "5GiB"])
    assert e.value.code == 1 and "cheapest change that fits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", str(ROOT / "configs/cogvideox/lora_2b.yaml"), "--gpu-memory", "4XB"])
    assert e.value.code == 2 and "not a size" in capsys.readouterr().err


def test_layout_that_does_not_divide_the_gpus_is_an_error():
    with pytest.raises(ValueError, match="does not divide"):
        plan_job(from_dict(TrainConfig, {"parallel": {"ulysses": 3}, "plan": {"gpus": 4}}))
