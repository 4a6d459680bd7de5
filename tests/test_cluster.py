"""Cluster reliability of `fastpost train` under torchrun at world 2 (CPU gloo): bad shards exit 2 on every rank,
workers die with a kill -9'd launcher, one job per output folder, SIGTERM preemption resumes exactly, a run of
non-finite steps stops with its own code and keeps the last good checkpoint, half-written checkpoints are never
resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastpost import cluster
from fastpost.checkpoint import CheckpointManager, complete_checkpoints, resolve_resume
from fastpost.data.shards import append_manifest, create_manifest, write_shard
from tests._harness import write_random_shards

LATENT = (4, 3, 10, 10)
TEXT_LEN, TEXT_DIM = 8, 16
ROOT = Path(__file__).resolve().parents[1]


def job(tmp_path: Path, name: str, shards: Path, **top) -> Path:
    cfg = {
        "output_dir": str(tmp_path / name), "steps": 8, "seed": 3,
        "model": {"family": "cogvideox", "flavor": "debug"},
        "optim": {"lr": 3e-3},
        "data": {"path": str(shards), "batch_size": 1, "shuffle": False},
        "checkpoint": {"every_steps": 0},
        "logging": {"progress_bar": False, "every_steps": 1},
    }
    for k, v in top.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    return env


def torchrun(config: Path, *extra: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m fastpost.cli train`, in its own process group (as a scheduler
    starts it), output merged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastpost.cli", "train", "--config", str(config), *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def one_process(config: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastpost.cli", "train", "--config", str(config), *extra],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def read_losses(out: Path) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r.get("loss")) for r in map(json.loads, path.read_text().splitlines())]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while max((s for s, _ in read_losses(out)), default=0) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not reach step %d" % step
        time.sleep(0.05)


def assert_one_line_exit(out: str, code: int, message: str) -> None:
    """Both workers exited with `code` and printed `message` in one line; no worker printed a traceback (only
    torchrun's own ChildFailedError report, which names the exit codes)."""
    assert len(re.findall(rf"exitcode\s*: {code} ", out)) == 2, out
    lines = [line for line in out.splitlines() if line.startswith("fastpost train: error: ")]
    assert len(lines) == 2 and all(message in line for line in lines), out
    assert not re.search(r'File ".*fastpost/', out) and "[rank" not in out, out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # an unreaped zombie is dead


def _children(pid: int) -> list[int]:
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d))
    return kids


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- data errors ----------------------------------------------------------------------------------------------
def test_bad_shards_exit_2_with_one_line_on_every_rank(tmp_path):
    # One sample per shard and no shuffling: rank 0 reads the even samples, rank 1 the odd ones.
    truncated, damaged = tmp_path / "truncated", tmp_path / "damaged"
    for root in (truncated, damaged):
        write_random_shards(root, 16, LATENT, TEXT_LEN, TEXT_DIM, samples_per_shard=1)
    shard = truncated / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # Same size, broken header length: passes the size check at build, fails when rank 1 opens it for step 3.
    shard = damaged / "shard-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    shard.write_bytes(bytes(data))

    # Truncation is found when the loader is built (one stat per shard), before any step.
    proc = torchrun(job(tmp_path, "t", truncated))
    out, _ = proc.communicate(timeout=300)
    assert_one_line_exit(out, 2, "shard-00003.safetensors is truncated")
    assert read_losses(tmp_path / "t") == []

    # Only rank 1 would read the damaged shard, at step 3: both ranks stop after step 2 with its message.
    proc = torchrun(job(tmp_path, "d", damaged))
    out, _ = proc.communicate(timeout=300)
    assert_one_line_exit(out, 2, "shard-00005.safetensors cannot be opened")
    assert [s for s, _ in read_losses(tmp_path / "d")] == [1, 2]
    status = (tmp_path / "d" / cluster.STATUS_FILE).read_text()
    assert status.startswith("2 data error: shard ") and "shard-00005" in status, status


