"""Every job file in configs/ loads as strictly as its command reads it; every real training job builds at real
size on the meta device, has a parallel layout valid for its stated GPUs, heads and tokens, fits its stated GPU
according to `fastpost plan`, and has a preprocessing job that writes the clips it was planned for.

No weights are read: the real checkpoints are not on this machine, so `fastpost plan` sizes the model from the
family's flavor named in the job's `plan:` section (the transformer class on the meta device + the job's LoRA).
~8 s on 2 cores (one narrow probe block per distinct model, cached).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastpost.cli import infer_kind, resolve_job
from fastpost.config import from_dict, load_yaml
from fastpost.data.preprocess import PreprocessConfig
from fastpost.trainer import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(CONFIGS.rglob("*.yaml"))
TRAIN_JOBS = [f for f in FILES if "plan" in load_yaml(f)]  # the real jobs state their hardware in plan:
# one consumer GPU (issue 22): the header states the planner's peak, the card and an estimated step time
ONE_GPU = {"cogvideox/2b_lora_8gb.yaml", "cogvideox/2b_lora_16gb.yaml", "cogvideox/2b_lora_24gb.yaml",
           "cogvideox/5b_lora_16gb.yaml", "cogvideox/5b_lora_24gb.yaml", "wan/t2v_14b_lora_24gb.yaml"}
EXPECTED = {"cogvideox/lora_2b.yaml", "cogvideox/lora_5b.yaml", "cogvideox/full_5b.yaml",
            "cogvideox/distill_5b.yaml", "cogvideox/lora_1.5_5b.yaml", "mochi/lora.yaml", "mochi/distill.yaml",
            "cogvideox/i2v_5b_lora.yaml", "wan/t2v_1.3b_lora.yaml", "wan/t2v_14b_lora_8gpu.yaml",
            "wan/i2v_14b_lora.yaml", "wan/t2v_a14b_lora_8gpu.yaml",
            "pyramid_flux/lora_384p_8gpu.yaml", "pyramid_flux/lora_384p_2gpu.yaml",
            "pyramid_flux/lora_768p_8gpu.yaml", "pyramid_flux/lora_768p_2gpu.yaml", *ONE_GPU}


def _name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_every_real_setup_has_a_job_file():
    assert {_name(f) for f in TRAIN_JOBS} == EXPECTED


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_job_file_loads_strictly(path):
    data = load_yaml(path)
    kind, job = resolve_job(str(path), [])  # unknown keys or bad recipe_args raise here
    assert kind == infer_kind(data) and job
    if path in TRAIN_JOBS:
        assert kind == "train"
        header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
        assert "Planned for" in header, f"{_name(path)}: the header comment must say the hardware it was planned for"


def _preprocess_jobs() -> dict[str, PreprocessConfig]:
    out = {}
    for f in FILES:
        data = load_yaml(f)
        if infer_kind(data) == "preprocess":
            out[_name(f)] = from_dict(PreprocessConfig, data)
    return out


@pytest.mark.parametrize("path", TRAIN_JOBS, ids=_name)
def test_real_job_builds_at_real_size_and_fits_its_gpu(path):
    from fastpost.distributed import ParallelDims
    from fastpost.models import get_family
    from fastpost.plan import model_facts, plan_job, sequence, vae_config

    cfg = from_dict(TrainConfig, load_yaml(path))
    family = get_family(cfg.model.family)
    assert cfg.model.pretrained and cfg.plan.flavor, "a real job names its checkpoint and the flavor to plan with"
    # the model at real size on the meta device, LoRA injected as the builder does it (fastpost.lora.inject_lora)
    facts = model_facts(family, family.config(cfg.plan.flavor), cfg.lora)
    assert facts.total > 1e9 and facts.blocks >= 24  # real size, not a debug flavor (miniflux: 8 + 16 blocks)
    if cfg.lora.enabled:
        assert 0 < facts.trainable < 0.05 * facts.total
    else:
        assert facts.trainable == facts.total
    # parallel layout: the degrees divide the stated GPU count (ParallelDims checks it); Ulysses pads heads, but every
    # SP rank needs video tokens, and the latent grid must be whole patches
    par = cfg.parallel
    dims = ParallelDims(dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, ulysses=par.ulysses, ring=par.ring,
                        world_size=cfg.plan.gpus)
    assert dims.dp_replicate * dims.dp_shard * dims.ulysses * dims.ring == cfg.plan.gpus
    config = family.config(cfg.plan.flavor)
    video, text = sequence(family, config, vae_config(family, cfg), cfg.plan)
    assert video >= 16 * par.ulysses * par.ring and text > 0
    if family.vae is not None:  # (a family without a VAE of its own checks the clip size in plan_sequence)
        spatial, temporal = family.vae.factors_fn(vae_config(family, cfg))
        _, p_h, p_w = family.patch_sizes(config)
        assert cfg.plan.height % (spatial * p_h) == 0 and cfg.plan.width % (spatial * p_w) == 0
        assert (cfg.plan.frames - 1) % temporal == 0, "pixel frames must be temporal * k + 1 for the family's VAE"
    # the planner says it fits the GPU the file was planned for
    plan = plan_job(cfg)
    assert plan.fits, f"{_name(path)} does not fit {cfg.plan.gpu}:\n{plan.table()}"
    if family.vae is None:  # pyramid_flux: the shards come from upstream's extraction via the importer
        header = path.read_text()
        assert "fastpost import-pyramid" in header and f"--out {cfg.data.path}" in header, _name(path)
        return
    # some preprocessing job writes the shards this job reads, at the planned clip size
    writers = {n: p for n, p in _preprocess_jobs().items() if p.output_dir == cfg.data.path}
    assert writers, f"no preprocessing job in configs/ writes {cfg.data.path}"
    for name, pre in writers.items():
        assert [cfg.plan.height, cfg.plan.width] in [list(r) for r in pre.resolutions], name
        assert pre.max_frames == cfg.plan.frames, name
        assert pre.vae == cfg.model.pretrained and pre.text_encoder == cfg.model.pretrained, name


@pytest.mark.parametrize("name", sorted(ONE_GPU))
def test_one_gpu_job_header_states_the_planned_peak_card_and_step_time(name):
    import re

    from fastpost.plan import GIB, parse_bytes, plan_job

    path = CONFIGS / name
    cfg = from_dict(TrainConfig, load_yaml(path))
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    plan = plan_job(cfg)
    stated = re.search(r"predicts an? ([0-9.]+) GiB peak \(of ([0-9.]+) GiB\)", header)
    assert stated, f"{name}: the header must quote `fastpost plan`'s peak and the budget"
    assert float(stated.group(1)) == round(plan.total / GIB, 1), (stated.group(1), plan.total / GIB)
    assert abs(float(stated.group(2)) - parse_bytes(cfg.plan.gpu_memory) / GIB) <= 0.051
    assert cfg.plan.gpus == 1 and re.search(r"step time ~\d+ s", header) and "ESTIMATE" in header
    assert plan.fits
