"""fastpost command line: `fastpost <command> ...`; every command runs under torchrun as well as alone."""

from __future__ import annotations

import argparse
import os
import contextlib
import io
import pkgutil
import sys
from typing import Any, Callable

ABOUT = ("fastpost: post-training (LoRA / full finetune, distillation) and sequence-parallel sampling for video "
         "diffusion transformers (FSDP2, Ulysses, diffusers models).")
HELP_HINT = "set them in the --config YAML file or as key=value overrides"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastpost")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from fastpost import __version__

        return __version__


def _recipe_keys() -> str:
    """recipe_args of every recipe in fastpost/recipes/ (each recipe owns a Config dataclass)."""
    import importlib

    import fastpost.recipes
    from fastpost.config import render_keys

    parts = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(fastpost.recipes.__path__)):
        recipe = getattr(importlib.import_module(f"fastpost.recipes.{mod}"), "RECIPE", None)
        if recipe is not None:
            parts.append(render_keys(recipe.Config, f"recipe_args keys with recipe: {mod}", prefix="recipe_args."))
    return "\n\n".join(parts)


def train_keys() -> str:
    from fastpost.config import render_keys
    from fastpost.trainer import TrainConfig

    return render_keys(TrainConfig, f"job-file keys (TrainConfig; {HELP_HINT}):") + "\n\n" + _recipe_keys()


def sample_keys() -> str:
    from fastpost.config import render_keys
    from fastpost.sampling import SampleConfig

    return render_keys(SampleConfig, f"job-file keys (SampleConfig; {HELP_HINT}):")


def preprocess_keys() -> str:
    from fastpost.config import render_keys
    from fastpost.data.preprocess import PreprocessConfig

    return render_keys(PreprocessConfig, f"job-file keys (PreprocessConfig, at the top level or under "
                                         f"'preprocess:'; {HELP_HINT}):")


def _help_with_keys(main: Callable[[list[str]], Any], keys: Callable[[], str]) -> None:
    """Print a command's own argparse help followed by its job-file keys (its parser lives in its module)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["--help"])
    print(buf.getvalue().rstrip() + "\n\n" + keys())
    raise SystemExit(0)


def _wants_help(argv: list[str]) -> bool:
    head = argv[: argv.index("--")] if "--" in argv else argv
    return "-h" in head or "--help" in head


def _say(line: str) -> None:
    """One line on stderr in a single write: every rank of a job may say it at once, and separate writes of the
    text and its newline interleave into one garbled line (seen under torchrun)."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def _train(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fastpost train", description="Train from a job file (torchrun-compatible)",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=train_keys() if _wants_help(argv) else None)
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
        _say(f"fastpost train: error: {e}")
        import torch.distributed as dist

        code = e.code if isinstance(e, JobStop) else EXIT_BAD_INPUT
        if dist.is_initialized():  # a live gloo group at interpreter exit can abort the process (seen: exit -6)
            dist.destroy_process_group()
            # and c10d's store threads still can (seen again: "terminate called without an active exception",
            # exit -6 instead of 3): nothing else is pending here, so leave without interpreter teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise SystemExit(code) from None
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
            _say(f"fastpost train: preempted: {message}")
    elif code != EXIT_OK:
        _say(f"fastpost train: error: {message}")
    if code != EXIT_OK:
        raise SystemExit(code)


def _preprocess(argv: list[str]) -> None:
    from fastpost.data.preprocess import main as preprocess_main
    from fastpost.models import resolve_family

    def main(args: list[str]) -> int:  # the composition root: data gets its family from here, never imports models
        return preprocess_main(args, resolve_family)

    if _wants_help(argv):
        _help_with_keys(main, preprocess_keys)
    raise SystemExit(main(argv))


def _import_pyramid(argv: list[str]) -> None:
    from fastpost.data.pyramid_import import main
    from fastpost.models import get_family

    raise SystemExit(main(argv, get_family))  # the composition root hands data its family


def _preprocess_pyramid(argv: list[str]) -> None:
    from fastpost.data.pyramid_preprocess import main
    from fastpost.models import get_family

    raise SystemExit(main(argv, get_family))


def _sample(argv: list[str]) -> None:
    from fastpost.sampling import main

    if _wants_help(argv):
        _help_with_keys(main, sample_keys)
    raise SystemExit(main(argv))


def _serve(argv: list[str]) -> None:
    from fastpost.serve.main import main

    if _wants_help(argv):
        _help_with_keys(main, sample_keys)
    raise SystemExit(main(argv))


# job kind -> (module, config class); `config show` infers the kind from the top-level keys when not told
JOB_KINDS = {"train": ("fastpost.trainer", "TrainConfig"), "sample": ("fastpost.sampling", "SampleConfig"),
             "preprocess": ("fastpost.data.preprocess", "PreprocessConfig")}


