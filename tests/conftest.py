"""pytest markers: `gpu` tests need CUDA (they skip without it); scripts/gpu_check.sh runs `pytest -m gpu`."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")