def test_loader_checks_sizes_when_built_and_the_next_batches_without_moving(tmp_path):
    from fastpost.data.loader import ShardLoader
    from fastpost.data.shards import ShardError

    write_random_shards(tmp_path, 6, LATENT, TEXT_LEN, TEXT_DIM, samples_per_shard=1)
    size = (tmp_path / "shard-00000.safetensors").stat().st_size
    (tmp_path / "shard-00004.safetensors").write_bytes(b"\0" * size)  # same size, no valid header: rank 0's
    (tmp_path / "shard-00005.safetensors").write_bytes(b"\0" * size)  # rank 1's third batch
    loader = ShardLoader(tmp_path, 1, dp_rank=1, dp_size=2, shuffle=False)  # this rank reads samples 1, 3, 5
    assert loader.sampler.upcoming(5) == [[1], [3], [5], [1], [3]]  # 3 batches per epoch: crosses into epoch 1
    loader.check_next(2)
    with pytest.raises(ShardError, match=r"shard-00005\.safetensors cannot be opened"):
        loader.check_next(3)
    assert loader.state_dict()["position"] == 0  # checking moved nothing
    assert next(iter(loader))["indices"] == [1]
    (tmp_path / "shard-00002.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors is truncated"):
        ShardLoader(tmp_path, 1, dp_rank=1, dp_size=2)  # every shard's size, whichever rank reads it


# ---- launcher death, the lock ------------------------------------------------------------------------------------
def test_kill9_of_launcher_kills_workers_and_the_output_lock(tmp_path):
    shards = tmp_path / "shards"
    write_random_shards(shards, 16, LATENT, TEXT_LEN, TEXT_DIM)
    config = job(tmp_path, "run", shards, steps=100_000, checkpoint={"every_steps": 2}, logging={"every_steps": 1000})
    out = tmp_path / "run"
    launcher = torchrun(config)
    wait_for_step(out, 3, launcher)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and all(map(_alive, workers)), workers

    # A second job on the same folder: one line naming the folder and the holder (rank 0's pid), exit 3.
    second = one_process(config)
    assert second.returncode == cluster.EXIT_LOCKED, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "in use by another job" in lines[0], second.stderr
    assert int(re.search(r"\(pid (\d+) ", lines[0]).group(1)) in workers, (lines[0], workers)

    # kill -9 of the launcher's process group (what a scheduler does); the workers have their own groups.
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed = time.time()
    while any(map(_alive, workers)) and time.time() - killed < 10:
        time.sleep(0.05)
    died_after = time.time() - killed
    assert not any(map(_alive, workers)), f"orphaned workers {workers} still running 10 s after the launcher died"
    assert died_after < 3, died_after
    before = _snapshot(out)
    time.sleep(2)
    assert _snapshot(out) == before, "files in the output folder changed after the workers were killed"

    # The dead job's lock is stale: a new job takes it over and runs.
    third = one_process(config, "steps=1", "checkpoint.dir=" + str(tmp_path / "ckpt3"))
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"took over the lock of {out} from a job that died (pid {workers[0]}" in third.stdout or \
        f"took over the lock of {out} from a job that died (pid {workers[1]}" in third.stdout, third.stdout


# ---- preemption ------------------------------------------------------------------------------------------------
def test_sigterm_checkpoints_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path):
    shards = tmp_path / "shards"
    write_random_shards(shards, 16, LATENT, TEXT_LEN, TEXT_DIM)
    ref = torchrun(job(tmp_path, "ref", shards, data={"shuffle": True}))
    config = job(tmp_path, "run", shards, data={"shuffle": True})
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out

    run = torchrun(config)
    wait_for_step(tmp_path / "run", 3, run)
    run.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
    out, _ = run.communicate(timeout=120)
    # torchrun reports its own SignalException here, not the workers' codes: rank 0's status file holds 75
    assert "Sending process" in out and "SIGKILL" not in out, out  # both stopped within torchrun's grace period
    stopped = [s for s, _ in read_losses(tmp_path / "run")]
    last = stopped[-1]
    assert stopped == list(range(1, last + 1)) and last < 8, stopped
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [f"step_{last:08d}"]
    status = (tmp_path / "run" / cluster.STATUS_FILE).read_text()
    assert status.startswith(f"75 preempted: stopped by SIGTERM after step {last};"), status
    assert f"fastpost train: preempted: stopped by SIGTERM after step {last}" in out, out

    resumed = torchrun(config, "--resume", "latest")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    got, want = read_losses(tmp_path / "run"), read_losses(tmp_path / "ref")
    assert [s for s, _ in got] == list(range(1, 9)), got  # every step exactly once: none redone, none lost
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-6, (step, a, b, last)
    assert (tmp_path / "run" / cluster.STATUS_FILE).read_text() == "0 done\n"


