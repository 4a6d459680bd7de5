"""Training recipes: name -> Recipe class, imported lazily from fastpost/recipes/<name>.py (module attr RECIPE),
or from any importable module path (`recipe: mypkg.my_recipe`) for a user's own recipe.

A recipe owns its config dataclass (`Config`, filled strictly from the job file's `recipe_args`), the models it
declares (built through `ctx.build`, the one model builder, so each is sharded like the trained model) and the
trainable modules, each with its own optimizer. `loss()` turns a batch into the loss of one optimizer's update.
The trainer owns everything else: the optimizers and their LR schedules, grad accumulation, clipping, the
non-finite skip, checkpoints (every model, optimizer and recipe tensor), logging and export.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass
class RecipeContext:
    family: Any  # fastpost.models.ModelFamily
    dims: Any  # fastpost.distributed.ParallelDims (None in single-process unit tests)
    train_cfg: Any  # the whole TrainConfig (read-only; None in unit tests)
    build: Callable[..., nn.Module]  # build(spec: ModelSpec) -> model, parallelized like the trained model
    spec: Any = None  # the job's fastpost.builder.ModelSpec (pretrained, flavor, seed, dtype, variant, LoRA)
    # a small trainable module of the recipe's own (a critic head, a loss weighting) -> placed and sharded so
    # that its gradients are averaged over data-parallel ranks like the model's
    build_module: Callable[[nn.Module], nn.Module] = lambda module: module
    # open_loader(name, LoaderConfig) -> a ShardLoader over a second shard folder (an image set), built like the
    # trainer's own (dp rank picks the samples, SP peers get the same ones); its position is checkpointed with
    # the trainer's loader under `name`, so a resumed job continues both exactly
    open_loader: Callable[[str, Any], Any] | None = None

    @classmethod
    def for_model(cls, family, model: nn.Module, dims=None, train_cfg=None) -> "RecipeContext":
        """A context whose builder hands out an already-built model (unit tests of a recipe's math)."""
        return cls(family, dims, train_cfg, lambda spec=None: model)


@dataclass
class Trainable:
    """A module the recipe trains with its own optimizer; `optim` overrides keys of the job's optim section
    (e.g. {"lr": 1e-5} for a critic)."""

    module: nn.Module
    optim: dict = field(default_factory=dict)
    # which of the module's trainable parameters are this Trainable's (two LoRA adapters on one shared base
    # are two Trainables of one module); None: all
    owns: Callable[[str], bool] | None = None

    def parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters()
                if p.requires_grad and (self.owns is None or self.owns(n))}


class Recipe(abc.ABC):
    Config: type  # dataclass of this recipe's options

    def __init__(self, cfg: Any, ctx: RecipeContext):
        self.cfg, self.ctx = cfg, ctx

    @abc.abstractmethod
    def trainables(self) -> dict[str, Trainable]:
        """name -> Trainable, in a fixed order. The first one is the model that is exported (and EMA'd)."""

    def phases(self, step: int) -> list[str]:
        """The updates of training step `step`, in order (e.g. N critic updates, then one generator update).
        Each update consumes grad_accum micro-batches and steps the optimizers of phase_trainables(phase)."""
        return ["train"]

    def phase_trainables(self, phase: str) -> list[str]:
        """The trainables whose optimizers step in `phase` (default: all, on one loss)."""
        return list(self.trainables())

    @abc.abstractmethod
    def loss(self, batch: dict[str, Any], generator: torch.Generator,
             phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of this rank's batch for the update of `phase` (identical on the ranks of one SP group)
        and metrics to log."""

    def after_optimizer_step(self, phase: str, step: int) -> None:
        """Hook after every optimizer update (e.g. an EMA target network follows its student)."""

    def state_tensors(self) -> dict[str, Any]:
        """Tensors to checkpoint with DCP (may be DTensors); loaded in place on resume, every key required."""
        return {}

    def export_model(self) -> nn.Module:
        return next(iter(self.trainables().values())).module

    def extra_exports(self) -> dict[str, nn.Module]:
        """Further trained models the trainer exports next to export_model(), name -> module: <out>/lora_<name>
        (LoRA) or <out>/<name> (full), e.g. {"transformer_2": the low-noise expert of a two-expert pipeline}."""
        return {}


def get_recipe(name: str) -> type[Recipe]:
    module_name = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name or (e.name and module_name.startswith(e.name + ".")):
            raise ValueError(f"unknown recipe {name!r}: fastpost's recipes live in fastpost/recipes/<name>.py; a "
                             f"recipe of your own is given as an importable module path with a RECIPE class") from None
        raise
    recipe = getattr(module, "RECIPE", None)
    if not (isinstance(recipe, type) and issubclass(recipe, Recipe)):
        raise ValueError(f"module {module_name} has no RECIPE (a fastpost.recipes.Recipe subclass)")
    return recipe
