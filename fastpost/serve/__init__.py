"""`fastpost serve`: a web page over the sequence-parallel sampler (gradio, the optional extra `.[serve]`).

    torchrun --standalone --nproc_per_node=2 -m fastpost.cli serve --config configs/cogvideox/sample_debug.yaml \
        parallel.ulysses=2 --lora-dir loras/

The parts, lowest first:
  paths.py   what a request may name: LoRA folders and images, confined to --lora-dir / --image-dir
  engine.py  the request loop: rank 0 broadcasts each request, every rank samples it (VideoSampler.with_settings),
             bad requests fail alike everywhere before any sampling collective, a lost rank stops the server
  app.py     the gradio page (rank 0 only; imports gradio)
  main.py    the command: arguments, process group, Engine, the page on rank 0, exit codes
"""

from fastpost.serve.engine import Engine, Request, WorkerLost
from fastpost.serve.main import main

__all__ = ["Engine", "Request", "WorkerLost", "main"]
