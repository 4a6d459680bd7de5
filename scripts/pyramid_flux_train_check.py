"""Trainer-level proofs for pyramid_flux (too slow for the unit-test budget; numbers recorded in docs/pyramid.md):

  1. LoRA and full finetune with recipe pyramid_flow: world 1 (grad_accum 2) == sp 2 (grad_accum 2) ==
     dp 2 x sp 2 (world 4): equal losses at every step (same samples, same draws: keyed by global batch index)
  2. kill -9 during a LoRA run, resume from the latest checkpoint: equal losses at every step and a bit-identical
     final checkpoint; the exported LoRA has diffusers' Flux keys

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/pyramid_flux_train_check.py /tmp/pflux_check
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.pyramid_flux_debug_data import write  # noqa: E402
from tests._harness import run_distributed  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pyramid_flux" / "lora_debug.yaml"


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        m = json.loads(line)
        if "loss" in m and "step" in m:
            out[m["step"]] = m["loss"]
    return out


def job(out: Path, shards: Path, **kw) -> dict:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.update(output_dir=str(out), steps=6, data={"path": str(shards), "batch_size": 2},
               checkpoint={"every_steps": 0}, logging={"every_steps": 1, "progress_bar": False})
    for k, v in kw.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def _worker(rank, world, cfg):
    from fastpost.config import load_config
    from fastpost.trainer import TrainConfig, Trainer

    path = Path(cfg["output_dir"] + ".yaml")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
    torch.distributed.barrier()
    Trainer(load_config(TrainConfig, path, [])).fit()


def parity(root: Path, shards: Path) -> None:
    for mode, extra in (("lora", {}), ("full", {"lora": {"enabled": False}})):
        runs = {"world 1 (accum 2)": (1, job(root / f"{mode}_w1", shards, grad_accum=2, **extra)),
                "sp 2 (accum 2)": (2, job(root / f"{mode}_sp2", shards, grad_accum=2, parallel={"ulysses": 2},
                                          **extra)),
                "dp 2 x sp 2": (4, job(root / f"{mode}_dp2sp2", shards, parallel={"ulysses": 2}, **extra))}
        got = {}
        for name, (world, cfg) in runs.items():
            t0 = time.time()
            run_distributed(_worker, world, cfg)
            got[name] = losses(Path(cfg["output_dir"]))
            print(f"{mode:4s} {name:18s} {time.time() - t0:5.1f}s losses {[round(v, 6) for v in got[name].values()]}")
        ref = got["world 1 (accum 2)"]
        for name, ls in got.items():
            err = max(abs(ls[s] - ref[s]) for s in ref)
            print(f"{mode:4s} {name:18s} max |loss - world 1| = {err:.2e}")
            assert sorted(ls) == sorted(ref) == list(range(1, 7)) and err <= 1e-5, (name, err)


def kill9_resume(root: Path, shards: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("ref", "run"):
        cfg = job(root / f"k_{name}", shards, steps=14, checkpoint={"every_steps": 4})
        (root / f"k_{name}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = lambda name, *extra: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "fastpost.cli", "train", "--config", str(root / f"k_{name}.yaml"), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ref = cmd("ref")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    run = cmd("run")
    while max(losses(root / "k_run") or [0]) < 6:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = max(losses(root / "k_run"))
    out, _ = cmd("run", "--resume", "latest").communicate(timeout=600)
    want, have = losses(root / "k_ref"), losses(root / "k_run")
    err = max(abs(want[s] - have[s]) for s in want)
    print(f"kill -9 at step {killed_at} of 14, resumed: steps {sorted(have) == list(range(1, 15))}, "
          f"max |loss - uninterrupted| = {err:.1e}")
    assert sorted(have) == list(range(1, 15)) and err <= 1e-6, out
    from safetensors import safe_open

    with safe_open(str(root / "k_run" / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    print(f"exported LoRA: {len(keys)} tensors, e.g. {keys[0]}")
    assert all(k.startswith("transformer.") for k in keys)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/pyramid_flux_check")
    shards = write(root / "data", n=16)
    parity(root, shards)
    kill9_resume(root, shards)