def test_stop_signal_is_configurable_and_only_flags(tmp_path):
    prior = signal.getsignal(signal.SIGUSR1)
    guard = cluster.JobGuard(cluster.ClusterConfig(stop_signals=["SIGUSR1"]), tmp_path, rank=0)
    try:
        assert guard.should_stop() is False  # installs the handlers
        before = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # would terminate the process without the handler
        assert guard.should_stop() is True and guard.signal_received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM keeps its action
        assert "stopped by SIGUSR1 after step 5" in str(guard.preempted(5, tmp_path))
    finally:
        guard.close()
    assert signal.getsignal(signal.SIGUSR1) is prior  # close() puts back what was there
    with pytest.raises(Exception, match="'SIGKILL' is not a catchable signal"):
        cluster.ClusterConfig(stop_signals=["SIGKILL"])


# ---- failing steps, half-written checkpoints ---------------------------------------------------------------------
def test_consecutive_nonfinite_steps_exit_4_and_keep_the_last_good_checkpoint(tmp_path):
    # Samples 0-3 are finite (steps 1-2 at dp 2, no shuffling), the rest NaN: steps 3 and 4 are skipped
    # (max_bad_steps 2) and the third bad step in a row stops the job.
    shards = tmp_path / "shards"
    create_manifest(shards, {"vae_family": "synthetic"})
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        latents = torch.randn(LATENT, generator=g) * (1.0 if i < 4 else float("nan"))
        sample = {"latents": latents, "prompt_embeds": torch.randn(TEXT_LEN, TEXT_DIM, generator=g),
                  "prompt_attention_mask": torch.ones(TEXT_LEN, dtype=torch.long), "caption": f"{i}"}
        append_manifest(shards, write_shard(shards, i, [sample]))
    config = job(tmp_path, "run", shards, steps=20, max_bad_steps=2, checkpoint={"every_steps": 1, "keep_last": 2})
    proc = torchrun(config)
    out, _ = proc.communicate(timeout=300)
    assert_one_line_exit(out, cluster.EXIT_DIVERGED, "3 consecutive steps with a non-finite loss or gradient")
    logged = read_losses(tmp_path / "run")
    assert [s for s, _ in logged] == [1, 2, 3, 4] and all(loss is not None for _, loss in logged[:2])
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000001", "step_00000002"]
    assert resolve_resume(ckpts, "latest").name == "step_00000002"
    assert (tmp_path / "run" / cluster.STATUS_FILE).read_text().startswith("4 diverged: 3 consecutive steps")


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    model = torch.nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(4, {"model": (model, torch.optim.AdamW(model.parameters()))}, {}, {})
    # A job killed while writing step 6 (DCP files, no rename yet), and a step folder with no DCP metadata.
    (tmp_path / "step_00000006.tmp").mkdir()
    (tmp_path / "step_00000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "step_00000008").mkdir()
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step_00000004"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_resume(tmp_path, str(tmp_path / "step_00000008"))
    manager.save(5, {"model": (model, torch.optim.AdamW(model.parameters()))}, {}, {})
    assert not (tmp_path / "step_00000006.tmp").exists()  # the next save removes the leftover
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step_00000005"
