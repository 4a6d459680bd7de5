"""`fastpost serve --config <sample job>`: every rank builds the sampler; rank 0 serves the page, the others follow.

Exit codes: 0 after Ctrl-C (every rank told to stop), 1 when a rank was lost (the page says so for a few seconds
first), 2 for a bad job (one line on stderr, as `fastpost sample`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

from fastpost.config import ConfigError, load_config
from fastpost.sampling import SampleConfig, SampleError
from fastpost.serve.engine import Engine, WorkerLost

LOCAL = "127.0.0.1"
LINGER_S = 3.0  # after a lost rank the page stays up this long, so open pages show why before the server goes
DEFAULT_PROMPT = "a red ball bouncing on a wooden floor"  # the page's first prompt when the job names none


class _Terminated(Exception):
    """SIGTERM, raised in the main thread (the launcher is stopping the job)."""


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="fastpost serve", description="A web page over the sampler (torchrun-compatible;"
                                " every request runs on all ranks). Needs the extra: pip install -e '.[serve]'")
    p.add_argument("--config", required=True, help="sample job file, e.g. configs/cogvideox/sample_debug.yaml")
    p.add_argument("--host", default=LOCAL, help="address to listen on (default 127.0.0.1: this machine only). "
                   "0.0.0.0 lets anyone who reaches the port run the GPUs; there is no login (docs/serve.md)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--lora-dir", default=None, help="folder of LoRA folders (pytorch_lora_weights.safetensors); "
                   "requests can name only what is inside it")
    p.add_argument("--image-dir", default=None, help="folder of input images for image-conditioned (I2V) families; "
                   "requests can name only what is inside it")
    p.add_argument("--output-dir", default=None, help="where videos go (default <output_dir>/serve_<start time>)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the job, e.g. parallel.ulysses=2")
    args = p.parse_args(argv)
    cfg = load_config(SampleConfig, args.config, list(args.overrides))
    if cfg.prompt is None:  # the job's prompt is only the page's first value; requests bring their own
        cfg.prompt, cfg.prompt_file = DEFAULT_PROMPT, None
    for name in ("lora_dir", "image_dir"):
        folder = getattr(args, name)
        if folder is not None and not Path(folder).is_dir():
            raise SampleError(f"--{name.replace('_', '-')} {folder!r} is not a folder")
    if args.output_dir is None:
        args.output_dir = str(Path(cfg.output_dir) / time.strftime("serve_%Y%m%d-%H%M%S"))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    from fastpost.distributed.parallel_dims import init_distributed

    created = False
    try:
        cfg, args = parse_args(argv)
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:  # before any collective: a missing extra is a one-line error, not a hang of the others
            try:
                import gradio  # noqa: F401
            except ImportError:
                raise SampleError("fastpost serve needs gradio: pip install -e '.[serve]'") from None
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
            init_distributed(timeout_s=cfg.parallel.timeout_s)
            created = True
        engine = Engine(cfg, args.lora_dir, args.image_dir, Path(args.output_dir))
    except (SampleError, ConfigError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"fastpost serve: error: {e}", file=sys.stderr)
        if created:
            dist.destroy_process_group()
        return 2
    if engine.rank != 0:
        try:
            code = engine.follow()
        except WorkerLost as e:
            print(f"fastpost serve (rank {engine.rank}): {e}", file=sys.stderr, flush=True)
            os._exit(1)  # the group is broken: tearing it down could wait on the lost rank
    else:
        code = _lead(engine, args)
    if created and dist.is_initialized():
        dist.destroy_process_group()
    return code


def _lead(engine: Engine, args) -> int:
    from fastpost.serve.app import build_app

    demo = build_app(engine)
    demo.queue(max_size=64)
    # allowed_paths: the page may hand out the outputs; nothing else outside gradio's own cache is served
    demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True, share=False,
                allowed_paths=[str(Path(args.output_dir).resolve())], show_error=True)
    if args.host != LOCAL:
        print(f"fastpost serve: WARNING: listening on {args.host}: anyone who can reach port {args.port} can run "
              f"this model and download its outputs (no login); see docs/serve.md", file=sys.stderr, flush=True)
    print(f"fastpost serve: ready on http://{args.host}:{args.port} ({engine.world} rank(s)); outputs in "
          f"{args.output_dir}", file=sys.stderr, flush=True)
    def terminated(signum, frame):
        raise _Terminated()

    # torchrun stops the other ranks with SIGTERM when one dies: answer the page first instead of vanishing
    signal.signal(signal.SIGTERM, terminated)
    try:
        code = engine.lead()
    except KeyboardInterrupt:
        code = 0
        if engine.world > 1:
            try:
                engine._send(("stop",))
            except WorkerLost:
                code = 1
    except _Terminated:
        code = 1
        engine.fail_all("fastpost serve got SIGTERM and is stopping (under torchrun: another rank died, or the job "
                        "was cancelled); restart it", engine.current)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the linger below is the stop already under way
    if code != 0:
        print(f"fastpost serve: error: {engine.dead}", file=sys.stderr, flush=True)
        time.sleep(LINGER_S)
        demo.close()
        os._exit(code)  # the group is broken: tearing it down could wait on the lost rank
    demo.close()
    return code
