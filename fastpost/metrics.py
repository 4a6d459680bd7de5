"""Training metrics: DTensor-aware gradient clipping, peak memory, and a rank-0 logger (console, jsonl, tb, wandb)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.tensor import DTensor


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (all shards, all ranks), clipped to max_norm if max_norm > 0. Returned as
    a device tensor: reading it is a host sync, which the trainer does only on logging steps.

    Under FSDP the gradients are DTensor shards: the norm of the local shards is reduced over the mesh by
    `full_tensor()`, so every rank clips with the same global norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        p = params[0].to_local() if isinstance(params[0], DTensor) else params[0]
        return torch.zeros((), device=p.device)
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (peak RSS)


class MetricsLogger:
    """Rank 0 writes <out>/metrics.jsonl and <out>/config.yaml, prints a progress bar or lines, and optionally
    logs to tensorboard / wandb. Other ranks do nothing."""

    def __init__(self, out_dir: Path, cfg: Any, rank: int, config: dict[str, Any], total_steps: int | None = None):
        self.cfg, self.enabled = cfg, rank == 0
        self.total = total_steps if total_steps is not None else config.get("steps")
        self.t0 = time.perf_counter()
        self._tb = self._wandb = self._bar = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.file = open(out_dir / "metrics.jsonl", "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("logging.tensorboard=true needs `pip install tensorboard`") from e
            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs `pip install wandb`") from e
            self._wandb = wandb.init(project=cfg.wandb_project, config=config, dir=str(out_dir))
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        dt = metrics.get("step_time_s", 0.0)
        if dt > 0 and "samples" in metrics:
            metrics["samples_per_s"] = metrics["samples"] / dt
            metrics["tokens_per_s"] = metrics.get("tokens", 0) / dt
        record = {"step": step, "time_s": round(time.perf_counter() - self.t0, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.update(1)
            if "loss" in metrics:
                self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}")
        elif step % self.cfg.every_steps == 0 or step == self.total:
            parts = [f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "grad_norm", "samples_per_s",
                                                                         "tokens_per_s", "peak_mem_mib", "skipped")]
            print(f"[train] step {step}/{self.total} " + " ".join(parts), flush=True)

    def log_video(self, tag: str, frames_FHWC, step: int, fps: int, path: Path | None = None) -> None:
        """A uint8 [F, H, W, 3] video to tensorboard (add_video; an animated GIF image summary) and wandb."""
        if not self.enabled:
            return
        if self._tb is not None:
            try:
                import moviepy  # noqa: F401  (add_video needs it to encode; without it, it logs nothing)

                video = torch.from_numpy(frames_FHWC).permute(0, 3, 1, 2)[None]  # [N, T, C, H, W]
                self._tb.add_video(tag, video, step, fps=fps)
            except ImportError:
                self._tb._get_file_writer().add_summary(_gif_summary(tag, frames_FHWC, fps), step)
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            video = wandb.Video(str(path), fps=fps) if path is not None else \
                wandb.Video(frames_FHWC.transpose(0, 3, 1, 2), fps=fps)
            self._wandb.log({tag: video}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _gif_summary(tag: str, frames_FHWC, fps: int):
    """What SummaryWriter.add_video writes (an image summary holding an animated GIF), encoded with Pillow
    instead of moviepy."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(f) for f in frames_FHWC]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    _, h, w, c = frames_FHWC.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])
