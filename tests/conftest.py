"""pytest markers: `gpu` tests need CUDA (they skip without it); scripts/gpu_check.sh runs `pytest -m gpu`.

Every test leaves the pytest process as it found it: an in-process Trainer or sampler initialises a world-1
process group (and sets MASTER_ADDR/MASTER_PORT, whose TCP store keeps that port bound). Left behind, a later
test's init fails ("initialize the default process group twice") and a `fastpost` subprocess inheriting the
environment fails to bind the port. Groups a module fixture made before the test are kept. Signal handlers a
test's JobGuard installed are put back too (a later stop-signal test checks what close() restores)."""

import os
import signal

import pytest
import torch.distributed as dist


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    had_group = dist.is_available() and dist.is_initialized()
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}  # an in-process trainer's JobGuard installs its own
    yield
    for s, handler in handlers.items():
        if signal.getsignal(s) is not handler and handler is not None:
            signal.signal(s, handler)
    if had_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
