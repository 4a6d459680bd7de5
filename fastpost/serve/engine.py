"""The request loop of `fastpost serve`: rank 0 takes requests from the page, every rank samples each one.

Every rank builds one VideoSampler at start (the model, SP processors, process groups; collective) and then loops:

    rank 0                                       other ranks
    job = inbox.get(timeout=heartbeat)           msg = broadcast from rank 0   (waits for the next message)
    broadcast ("run", request) / ("ping",)
    ---- both: settle(request) locally: the request's config, geometry, sampler, LoRA switch (+ prompt
         embeddings on rank 0), then agree: all_gather of the errors; any error -> every rank skips the request
    ---- both: embeddings broadcast, the denoising loop on the whole SP x CFG layout (VideoSampler.generate)
    rank 0: VAE decode, mp4 + json (+ latents)   back to waiting

Containment: a bad request fails in `settle`, the same way on every rank, before any sampling collective, and the
next request works. A collective that fails (a rank died: gloo reports the closed connection; a rank hung: the
process-group timeout `parallel.timeout_s`) is fatal: rank 0 marks the engine dead (the page says so) and
`fastpost serve` exits non-zero. While idle, rank 0 sends a ping (broadcast + barrier) every `heartbeat_s`, so
the waiting ranks never sit in one collective longer than the timeout, and a dead rank is noticed while idle.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from fastpost.config import ConfigError
from fastpost.lora import LORA_FILE
from fastpost.sampling import SampleConfig, SampleError, VideoSampler
from fastpost.sampling.mesh import broadcast_tensor
from fastpost.sampling.writer import output_stem, write_json, write_tensor, write_video
from fastpost.serve.paths import confined

ADAPTER = "serve"  # the one adapter name the live model carries while a LoRA is selected


@dataclass
class Request:
    """One page submission: what a user may change. Everything else comes from the job file."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    height: int
    width: int
    num_frames: int
    sampler: str
    lora: str | None = None  # a folder relative to --lora-dir; None or "": no LoRA
    lora_scale: float = 1.0
    image: str | None = None  # a file relative to --image-dir (families conditioned on "image")

    def checked(self) -> "Request":
        """Types as the sampler needs them (page widgets send floats); SampleError naming the field otherwise."""
        out = copy.copy(self)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("steps", "seed", "height", "width", "num_frames"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
                    raise SampleError(f"{f.name} must be a whole number, got {v!r}")
                setattr(out, f.name, int(v))
            elif f.name in ("guidance_scale", "lora_scale"):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise SampleError(f"{f.name} must be a number, got {v!r}")
                setattr(out, f.name, float(v))
        if not isinstance(out.prompt, str) or not out.prompt.strip():
            raise SampleError("the prompt is empty: type what the video should show")
        if out.steps < 1:
            raise SampleError(f"steps must be >= 1, got {out.steps}")
        if not 0 <= out.seed < 2 ** 63:
            raise SampleError(f"seed must be in [0, 2^63), got {out.seed}")
        out.lora = out.lora or None
        out.image = out.image or None
        return out


class WorkerLost(RuntimeError):
    """A collective failed: a rank died or hung. The ranks are out of step; the server must stop."""


@dataclass
class Job:
    request: Request
    events: queue.Queue  # ("step", done, total) ... then ("done", result) or ("error", message)

    def progress(self, done: int, total: int) -> None:
        self.events.put(("step", done, total))


class Engine:
    """Collective: every rank constructs it with the same config. `lora_dir` / `image_dir` bound what requests may
    name; outputs go to `out_dir` (rank 0)."""

    def __init__(self, cfg: SampleConfig, lora_dir: str | None, image_dir: str | None, out_dir: Path,
                 heartbeat_s: float | None = None):
        if cfg.model.lora is not None:
            raise SampleError("fastpost serve switches LoRAs per request from --lora-dir; remove model.lora from "
                              "the job (model.checkpoint is fused in at start as usual)")
        self.base = VideoSampler(cfg)
        if self.base.replicas != 1:
            c, u = cfg.parallel.cfg, cfg.parallel.ulysses
            raise SampleError(f"fastpost serve runs every request on all ranks: launch parallel.cfg x "
                              f"parallel.ulysses = {c * u} processes, not {self.base.dims.world_size}")
        self.cfg, self.rank = cfg, self.base.rank
        self.lora_dir, self.image_dir, self.out_dir = lora_dir, image_dir, Path(out_dir)
        self.world = self.base.dims.world_size
        # a ping well inside the collective timeout: the waiting ranks' broadcast never times out while idle
        self.heartbeat_s = heartbeat_s or min(30.0, cfg.parallel.timeout_s / 4)
        self.lora: tuple[str, float] | None = None  # (resolved folder, its file's mtime) of the loaded adapter
        self.encoder = None
        if self.rank == 0:  # kept loaded: every request encodes its prompts (VideoSampler frees its own copy)
            from fastpost.data.text import TextEncoder

            self.encoder = TextEncoder.from_pretrained(self.base.text_dir, family=self.family, device=self.device,
                                                       dtype=self.base.dtype, allow_pickle=cfg.model.allow_pickle)
        self.inbox: queue.Queue = queue.Queue()
        self.dead: str | None = None  # why the workers are gone (rank 0); the page shows it
        self.busy = False
        self.current: Job | str | None = None  # what lead() is doing (rank 0): answered if the process is stopped
        self.count = 0  # requests run, numbering the outputs
        self.history: list[dict[str, Any]] = []  # finished results since start (rank 0), oldest first
        self._lock = threading.Lock()

    @property
    def family(self):
        return self.base.family

    @property
    def device(self):
        return self.base.device

    # ---- what the page needs to draw its controls -----------------------------------------------------------------
    def defaults(self) -> Request:
        c, b = self.cfg, self.base
        return Request(prompt=c.prompt or "", negative_prompt=c.negative_prompt, steps=b.steps,
                       guidance_scale=b.guidance, seed=c.seed, height=b.geometry.height, width=b.geometry.width,
                       num_frames=b.geometry.num_frames, sampler=b.sampler_name, lora=None,
                       lora_scale=c.model.lora_scale)

    def limits(self) -> dict[str, Any]:
        """Multiples the model accepts, and why (the same rules resolve_geometry enforces)."""
        fam, b = self.family, self.base
        spatial, temporal = fam.vae_factors(b.vae_config)
        _, p, _ = fam.patch_sizes(b.model.config)
        return {"multiple": spatial * p, "temporal": temporal,
                "size_reason": f"a multiple of {spatial * p} (VAE spatial factor {spatial} x patch size {p})",
                "frames_reason": f"{temporal}k+1 frames (the {b.vae_config['_class_name']} VAE compresses time "
                                 f"{temporal}x and keeps the first frame)"}

    def samplers(self) -> list[str]:
        """Registered samplers that can drive this family (the others raise when built)."""
        from fastpost.sampling.samplers import SAMPLERS, build_sampler

        ok = []
        for name in sorted(SAMPLERS):
            try:
                build_sampler(name, {}, self.base._sampler_ctx(0))
                ok.append(name)
            except (ValueError, ConfigError):
                pass
        return ok

    def takes_image(self) -> bool:
        return self.base.takes_image  # the transformer's own config says (family.takes_image)

    # ---- every rank: one request ------------------------------------------------------------------------------------
    def _request_config(self, req: Request) -> SampleConfig:
        cfg = copy.deepcopy(self.cfg)
        cfg.prompt, cfg.prompt_file, cfg.negative_prompt = req.prompt, None, req.negative_prompt
        cfg.steps, cfg.guidance_scale, cfg.seed = req.steps, req.guidance_scale, req.seed
        cfg.height, cfg.width, cfg.num_frames, cfg.sampler = req.height, req.width, req.num_frames, req.sampler
        # the job's sampler_args belong to the job's sampler; another one runs with its own defaults
        cfg.sampler_args = dict(self.cfg.sampler_args) if req.sampler == self.base.sampler_name else {}
        cfg.model.lora = str(confined(self.lora_dir, req.lora, "LoRA")) if req.lora else None
        cfg.model.lora_scale = req.lora_scale
        if req.image is not None:
            if not self.takes_image():
                raise SampleError(f"model family {self.family.name!r} is not conditioned on an image; leave "
                                  f"the image empty")
            image = confined(self.image_dir, req.image, "image")
            if not image.is_file():
                raise SampleError(f"image {req.image!r} is not a file in the image folder")
            if not any(f.name == "image" for f in fields(cfg)):
                raise SampleError("this sampler build has no image input (SampleConfig.image)")
            cfg.image = str(image)
        return cfg

    def _use_lora(self, folder: str | None, scale: float) -> None:
        """Switch the live model's adapter; the base weights are never touched (peft adds the adapter beside
        them, unfused, so removing it restores the base exactly, and no reload is needed)."""
        model = self.base.model
        key = None
        if folder is not None:
            f = Path(folder) / LORA_FILE
            if not f.is_file():
                raise SampleError(f"LoRA folder {folder!r} holds no readable {LORA_FILE}")
            key = (folder, f.stat().st_mtime)
        if key != self.lora and self.lora is not None:
            model.delete_adapters([ADAPTER])
            self.lora = None
        if key is not None and self.lora is None:
            try:
                model.load_lora_adapter(folder, prefix="transformer", weight_name=LORA_FILE, adapter_name=ADAPTER)
            except Exception as e:  # a corrupt file or one for another model: safetensors / peft / shape errors
                if ADAPTER in getattr(model, "peft_config", {}):
                    model.delete_adapters([ADAPTER])
                raise SampleError(f"LoRA folder {folder!r} could not be loaded into {type(model).__name__}: "
                                  f"{type(e).__name__}: {e}") from None
            self.lora = key
        if key is not None:
            model.set_adapters([ADAPTER], weights=[scale])

    def _settle(self, req: Request):
        """Local checks and preparation; returns (view, embeddings on rank 0) or raises SampleError."""
        req = req.checked()
        cfg = self._request_config(req)
        view = self.base.with_settings(cfg, None, None)
        self._use_lora(cfg.model.lora, req.lora_scale)
        embeds = None
        if self.rank == 0:
            embeds = [*self.encoder.encode([req.prompt], self.base.text_length)]
            if view.guidance > 1:
                embeds += [*self.encoder.encode([req.negative_prompt], self.base.text_length)]
        return view, embeds

    def execute(self, req: Request, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any] | None:
        """Collective over every rank. Rank 0 returns the written files and metadata; SampleError for a bad
        request (on every rank alike); WorkerLost when a collective fails."""
        error, view, embeds = None, None, None
        try:
            view, embeds = self._settle(req)
        except (SampleError, ConfigError, ValueError) as e:
            error = str(e)
        errors = [error]
        if self.world > 1:
            try:
                errors = [None] * self.world
                dist.all_gather_object(errors, error)
            except Exception as e:  # noqa: BLE001 (any failure of a collective is a lost worker)
                raise WorkerLost(f"{type(e).__name__}: {e}") from None
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            if self.lora is not None:  # no adapter anywhere: the same state on every rank
                self.base.model.delete_adapters([ADAPTER])
                self.lora = None
            raise SampleError(failed)
        t0 = time.perf_counter()
        try:
            n = 4 if view.guidance > 1 else 2
            t = embeds if self.world == 1 else [broadcast_tensor(embeds[i] if self.rank == 0 else None, None,
                                                                 self.device) for i in range(n)]
            view.cond, view.uncond = (t[0], t[1]), ((t[2], t[3]) if n == 4 else None)
            latents = view.generate(0, on_step if self.rank == 0 else None)
        except Exception as e:  # noqa: BLE001
            raise WorkerLost(f"{type(e).__name__}: {e}") from None
        if self.rank != 0:
            return None
        return self._write(req, view, latents, t0)

    def _write(self, req: Request, view: VideoSampler, latents: torch.Tensor, t0: float) -> dict[str, Any]:
        t1 = time.perf_counter()
        frames = view.decode(latents)[0]
        self.base.vae = view.vae  # loaded on first use by the view; kept for the next request
        t2 = time.perf_counter()
        stem = output_stem(self.count, req.prompt)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"video": self.out_dir / f"{stem}.mp4", "metadata": self.out_dir / f"{stem}.json"}
        if view.cfg.save_latents:
            paths["latents"] = self.out_dir / f"{stem}.latents.pt"
            write_tensor(paths["latents"], latents)
        fps = view.cfg.fps or view.facts.fps
        write_video(paths["video"], frames, fps)
        meta = view.metadata(0, frames, {"denoise": t1 - t0, "decode": t2 - t1, "total": time.perf_counter() - t0})
        meta.update(video=paths["video"].name, latents=paths.get("latents") and paths["latents"].name,
                    request=asdict(req.checked()), request_index=self.count)
        write_json(paths["metadata"], meta)
        result = {"video": str(paths["video"]), "metadata": str(paths["metadata"]), "meta": meta,
                  "request": asdict(req.checked())}
        self.history.append(result)
        return result

    # ---- the loops ------------------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            box = [msg]
            dist.broadcast_object_list(box, src=0)
            if msg[0] == "ping":  # a round trip: a dead rank fails it even if the broadcast's sends were buffered
                dist.barrier()
        except Exception as e:  # noqa: BLE001
            raise WorkerLost(f"{type(e).__name__}: {e}") from None

    def submit(self, req: Request) -> Job:
        """From the page's threads (rank 0): queue a request; read its events from the returned Job."""
        job = Job(req, queue.Queue())
        if self.dead:
            job.events.put(("error", self.dead))
        else:
            self.inbox.put(job)
        return job

    def lead(self) -> int:
        """Rank 0's loop (the main thread; the page runs in other threads). 0 after stop(), 1 when a worker is
        lost (every queued job is answered with the reason first)."""
        while True:
            try:
                job = self.current = self.inbox.get(timeout=self.heartbeat_s)
            except queue.Empty:
                job = self.current = None
            try:
                if job is None:
                    if self.world > 1:
                        self._send(("ping",))
                    continue
                if job == "stop":
                    if self.world > 1:
                        self._send(("stop",))
                    return 0
                if self.world > 1:
                    self._send(("run", asdict(job.request)))
                self.busy = True
                try:
                    job.events.put(("done", self.execute(job.request, job.progress)))
                    self.count += 1
                except SampleError as e:
                    job.events.put(("error", str(e)))
                except WorkerLost:
                    raise
                except Exception as e:  # noqa: BLE001 (decode / write on rank 0: this request only)
                    job.events.put(("error", f"{type(e).__name__}: {e}"))
                finally:
                    self.busy = False
            except WorkerLost as e:
                self.fail_all(f"a sampling worker process is gone ({e}); fastpost serve is stopping. Check the "
                              f"other ranks' logs, then restart it.", job)
                return 1

    def fail_all(self, reason: str, current: Job | None = None) -> None:
        """Mark the server stopped and answer the running request (if any) and all queued ones with `reason`."""
        self.dead = reason
        if isinstance(current, Job):
            current.events.put(("error", reason))
        while True:
            try:
                pending = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(pending, Job):
                pending.events.put(("error", reason))

    def stop(self) -> None:
        self.inbox.put("stop")

    def follow(self) -> int:
        """The loop of every other rank: run what rank 0 broadcasts. 0 on stop; WorkerLost when rank 0 is gone."""
        while True:
            box = [None]
            try:
                dist.broadcast_object_list(box, src=0)
                if box[0][0] == "ping":
                    dist.barrier()
            except Exception as e:  # noqa: BLE001
                raise WorkerLost(f"rank 0 is gone: {type(e).__name__}: {e}") from None
            kind = box[0][0]
            if kind == "stop":
                return 0
            if kind == "run":
                try:
                    self.execute(Request(**box[0][1]))
                except SampleError:
                    pass  # rank 0 reports it to the page
