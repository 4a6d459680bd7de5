"""Latent shard format: safetensors files holding many samples + one manifest.jsonl.

Layout of a dataset folder:
  manifest.jsonl           line 1: {"type": "header", "format": "fastpost-shards", "version": 1, ...encoding info}
                           then one {"type": "shard", ...} line per *completed* shard
  shard-00000.safetensors  tensors s{i}.latents [C,F,H,W], s{i}.prompt_embeds [T,D], s{i}.prompt_attention_mask [T]
                           and, for image-to-video, the header's conditioning.fields (e.g. s{i}.image_latents
                           [C,1,H,W], the first frame's latent), read into batch["cond"]
  empty_prompt.safetensors the encoding of "" (prompt_embeds [T,D], prompt_attention_mask [T]) with the same text
                           encoder and length: the unconditional branch of guidance and caption dropout
  preprocess_report.json   written by preprocessing (counts, skipped inputs)

Crash safety: a shard is written to a temp file in the same folder, fsynced and os.replace'd into place, and
only then is its manifest line appended (one write under an flock, fsynced). A shard file without a
manifest line is therefore treated as absent, and a torn final manifest line (killed mid-append) is dropped.
Reading is lazy: safe_open memory-maps the file and get_tensor copies out one tensor.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

FORMAT = "fastpost-shards"
VERSION = 1
MANIFEST = "manifest.jsonl"
TENSOR_FIELDS = ("latents", "prompt_embeds", "prompt_attention_mask")
# tensors some families need besides those (pyramid_flux: the CLIP-L pooled prompt [D]); stored when given
OPTIONAL_TENSOR_FIELDS = ("pooled_prompt_embeds",)
_FIX = "rerun preprocessing into this folder (python -m fastpost.data.preprocess ...); completed shards are kept"


class ShardError(RuntimeError):
    """A dataset folder is missing, incomplete or corrupt; the message names the file and the fix."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """temp file in the same folder + fsync + os.replace: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def remove_stale_temp(root: str | Path, name: str) -> list[Path]:
    """Delete temp files a killed writer left for `name` (never visible as data, but they waste disk)."""
    removed = []
    for p in Path(root).glob(f".{name}.tmp*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_shard(root: str | Path, index: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Atomically write samples into shard `index`; return its manifest entry (not yet appended).

    Each sample holds the tensors of TENSOR_FIELDS plus metadata ("caption", "source", "bucket", any other
    JSON-able keys, which are copied into the entry).
    """
    if not samples:
        raise ValueError("write_shard needs at least one sample")
    root = Path(root)
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, sample in enumerate(samples):
        missing = [k for k in TENSOR_FIELDS if k not in sample]
        if missing:
            raise ValueError(f"sample {i} for {shard_name(index)} lacks tensors {missing}")
        # conditioning tensors (image_latents, ...) are stored like the required ones
        fields = [*TENSOR_FIELDS, *(k for k, v in sample.items()
                                    if isinstance(v, torch.Tensor) and k not in TENSOR_FIELDS)]
        record = {k: v for k, v in sample.items() if k not in fields}
        record["key"] = f"s{i}"
        for k in fields:
            t = sample[k].detach().cpu().contiguous()
            tensors[f"s{i}.{k}"] = t
            record[f"{k}_shape"] = list(t.shape)
            record[f"{k}_dtype"] = str(t.dtype).removeprefix("torch.")
        records.append(record)
    data = safetensors_save(tensors, metadata={"format": FORMAT, "version": str(VERSION), "num_samples": str(len(samples))})
    name = shard_name(index)
    remove_stale_temp(root, name)
    atomic_write_bytes(root / name, data)
    return {"type": "shard", "index": index, "file": name, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "samples": records}


EMPTY_PROMPT = "empty_prompt.safetensors"


def write_empty_prompt(root: str | Path, embeds_TD: torch.Tensor, mask_T: torch.Tensor,
                       pooled_D: torch.Tensor | None = None) -> None:
    """Store the encoding of "" next to the manifest (atomically; rewriting it with the same values is harmless)."""
    tensors = {"prompt_embeds": embeds_TD, "prompt_attention_mask": mask_T}
    if pooled_D is not None:
        tensors["pooled_prompt_embeds"] = pooled_D
    data = safetensors_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                            metadata={"format": FORMAT, "prompt": ""})
    atomic_write_bytes(Path(root) / EMPTY_PROMPT, data)


def read_empty_prompt(root: str | Path, with_pooled: bool = False):
    """(prompt_embeds [T,D], prompt_attention_mask [T]) of "" as preprocessing encoded it; with_pooled adds its
    pooled_prompt_embeds [D] (None when the shards have none)."""
    path = Path(root) / EMPTY_PROMPT
    if not path.is_file():
        raise ShardError(f"{path} is missing: the shards were written by an older fastpost, which did not store the "
                         f"encoding of the empty prompt (needed for guidance and caption_dropout); {_FIX}")
    with safe_open(str(path), framework="pt") as f:
        out = (f.get_tensor("prompt_embeds"), f.get_tensor("prompt_attention_mask"))
        if with_pooled:
            out += (f.get_tensor("pooled_prompt_embeds") if "pooled_prompt_embeds" in f.keys() else None,)
        return out


def append_manifest(root: str | Path, entry: dict[str, Any]) -> None:
    """Append one entry line. Ranks append concurrently, so the append is one write under an exclusive flock;
    a torn tail from a killed writer is cut off first so it cannot glue itself onto this line."""
    path = Path(root) / MANIFEST
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            # Walk back to the last newline; anything after it is an interrupted append.
            pos = size
            while pos > 0:
                step = min(4096, pos)
                os.lseek(fd, pos - step, os.SEEK_SET)
                block = os.read(fd, step)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    pos = pos - step + nl + 1
                    break
                pos -= step
            if pos != size:
                os.ftruncate(fd, pos)
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def create_manifest(root: str | Path, header: dict[str, Any]) -> None:
    """Start a new dataset folder: an (atomically written) manifest holding only the header line."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    header = {**header, "type": "header", "format": FORMAT, "version": VERSION}
    atomic_write_bytes(root / MANIFEST, (json.dumps(header, sort_keys=True) + "\n").encode())


def read_manifest(root: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, shard entries sorted by index). A torn final line is ignored: its shard is not complete."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (the folder does not exist)" if not root.exists() else ""
        raise ShardError(
            f"no {MANIFEST} in {str(root)!r}{hint}: this is not a preprocessed shard folder. Create it with "
            f"`python -m fastpost.data.preprocess data=<metadata.jsonl> output_dir={root} vae=<dir> "
            f"text_encoder=<dir>` or point the loader at the folder that holds {MANIFEST}"
        )
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    lines.pop()  # b"" when the file ends with a newline; otherwise a torn append whose shard is not complete
    header, entries = None, {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: line {n} is not valid JSON ({e}); the manifest was edited or damaged; {_FIX}") from None
        if obj.get("type") == "header":
            header = obj
        elif obj.get("type") == "shard":
            entries[obj["index"]] = obj  # a rewritten shard's newer line wins
    if header is None or header.get("format") != FORMAT:
        raise ShardError(f"{path} has no '{FORMAT}' header line; it was not written by fastpost preprocessing; {_FIX}")
    if header.get("version") != VERSION:
        raise ShardError(f"{path} has format version {header.get('version')}, this fastpost reads {VERSION}; re-preprocess")
    return header, [entries[k] for k in sorted(entries)]


@dataclass(frozen=True)
class SampleRef:
    shard: int  # position in ShardDataset.entries
    key: str
    latents_shape: tuple[int, ...]
    caption: str
    source: str
    bucket: str


def cond_fields(header: dict[str, Any]) -> tuple[str, ...]:
    """The conditioning tensors every sample of a shard folder carries (its header's conditioning.fields)."""
    cond = header.get("conditioning")
    return tuple(cond.get("fields", ())) if isinstance(cond, dict) else ()


class ShardDataset:
    """Map-style view over every sample of a shard folder; tensors are read lazily, one sample at a time.
    require: conditioning fields the consumer needs (an image-to-video model's, e.g. ("image_latents",)): a folder
    without them raises ShardError here."""

    def __init__(self, root: str | Path, verify: bool = False, require: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.header, self.entries = read_manifest(self.root)
        self.cond_fields = cond_fields(self.header)
        lacking = [f for f in require if f not in self.cond_fields]
        if lacking:
            raise ShardError(f"the shards in {self.root} carry no {lacking} (conditioning: {list(self.cond_fields)}), "
                             f"which an image-to-video model needs: preprocess the videos again with the I2V model's "
                             f"pipeline (transformer=<its folder>) into a new output_dir, so the first frame is "
                             f"encoded")
        self.fields = (*TENSOR_FIELDS, *self.cond_fields)
        self.verify = verify
        self.samples: list[SampleRef] = [
            SampleRef(si, s["key"], tuple(s["latents_shape"]), s.get("caption", ""), s.get("source", ""),
                      s.get("bucket", ""))
            for si, e in enumerate(self.entries) for s in e["samples"]
        ]
        self._records = [s for e in self.entries for s in e["samples"]]
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def shape_keys(self) -> list[tuple[int, ...]]:
        """Per-sample latent shapes: the bucketing key (samples with equal shapes can be stacked)."""
        return [s.latents_shape for s in self.samples]

    def check_shard_file(self, shard: int, verify: bool | None = None) -> Path:
        """Existence, size (truncation) and optionally sha256 of one shard against its manifest entry."""
        entry = self.entries[shard]
        path = self.root / entry["file"]
        if not path.is_file():
            raise ShardError(f"shard {path} is listed in {self.root / MANIFEST} but missing; {_FIX}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShardError(
                f"shard {path} is truncated or altered: {size} bytes on disk, manifest says {entry['bytes']}; "
                f"delete it and its manifest line, then {_FIX}"
            )
        if (self.verify if verify is None else verify) and shard not in self._verified:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ShardError(
                    f"shard {path} fails its checksum: sha256 {digest[:16]}... != manifest {entry['sha256'][:16]}...; "
                    f"the file is corrupt: delete it and its manifest line, then {_FIX}"
                )
            self._verified.add(shard)
        return path

    def check_sizes(self) -> None:
        """Every shard exists with its manifest size: one stat per shard, so loaders call it when built (a
        truncated shard then fails before training instead of at its first read, deep inside a step)."""
        for i, entry in enumerate(self.entries):
            if entry["file"] is not None:  # a shard whose inputs all failed has no file
                self.check_shard_file(i, verify=False)

    def check_sample(self, i: int) -> None:
        """Everything a read of sample i can fail on, without copying tensors: the file (size, checksum when
        verifying), its header, and each tensor's presence and manifest shape."""
        ref, record = self.samples[i], self._records[i]
        h = self._handle(ref.shard)
        for k in self.fields:
            name = f"{ref.key}.{k}"
            try:
                shape = list(h.get_slice(name).get_shape())
            except Exception as e:
                raise ShardError(f"shard {self.root / self.entries[ref.shard]['file']} has no readable tensor {name!r} ({e}); {_FIX}") from e
            if shape != record[f"{k}_shape"]:
                raise ShardError(
                    f"shard {self.root / self.entries[ref.shard]['file']}: tensor {name} has shape {shape} but "
                    f"the manifest says {record[f'{k}_shape']}; the shard and manifest do not belong together; {_FIX}"
                )

    def verify_all(self) -> None:
        """Check every shard's size and sha256 (reads all bytes once)."""
        for i, entry in enumerate(self.entries):
            if entry["file"] is not None:  # a shard whose inputs all failed has no file
                self.check_shard_file(i, verify=True)

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # forked (e.g. a DataLoader worker): mmaps must be reopened per process
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            path = self.check_shard_file(shard)
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise ShardError(f"shard {path} cannot be opened ({e}); delete it and its manifest line, then {_FIX}") from e
            self._handles[shard] = h
        return h

    def __getitem__(self, i: int) -> dict[str, Any]:
        ref, record = self.samples[i], self._records[i]
        h = self._handle(ref.shard)
        out: dict[str, Any] = {"caption": ref.caption, "source": ref.source, "bucket": ref.bucket}
        for k in [*self.fields, *(k for k in OPTIONAL_TENSOR_FIELDS if f"{k}_shape" in record)]:
            name = f"{ref.key}.{k}"
            try:
                t = h.get_tensor(name)
            except Exception as e:
                raise ShardError(f"shard {self.root / self.entries[ref.shard]['file']} has no readable tensor {name!r} ({e}); {_FIX}") from e
            if list(t.shape) != record[f"{k}_shape"]:
                raise ShardError(
                    f"shard {self.root / self.entries[ref.shard]['file']}: tensor {name} has shape {list(t.shape)} but "
                    f"the manifest says {record[f'{k}_shape']}; the shard and manifest do not belong together; {_FIX}"
                )
            out[k] = t
        return out

    def close(self) -> None:
        self._handles.clear()
