"""Training checkpoints with torch.distributed.checkpoint (DCP): save, atomic completion, keep-last-K, resume.

Layout under <dir>:
  step_00000100/            a complete checkpoint (the name appears only once every rank has finished)
    .metadata, __0_0.distcp   DCP: model (trainable params only for LoRA), optimizer, recipe tensors (EMA, ...)
    extra_rank00000.safetensors  per-rank plain state: step, LR scheduler, loader position, RNG, recipe extras
                                 (tensors + JSON, never pickle: fastpost.safe_load)
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from fastpost.safe_load import UnsafeFileError, dcp_load, load_state, save_state

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


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last

    def save(self, step: int, model, optimizer, tensors: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Collective. `tensors` (DCP, may hold DTensors) and `extra` (per rank: scalars, strings, tensors and
        lists/tuples/dicts of them; saved without pickle) are free-form."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing this step
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_model_options(model))
        dcp.save({"model": model_sd, "optim": optim_sd, **tensors}, checkpoint_id=str(tmp))
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

    def load(self, path: Path, model, optimizer, tensors: dict[str, Any]) -> dict[str, Any]:
        """Collective. Loads in place into model/optimizer/tensors; returns this rank's extra state."""
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_model_options(model))
        state = {"model": model_sd, "optim": optim_sd, **tensors}
        dcp_load(state, path)  # no unrestricted unpickling of .metadata or non-tensor items
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_model_options(model))
        for key, value in tensors.items():
            _copy_into(value, state[key])
        extra_file = path / f"extra_rank{_rank():05d}.safetensors"
        if not extra_file.is_file() and extra_file.with_suffix(".pt").is_file():
            raise UnsafeFileError(
                f"{extra_file.with_suffix('.pt')} is a pickled extra-state file (older fastpost); pickles can run "
                f"code, so it is not loaded: re-create the checkpoint with this fastpost"
            )
        if not extra_file.is_file():
            raise FileNotFoundError(
                f"{extra_file} is missing: the checkpoint was written with a different number of ranks; resume "
                f"with the same world size"
            )
        extra = load_state(extra_file)
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra["rng_cuda"])
        return extra


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, torch.Tensor) and dst is not src:
        dst.copy_(src)

