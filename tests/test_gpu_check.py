"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's whole flow (wheels, the gpu test lane, bench_attention,
bench_train_step with AC and compile rows, the hook section) at tiny sizes on CPU, so the script cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run(tmp_path):
    hooks = ROOT / "scripts" / "gpu_check.d"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WHEELS": str(tmp_path / "none"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert proc.returncode == 0, proc.stderr + report
    for title in ("0. wheels", "1. GPU test lane", "2. bench_attention", "3. bench_train_step"):
        assert f"## {title}" in report
    assert "skipped" in report  # the gpu tests were collected (imports fine) and skipped without CUDA
    assert "| sdpa " in report and "| fastpost, AC selective " in report and "+ compile (eager)" in report
    assert report.count("exit 0 in") == 3 + len(list(hooks.glob("*.sh")))
