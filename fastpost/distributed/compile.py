"""Regional compilation: torch.compile each transformer block (as torchtitan does), after activation
checkpointing and before FSDP, so each FSDP unit is one compiled, checkpointed block.

Per block instead of the whole model: the blocks are identical, so dynamo compiles one graph and reuses it for
every block (compile time ~ one block, not the whole depth), and the model's outer code (embeddings, SP
split/gather hooks, FSDP's hooks) stays eager. `nn.Module.compile()` compiles in place: parameter names, state
dicts, LoRA targets and checkpoints are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch.nn as nn


@dataclass
class CompileConfig:
    enabled: bool = False
    # torch.compile modes; "max-autotune-no-cudagraphs" and friends tune GPU kernels (much longer first step)
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # inductor generates kernels; eager / aot_eager only capture the graphs (dynamo [+ AOT autograd], no codegen): a quick
    # check that a model compiles without graph breaks or numeric change (the CPU test uses it: inductor's C++
    # compile of one block takes 10-150 s on a loaded 2-core box, measured)
    backend: str = "inductor"


def apply_compile(blocks: Iterable[nn.Module], cfg: CompileConfig | None) -> None:
    if cfg is None or not cfg.enabled:
        return
    if cfg.mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"compile.mode {cfg.mode!r} is not a torch.compile mode; use default, reduce-overhead, "
                         f"max-autotune or max-autotune-no-cudagraphs")
    for block in blocks:
        # dynamic=False: a training run has one or a few bucket shapes; each compiles once (recompiles are logged
        # by torch when a new shape arrives)
        block.compile(backend=cfg.backend, mode=None if cfg.backend != "inductor" else cfg.mode, dynamic=False)