def _job_class(kind: str) -> type:
    import importlib

    module, name = JOB_KINDS[kind]
    return getattr(importlib.import_module(module), name)


def infer_kind(data: dict[str, Any]) -> str:
    """The one job kind whose config accepts every top-level key; train when none or several do."""
    import dataclasses

    if isinstance(data.get("preprocess"), dict):
        return "preprocess"
    fits = [k for k in JOB_KINDS if set(data) <= {f.name for f in dataclasses.fields(_job_class(k))}]
    return fits[0] if len(fits) == 1 else "train"


def resolve_job(path: str, overrides: list[str], kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """(kind, the job with every default filled in), checked as strictly as the command would check it."""
    from fastpost.config import apply_overrides, from_dict, load_yaml, plain

    data = load_yaml(path)
    kind = kind or infer_kind(apply_overrides(dict(data), list(overrides)))
    if kind == "preprocess" and isinstance(data.get("preprocess"), dict):
        data = data["preprocess"]  # as `fastpost preprocess` reads a job file with a preprocess section
    cfg = from_dict(_job_class(kind), apply_overrides(data, list(overrides)))
    job = plain(cfg)
    if kind == "train":  # the recipe's own section, with its defaults, as the trainer will build it
        from fastpost.recipes import get_recipe

        try:
            recipe = get_recipe(cfg.recipe)
        except ValueError as e:
            from fastpost.config import ConfigError

            raise ConfigError(str(e)) from None
        job["recipe_args"] = plain(from_dict(recipe.Config, cfg.recipe_args, where="recipe_args"))
    return kind, job


def _config(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fastpost config", description="Inspect job files.")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the fully resolved job (defaults + overrides) as YAML",
                          description="Print the fully resolved job (every key, defaults filled in, overrides "
                                      "applied, checked like the command would) as YAML.")
    show.add_argument("--config", required=True, help="job file, e.g. configs/cogvideox/lora_debug.yaml")
    show.add_argument("--kind", choices=sorted(JOB_KINDS), default=None,
                      help="the command the job is for (default: inferred from the keys; train if unclear)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    args = p.parse_args(argv)
    import yaml

    from fastpost.config import ConfigError

    try:
        kind, job = resolve_job(args.config, args.overrides, args.kind)
    except ConfigError as e:
        print(f"fastpost config: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    how = "given" if args.kind else "inferred from the keys"
    print(f"# fastpost {kind} job ({how}), resolved from {args.config}")
    print(yaml.safe_dump(job, sort_keys=False, default_flow_style=False).rstrip())


def _toy_train(argv: list[str]) -> None:
    from fastpost.toy_train import main

    main(argv)


def _plan(argv: list[str]) -> None:
    from fastpost.plan import main

    main(argv)


def _demo(argv: list[str]) -> None:
    from fastpost.demo import main

    main(argv)


# name -> (runner, one-line purpose); the order is the order of a project: data, train, sample
COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "preprocess": (_preprocess, "encode captioned videos/images into latent + text-embedding shards"),
    "import-pyramid": (_import_pyramid, "import Pyramid Flow's extracted latents + text features into shards "
                                        "(pyramid_flux)"),
    "preprocess-pyramid": (_preprocess_pyramid, "videos -> pyramid_flux shards: your VAE class (vae_class), T5-128 + "
                                                "CLIP-L pooled"),
    "train": (_train, "train from a job file: LoRA or full finetune, distillation (FSDP2 + Ulysses)"),
    "sample": (_sample, "sample videos from a pipeline, a LoRA or a training checkpoint (Ulysses, CFG parallel)"),
    "serve": (_serve, "a web page over the sampler: rank 0 serves it, every request runs on all ranks (SP x CFG)"),
    "plan": (_plan, "predict a train job's per-GPU memory (weights, optimizer, activations) and what makes it fit"),
    "config": (_config, "`config show --config JOB`: print the fully resolved job (defaults + overrides) as YAML"),
    "demo": (_demo, "end-to-end CPU demo on tiny models: data -> sp=2 LoRA train -> sample -> plots (~2 min)"),
    "toy-train": (_toy_train, "smoke-train the toy DiT under FSDP2 x Ulysses (parallel-core check)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {purpose}" for name, (_, purpose) in COMMANDS.items())
    return (f"usage: fastpost <command> [options]   (under torchrun: torchrun ... -m fastpost.cli <command> ...)\n\n"
            f"{ABOUT}\n\ncommands:\n{rows}\n\noptions:\n  -h, --help  show this help and exit\n"
            f"  --version   print the fastpost version and exit\n\n"
            f"`fastpost <command> --help` lists the command's options and its job-file keys with their defaults.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    if argv and argv[0] == "--version":
        print(f"fastpost {_version()}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\n\nfastpost: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    main()
