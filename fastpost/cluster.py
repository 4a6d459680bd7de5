"""Running on a cluster: exit codes, the output-folder lock, dying with the launcher, collective stop on a signal.

One `JobGuard` per training process, built right after the process group exists:
  * exits with the launcher: torchrun starts workers in their own sessions, so a `kill -9` of the launcher's
    process group left them training (measured: 21 more steps). Workers ask the kernel for SIGKILL when their
    parent dies (prctl PR_SET_PDEATHSIG; a polling thread where prctl is missing).
  * output lock: global rank 0 holds an exclusive flock on <output_dir>/.fastpost.lock for the life of the job
    and writes its pid and host into it. The kernel drops a flock when its holder dies, so a dead job's lock is
    simply taken over; a live holder makes the new job stop with EXIT_LOCKED on every rank.
  * stop signals (SIGTERM, SIGUSR1 by default): the handler only sets a flag. At each step boundary
    `should_stop()` all-reduces the flag (one tiny collective), so every rank stops after the same step, writes
    the same checkpoint and exits with EXIT_PREEMPTED.
  * data errors at a step boundary: the check of the next step's samples runs on every rank before the same
    all-reduce, so a bad shard seen by one rank stops every rank with EXIT_BAD_INPUT and the same message.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from fastpost.config import ConfigError
from fastpost.data.shards import ShardError

# Exit codes of `fastpost train` (documented in docs/training.md, "Running on a cluster").
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # job file, overrides, shard folder, or a data error met during training
EXIT_LOCKED = 3  # output_dir is held by another live job
EXIT_DIVERGED = 4  # more than max_bad_steps consecutive non-finite steps; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # stopped on a signal after a checkpoint was written: requeue with --resume latest (EX_TEMPFAIL)

T = TypeVar("T")

LOCK_FILE = ".fastpost.lock"
STATUS_FILE = "exit_status"  # "<code> <reason>: <message>", written by rank 0 (torchrun itself always exits 1)


@dataclass
class ClusterConfig:
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # [] keeps default actions
    lock: bool = True  # exclusive lock on output_dir for the life of the job
    exit_with_launcher: bool = True  # workers started by torchrun die with it (kill -9 of the launcher)

    def __post_init__(self) -> None:
        for name in self.stop_signals:
            if name in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, name, None), signal.Signals):
                raise ConfigError(f"cluster.stop_signals: {name!r} is not a catchable signal name; use e.g. "
                                  f"SIGTERM or SIGUSR1")


class JobStop(RuntimeError):
    """Training stopped for a reason with its own exit code; `str()` is the one-line message."""

    def __init__(self, code: int, message: str, reason: str = "error"):
        super().__init__(message)
        self.code, self.reason = code, reason


class DataStop(JobStop, ShardError):
    """A shard error agreed on by every rank (still a ShardError for callers that catch that)."""


# ---- dying with the launcher ----------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def exit_with_parent(poll_s: float = 1.0) -> str:
    """Make this process get SIGKILL when its parent dies; returns how ('prctl', 'watchdog' or 'parent gone')."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        how = "prctl"
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(poll_s)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="fastpost-parent-watchdog", daemon=True).start()
        how = "watchdog"
    if os.getppid() != parent:  # the parent died before the kernel was asked: nobody would signal us
        os.kill(os.getpid(), signal.SIGKILL)
        return "parent gone"
    return how


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def keep_exit_code() -> None:
    """Call when this rank has decided to exit with a code that every rank shares. torchrun sends SIGTERM to
    the other workers as soon as the first one exits; ignoring it lets them finish exiting with the same code
    instead of -15 (torchrun still SIGKILLs a worker that hangs past its shutdown timeout)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- the output-folder lock -------------------------------------------------------------------------------------
# resolved lock path -> [fd, users]: flock conflicts between two fds of one process too, so a second Trainer in
# the same process (tests, notebooks) shares the first one's lock
_held: dict[str, list[int]] = {}


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def acquire_lock(out_dir: str | Path) -> tuple[int, str]:
    """Exclusive, non-blocking flock on <out_dir>/.fastpost.lock; returns (fd, previous holder text).

    The previous holder text is non-empty when a job died without releasing (a stale lock now taken over).
    Raises JobStop(EXIT_LOCKED) naming the folder and the live holder's pid.
    """
    path = Path(out_dir) / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        return _held[key][0], ""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd) or "unknown pid"
        os.close(fd)
        raise JobStop(
            EXIT_LOCKED,
            f"output_dir {str(out_dir)!r} is in use by another job ({holder}); wait for it to end, stop it, or "
            f"choose another output_dir",
            "locked",
        ) from None
    stale = _holder(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    os.fsync(fd)
    _held[key] = [fd, 1]
    return fd, stale


def release_lock(out_dir: str | Path) -> None:
    """Empty the lock file (a clean end leaves no stale holder) and drop the flock."""
    key = str((Path(out_dir) / LOCK_FILE).resolve())
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        fd = _held.pop(key)[0]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_exit_status(out_dir: str | Path, code: int, reason: str, message: str = "") -> None:
    """Rank 0's record of how the job ended, for requeue scripts (torchrun reports 1 for any failed worker)."""
    path = Path(out_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp{os.getpid()}")
    tmp.write_text(f"{code} {reason}{': ' + message if message else ''}\n")
    os.replace(tmp, path)


def _catch_shard_error(fn: Callable[[], T] | None) -> tuple[T | None, str]:
    if fn is None:
        return None, ""
    try:
        return fn(), ""
    except ShardError as e:
        return None, str(e)


# ---- the guard --------------------------------------------------------------------------------------------------
class JobGuard:
    """Per-process cluster behaviour of one training job; see the module docstring. Collective where noted."""

    def __init__(self, cfg: ClusterConfig, out_dir: str | Path, rank: int, device: torch.device | str = "cpu"):
        self.cfg, self.out, self.rank, self.device = cfg, Path(out_dir), rank, torch.device(device)
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}
        self.exit_mode = exit_with_parent() if cfg.exit_with_launcher and launched_by_torchrun() else "off"
        self._lock_all_ranks()
        self._handlers_installed = False

    def _lock_all_ranks(self) -> None:
        """Collective: rank 0 takes the lock; every rank learns the outcome, so none is left waiting."""
        message = ""
        if self.cfg.lock and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                _, stale = acquire_lock(self.out)
                if stale:
                    print(f"[fastpost] took over the lock of {self.out} from a job that died ({stale})", flush=True)
            except JobStop as e:
                message = str(e)
            else:  # this job owns the folder now: a status left by an earlier run must not be read as ours
                (self.out / STATUS_FILE).unlink(missing_ok=True)
        if self.cfg.lock and dist.is_initialized():
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message:
            raise JobStop(EXIT_LOCKED, message, "locked")

    def _install_handlers(self) -> None:
        # Installed at the first collective check (the loader build), not at once: until then a rank the
        # launcher stops because a peer failed must die at once. From then on a SIGTERM only sets the flag, so
        # a rank that is already exiting on a collective decision keeps its own exit code when torchrun, seeing
        # the first rank exit, signals the others.
        self._handlers_installed = True
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there; the default actions stay in force
        for name in self.cfg.stop_signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then every rank stops at the same boundary.
        if self.signal_received is None:
            self.signal_received = signum

    def should_stop(self, check_data: Callable[[], None] | None = None) -> bool:
        """Collective, at a step boundary: True when any rank got a stop signal.

        check_data (e.g. the loader's check of the next step's samples) runs first on every rank; a ShardError
        it raises on any rank becomes JobStop(EXIT_BAD_INPUT) with that message on every rank.
        """
        _, error = _catch_shard_error(check_data)
        return self._exchange(self.signal_received is not None, error)

    def checked(self, build: Callable[[], T]) -> T:
        """Collective: build() on every rank (e.g. the shard loader); a ShardError on any rank becomes
        JobStop(EXIT_BAD_INPUT) on every rank. Without this the first rank to fail exits while the launcher
        kills the slower ones, so they never report."""
        result, error = _catch_shard_error(build)
        self._exchange(False, error)
        return result

    def _exchange(self, stop: bool, error: str) -> bool:
        if not self._handlers_installed:
            self._install_handlers()
        flags = torch.tensor([float(stop), float(bool(error))], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1] > 0:
            if dist.is_initialized():  # only on this rare path: share the first failing rank's message with all
                messages: list[str] = [""] * dist.get_world_size()
                dist.all_gather_object(messages, error)
                error = next(m for m in messages if m)
            raise DataStop(EXIT_BAD_INPUT, error, "data error")
        return bool(flags[0] > 0)

    def preempted(self, step: int, checkpoint: Path) -> JobStop:
        name = signal.Signals(self.signal_received).name if self.signal_received else "a stop signal on another rank"
        return JobStop(EXIT_PREEMPTED,
                       f"stopped by {name} after step {step}; checkpoint {checkpoint} written; rerun with "
                       f"--resume latest to continue", "preempted")

    def close(self) -> None:
        """Restore the previous signal handlers and release the lock (kept until the process ends otherwise)."""
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:  # not if replaced since (keep_exit_code)
                signal.signal(sig, handler)
        self._previous.clear()
        if self.cfg.lock and self.rank == 0:
            release_lock(self.out)
