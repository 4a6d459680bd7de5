"""Single-process unit tests of the core: ParallelDims validation, attention backends, typed configs."""

from dataclasses import dataclass, field

import pytest
import torch

from fastpost.attention import attention, available_backends, resolve_backend
from fastpost.config import ConfigError, apply_overrides, from_dict, load_config
from fastpost.distributed import ParallelDims


# ---- ParallelDims ----------------------------------------------------------------------------------------------
def test_parallel_dims_infers_dp_shard_and_derived_degrees():
    d = ParallelDims(dp_replicate=2, ulysses=2, ring=2, world_size=16)
    assert (d.dp_shard, d.sp, d.dp, d.fsdp_size, d.hsdp_enabled) == (2, 4, 4, 8, True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ulysses=3, world_size=4), r"world_size=4 is not divisible by dp_replicate\*ulysses\*ring"),
        (dict(dp_shard=3, ulysses=2, world_size=4), r"= 6 != world_size=4"),
        (dict(ulysses=0, world_size=4), r"ulysses must be an integer >= 1"),
        (dict(dp_shard=-2, world_size=4), r"dp_shard must be >= 1 or -1"),
    ],
)
def test_parallel_dims_bad_degrees_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_parallel_dims_needs_process_group_for_world_above_one():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised; launch with torchrun"):
        ParallelDims(world_size=2).build_mesh("cpu")
    single = ParallelDims()
    assert single.build_mesh("cpu") is None and single.submesh("sp") is None and single.sp_rank == 0


# ---- attention backends ----------------------------------------------------------------------------------------
def _qkv(seed=0, s=9, h=3, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, s, h, d, generator=g) for _ in range(3)]


def test_math_and_sdpa_backends_agree_with_and_without_masks():
    q, k, v = _qkv()
    bool_mask = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    bool_mask[..., 0] = True
    float_mask = torch.randn(2, 1, 9, 9)
    for mask in (None, bool_mask, float_mask):
        a = attention(q, k, v, mask=mask, backend="sdpa")
        b = attention(q, k, v, mask=mask, backend="math")
        assert (a - b).abs().max() < 1e-5
    # a mask that blocks a key must change the output
    assert (attention(q, k, v, bool_mask, "math") - attention(q, k, v, None, "math")).abs().max() > 1e-3


def test_auto_backend_on_cpu_is_sdpa_and_flash_is_optional():
    q, k, v = _qkv()
    assert resolve_backend("auto", q, k, v).name == "sdpa"
    assert {"sdpa", "math"} <= set(available_backends())
    if "flash_attn_2" not in available_backends():
        with pytest.raises(RuntimeError, match="'flash_attn_2' is not installed here"):
            attention(q, k, v, backend="flash_attn_2")


def test_bad_attention_inputs_raise_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'fa9'; choose one of"):
        attention(q, k, v, backend="fa9")
    with pytest.raises(ValueError, match="q/k/v shapes disagree"):
        attention(q, k[:, :, :2], v, backend="sdpa")
    with pytest.raises(ValueError, match="mask must be 4-D"):
        attention(q, k, v, mask=torch.ones(9, 9, dtype=torch.bool))


# ---- typed configs ---------------------------------------------------------------------------------------------
@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Job:
    name: str = "x"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    resume: str | None = None


def test_config_from_dict_overrides_and_strictness(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\noptim:\n  lr: 3.0e-4\n")
    job = load_config(Job, path, ["optim.betas=[0.8, 0.9]", "steps=5"])
    assert job == Job(name="demo", steps=5, optim=Optim(lr=3e-4, betas=(0.8, 0.9)))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.lrr'\] for Optim; valid keys: \['betas', 'lr'\]"):
        from_dict(Job, {"optim": {"lrr": 1}})
    assert load_config(Job, path, ["optim.lr=5e-3"]).optim.lr == 5e-3  # YAML reads 5e-3 as a string
    with pytest.raises(ConfigError, match="lr: expected a number, got 'fast'"):
        from_dict(Job, {"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="steps: expected an integer, got 'ten'"):
        from_dict(Job, {"steps": "ten"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["steps"])


def test_train_cli_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    job = tmp_path / "job.yaml"
    job.write_text("optim: {lrr: 1}\n")
    for config, message in ((tmp_path / "nope.yaml", "does not exist"), (job, "unknown config key(s) ['optim.lrr']")):
        proc = subprocess.run([sys.executable, "-m", "fastpost.cli", "train", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "fastpost train: error: " in proc.stderr and message in proc.stderr, proc.stderr
