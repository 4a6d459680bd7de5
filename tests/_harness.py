"""Test harness for multi-process tests on CPU (gloo): spawn a world, run a function on every rank.

Each worker pins torch to one thread: mp.spawn does not set OMP_NUM_THREADS, and 4 ranks on 2 cores with
default threads were measured 4-5x slower (an FSDP step 706 ms vs 154 ms).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastpost.data.synthetic import write_latent_shards as write_random_shards  # noqa: F401 (tests import it here)
from fastpost.distributed.parallel_dims import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Workers fork from one server process that has already imported the heavy libraries, instead of each fresh
# 'spawn' importing torch + diffusers again (measured: that import was most of a world-4 test's time on 2 cores).
# The server imports modules only: no threads or process groups exist in it, so forking it is safe.
_PRELOAD = ["torch", "torch.distributed", "diffusers", "transformers", "peft", "fastpost.trainer",
            "fastpost.models.cogvideox", "fastpost.models.mochi", "fastpost.models.wan", "fastpost.sampling"]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run fn(rank, world_size, *args) on world_size gloo processes; an exception on any rank fails the call.

    fn must be importable (module-level): workers unpickle it in a process forked from the forkserver.
    """
    import multiprocessing.forkserver

    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)
    mp.start_processes(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="forkserver")
