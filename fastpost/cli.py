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
    from fastpost.config import ConfigError, load_config
    from fastpost.data.shards import ShardError
    from fastpost.trainer import TrainConfig, Trainer

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:  # bad input (job file, overrides, shard folder): one line naming it and the fix, exit 2
        trainer = Trainer(load_config(TrainConfig, args.config, overrides))
    except (ConfigError, ShardError) as e:
        print(f"fastpost train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        trainer.fit()
    finally:
        trainer.close()


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
