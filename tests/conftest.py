"""pytest markers: `gpu` tests need CUDA (they skip without it); scripts/gpu_check.sh runs `pytest -m gpu`.

Every test leaves the pytest process as it found it: an in-process Trainer or sampler initialises a world-1
process group (and sets MASTER_ADDR/MASTER_PORT, whose TCP store keeps that port bound). Left behind, a later
test's init fails ("initialize the default process group twice") and a `fastpost` subprocess inheriting the
environment fails to bind the port. Groups a module fixture made before the test are kept."""

import os

import pytest
import torch.distributed as dist


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    had_group = dist.is_available() and dist.is_initialized()
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    yield
    if had_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
