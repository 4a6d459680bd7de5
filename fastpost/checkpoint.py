"""Training checkpoints with torch.distributed.checkpoint (DCP): save, atomic completion, keep-last-K, resume.

Layout under <dir>:
  step_00000100/            a complete checkpoint (the name appears only once every rank has finished)
    .metadata, __0_0.distcp   DCP: every trainable module (trainable params only for LoRA) and its optimizer,
                              recipe tensors (EMA target, ...), the trainer's EMA; resharded on load, so a job
                              may resume at another world size or layout
    extra_rank00000.safetensors  per-rank plain state: step, LR schedulers, loader position (in global batches),
                                 RNG, counters (tensors + JSON, never pickle: fastpost.safe_load); rank 0's copy
                                 is the shared truth
  step_00000200.tmp/        a checkpoint being written (or killed mid-write): never resumed from, removed later

Atomicity: every rank writes into `<name>.tmp`, a barrier proves all are done, then rank 0 renames it. A kill at
any moment leaves either the previous complete set or the new complete one.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from fastpost.safe_load import UnsafeFileError, dcp_load, load_state, read_dcp_metadata, save_state

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <output_dir>/checkpoints
    every_steps: int = 100  # 0 disables periodic checkpoints (a final one is still written)
    keep_last: int = 2
    resume: str | None = None  # "latest", a step_XXXXXXXX directory, or None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(root: str | Path, resume: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint (None if there is none yet); a path must be a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} is missing or incomplete (no DCP .metadata); pass --resume latest or a "
            f"step_XXXXXXXX directory under {str(root)!r}"
        )
    return path


def _model_options(model: torch.nn.Module) -> StateDictOptions:
    # Frozen base weights (LoRA) are not training state: they come from the pretrained model, not the checkpoint.
    # Loading such a state dict is then non-strict about the frozen keys only: dcp.load has already failed on any
    # requested (trainable) key that the checkpoint lacks.
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _module_state(trainables: dict[str, tuple]) -> dict[str, Any]:
    """DCP state of every (module, optimizer): the first under "model"/"optim" (what `fastpost sample` reads),
    the others under "trainables.<name>"."""
    state: dict[str, Any] = {}
    for i, (name, (module, optimizer)) in enumerate(trainables.items()):
        model_sd, optim_sd = get_state_dict(module, optimizer, options=_model_options(module))
        if i == 0:
            state.update(model=model_sd, optim=optim_sd)
        else:
            state.setdefault("trainables", {})[name] = {"model": model_sd, "optim": optim_sd}
    return state


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last

    def save(self, step: int, trainables: dict[str, tuple], tensors: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Collective. `trainables`: name -> (module, optimizer); `tensors` (DCP, may hold DTensors) and `extra`
        (per rank: scalars, strings, tensors and lists/tuples/dicts of them; saved without pickle) are free-form."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing this step
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({**_module_state(trainables), **tensors}, checkpoint_id=str(tmp))
        extra = {**extra, "step": step, "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            extra["rng_cuda"] = torch.cuda.get_rng_state()
        save_state(extra, tmp / f"extra_rank{_rank():05d}.safetensors")
        _barrier()
        if _rank() == 0:
            if final.exists():  # re-saving a step (e.g. after resume): replace
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old)
            for stale in self.root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path, trainables: dict[str, tuple], tensors: dict[str, Any]) -> dict[str, Any]:
        """Collective. Loads in place into every module, optimizer and tensor; returns the extra state. Every
        tensor the checkpoint holds must have a home in this job and vice versa (a recipe whose state is not
        restored would silently continue from a fresh one)."""
        state = {**_module_state(trainables), **tensors}
        stored = set(read_dcp_metadata(Path(path) / ".metadata").state_dict_metadata)
        wanted = set(flatten_state_dict(state)[0])
        if stored != wanted:
            lost, absent = sorted(stored - wanted), sorted(wanted - stored)
            raise CheckpointError(
                f"checkpoint {path} does not match this job: {len(lost)} stored tensors have no place here (e.g. "
                f"{lost[:3]}), {len(absent)} of this job's are not stored (e.g. {absent[:3]}). Resume with the same "
                f"recipe, LoRA and EMA settings as the run that wrote it")
        dcp_load(state, path)  # no unrestricted unpickling of .metadata or non-tensor items
        for i, (name, (module, optimizer)) in enumerate(trainables.items()):
            sd = state if i == 0 else state["trainables"][name]
            set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=_model_options(module))
        for key, value in tensors.items():
            _copy_into(value, state[key])
        # shared state (step, schedules, loader position) is identical on every rank: rank 0's file serves a
        # job resumed at another world size; RNG state is restored where this rank's own file exists
        first = path / "extra_rank00000.safetensors"
        own = path / f"extra_rank{_rank():05d}.safetensors"
        if not first.is_file() and first.with_suffix(".pt").is_file():
            raise UnsafeFileError(
                f"{first.with_suffix('.pt')} is a pickled extra-state file (older fastpost); pickles can run "
                f"code, so it is not loaded: re-create the checkpoint with this fastpost")
        if not first.is_file():
            raise CheckpointError(f"{first} is missing: the checkpoint is incomplete; resume from another one")
        extra = load_state(first)
        if own.is_file():
            mine = load_state(own) if own != first else extra
            torch.set_rng_state(mine["rng_cpu"])
            if "rng_cuda" in mine and torch.cuda.is_available():
                torch.cuda.set_rng_state(mine["rng_cuda"])
        return extra


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this job (incomplete, or holding other state)."""


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, torch.Tensor) and dst is not src:
        dst.copy_(src)

