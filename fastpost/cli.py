"""fastpost command line: `fastpost <command> ...`; every command runs under torchrun as well as alone."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _toy_train(argv: list[str]) -> None:
    from fastpost.toy_train import main

    main(argv)


def _demo(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fastpost demo", description="End-to-end CPU demo")
    p.add_argument("--workdir", default="outputs/demo")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--ulysses", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "fastpost.cli", "toy-train", f"--ulysses={args.ulysses}", f"--steps={args.steps}",
        f"--out={os.path.join(args.workdir, 'toy_train_metrics.jsonl')}",
    ]
    print("[demo] parallel core: toy DiT, FSDP2 x Ulysses SP on CPU gloo:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


COMMANDS = {"demo": _demo, "toy-train": _toy_train}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: fastpost {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
