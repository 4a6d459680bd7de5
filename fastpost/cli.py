"""fastpost command line: `fastpost <command> ...`; every command runs under torchrun as well as alone."""

from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fastpost train", description="Train from a job file (torchrun-compatible)")
    p.add_argument("--config", required=True, help="job file, e.g. configs/cogvideox/lora_debug.yaml")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory (= checkpoint.resume)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 parallel.ulysses=2")
    args = p.parse_args(argv)
    from fastpost.cluster import EXIT_BAD_INPUT, EXIT_OK, JobStop, keep_exit_code, write_exit_status
    from fastpost.config import ConfigError, load_config
    from fastpost.data.shards import ShardError
    from fastpost.trainer import TrainConfig, Trainer

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:  # bad input (job file, overrides, shard folder) or a busy output_dir: one line, its exit code, every rank
        trainer = Trainer(load_config(TrainConfig, args.config, overrides))
    except (ConfigError, ShardError, JobStop) as e:
        keep_exit_code()
        print(f"fastpost train: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.code if isinstance(e, JobStop) else EXIT_BAD_INPUT) from None
    # Every stop below is decided collectively (the same on every rank), so every rank exits with the same code.
    try:
        try:
            trainer.fit()
            code, reason, message = EXIT_OK, "done", ""
        except JobStop as e:
            code, reason, message = e.code, e.reason, str(e)
        except ShardError as e:  # a shard changed on disk after the step-boundary check
            code, reason, message = EXIT_BAD_INPUT, "data error", str(e)
        if code != EXIT_OK:
            keep_exit_code()
        if trainer.rank == 0:  # while the lock is still held
            write_exit_status(trainer.out, code, reason, message)
    finally:
        trainer.close()
    if reason == "preempted":
        if trainer.rank == 0:
            print(f"fastpost train: preempted: {message}", file=sys.stderr, flush=True)
    elif code != EXIT_OK:
        print(f"fastpost train: error: {message}", file=sys.stderr, flush=True)
    if code != EXIT_OK:
        raise SystemExit(code)


def _preprocess(argv: list[str]) -> None:
    from fastpost.data.preprocess import main

    raise SystemExit(main(argv))


def _sample(argv: list[str]) -> None:
    from fastpost.sampling import main

    raise SystemExit(main(argv))


def _toy_train(argv: list[str]) -> None:
    from fastpost.toy_train import main

    main(argv)


def _demo(argv: list[str]) -> None:
    from fastpost.demo import main

    main(argv)


COMMANDS = {"train": _train, "preprocess": _preprocess, "sample": _sample, "demo": _demo, "toy-train": _toy_train}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: fastpost {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
