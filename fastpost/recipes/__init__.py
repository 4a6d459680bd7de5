"""Training recipes: name -> Recipe class, imported lazily from fastpost/recipes/<name>.py (module attr RECIPE).

A recipe owns its config dataclass (`Config`, filled strictly from the job file's `recipe_args`) and turns a
batch into a loss. The trainer owns everything else (parallelism, optimizer, checkpoints, logging).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RecipeContext:
    family: Any  # fastpost.models.ModelFamily
    model: torch.nn.Module  # the trained model, already parallelized
    dims: Any  # fastpost.distributed.ParallelDims
    train_cfg: Any  # the whole TrainConfig (read-only)


class Recipe(abc.ABC):
    Config: type  # dataclass of this recipe's options

    def __init__(self, cfg: Any, ctx: RecipeContext):
        self.cfg, self.ctx = cfg, ctx

    @abc.abstractmethod
    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of this rank's batch (identical on the ranks of one SP group) and metrics to log."""

    def after_optimizer_step(self, step: int) -> None:
        """Hook after every optimizer step (e.g. an EMA target network)."""

    def state_tensors(self) -> dict[str, Any]:
        """Tensors to checkpoint with DCP (may be DTensors); loaded in place on resume."""
        return {}


def get_recipe(name: str) -> type[Recipe]:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise ValueError(f"unknown recipe {name!r}; recipes live in fastpost/recipes/<name>.py") from None
        raise
    return module.RECIPE
