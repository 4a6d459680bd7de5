"""Loading files from other people without running their code: no general-purpose unpickling anywhere.

Pickle executes whatever callables a file names, so a checkpoint folder or model folder from someone else could
run arbitrary code at `--resume` or at model load. Three doors are closed here:

  * Per-rank extra state (step, RNG, LR scheduler, loader position) is written as one safetensors file: tensors
    as tensors, everything else as JSON in the safetensors header (`save_state` / `load_state`). No pickle.
  * DCP checkpoints: torch's FileSystemReader reads `.metadata` with a plain `pickle.load`, and DCP's default
    load planner reads non-tensor items (e.g. optimizer hyper-parameters) with `torch.load(weights_only=False)`.
    `SafeFileSystemReader` unpickles the metadata with an allowlist of the classes DCP metadata is made of;
    `SafeLoadPlanner` reads the non-tensor items with `weights_only=True`. `dcp_load(state, path)` uses both.
  * Pipeline components: `pretrained_kwargs(folder, allow_pickle)` makes from_pretrained take safetensors only,
    and refuses a pickle-only (`.bin`) folder unless the job opts in with `model.allow_pickle: true`.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from fastpost.config import ConfigError


class UnsafeFileError(ConfigError):
    """A file that would need unrestricted unpickling (or is not the expected format): refused, never executed.

    A ConfigError, so the commands report it as one line naming the file and exit 2."""


# ---- extra state: tensors + JSON in one safetensors file -------------------------------------------------------
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_META_KEY = "fastpost_state"


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # clone: safetensors refuses tensors that share storage; detach/cpu: state may live on the accelerator
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: _encode(v, f"{where}.{k}" if where else k, tensors) for k, v in obj.items()}
        # non-string keys (e.g. int) or keys that look like our tags: keep them typed, as a list of pairs
        return {_ITEMS: [[_encode(k, f"{where} key", tensors), _encode(v, f"{where}[{k!r}]", tensors)]
                         for k, v in obj.items()]}
    raise TypeError(f"checkpoint state {where or '<root>'!r} is a {type(obj).__name__}; only None, bool, int, float, "
                    f"str, tensors and lists/tuples/dicts of them are saved (pickle is not used)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_ITEMS}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` (nested dicts/lists/tuples of scalars, strings and tensors) to one safetensors file,
    atomically (a .part file renamed into place after fsync)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(state, "", tensors))
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(save(tensors, metadata={_META_KEY: meta}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a file written by save_state. Anything else (a pickle, a foreign safetensors file) is refused."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            if meta is None:
                raise ValueError(f"no {_META_KEY!r} entry in its header")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(json.loads(meta), tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise UnsafeFileError(f"{str(path)!r} is not a fastpost state file ({e}); it was not loaded. Checkpoint "
                              f"state is read only from safetensors + JSON; re-create the checkpoint with this "
                              f"fastpost") from None


# ---- DCP: metadata through an allowlist unpickler, non-tensor items with weights_only ----------------------------
def _dcp_allowed() -> dict[tuple[str, str], Any]:
    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    import torch.serialization

    allowed: dict[tuple[str, str], Any] = {}
    for mod in (dcp_md,):  # the metadata dataclasses and enums, nothing imported into that module
        for name, value in vars(mod).items():
            if isinstance(value, type) and value.__module__ == mod.__name__:
                allowed[(mod.__name__, name)] = value
    allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    # TensorProperties pickles its layout as torch.serialization._get_layout("torch.strided"): a name lookup
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    # checkpoint_id is a path; constructing a path object touches no file
    for cls in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path,
                pathlib.PosixPath, pathlib.WindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    for cls in (set, frozenset, complex, slice, range):
        allowed[("builtins", cls.__name__)] = cls
    import collections

    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata") from None


def read_dcp_metadata(path: str | Path):
    """Unpickle a DCP `.metadata` file allowing only DCP's metadata classes, torch.Size, dtypes and builtins."""
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _dcp_allowed()
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f).load()
        except Exception as e:  # any failure means the file is not what DCP writes: refuse it, say why
            raise UnsafeFileError(f"DCP metadata {str(path)!r} was refused ({type(e).__name__}: {e}); only DCP's "
                                  f"own metadata classes are unpickled, so a file naming anything else is never "
                                  f"loaded") from None


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with the `.metadata` pickle read through the allowlist unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # what the parent does after unpickling
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items (stored as pickled bytes) are read with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a paragraph; its "Unsupported global" line names the offending callable
            lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln] or ["not weights-only"]
            raise UnsafeFileError(f"checkpoint item {read_item.dest_index.fqn!r} was refused: it needs unrestricted "
                                  f"unpickling ({lines[0]})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner does

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load_kwargs(path: str | Path) -> dict[str, Any]:
    """Keyword arguments for dcp.load that read `path` without unrestricted unpickling."""
    return {"storage_reader": SafeFileSystemReader(str(path)), "planner": SafeLoadPlanner()}


def dcp_load(state: dict[str, Any], path: str | Path) -> None:
    """dcp.load(state, path) without unrestricted unpickling; a refused file raises UnsafeFileError itself.

    DCP folds reader errors into a CheckpointException (or a generic metadata error), so the metadata is checked
    here first, and a refused item is unwrapped from the CheckpointException."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(Path(path) / ".metadata")
    try:
        dcp.load(state, **dcp_load_kwargs(path))
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, UnsafeFileError):
                raise exc from None
        raise


# ---- pipeline components: safetensors unless the job opts in ---------------------------------------------------
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _component_dirs(folder: Path, subfolder: str | None) -> list[Path]:
    if subfolder:
        return [folder / subfolder]
    if (folder / "model_index.json").is_file():  # a whole pipeline: every component that has weights
        return sorted(p for p in folder.iterdir() if p.is_dir())
    return [folder]


def pretrained_kwargs(folder: str | Path, allow_pickle: bool = False, subfolder: str | None = None) -> dict[str, Any]:
    """from_pretrained kwargs for a diffusers/transformers component; raises on a pickle-only folder.

    Safetensors only by default. A local folder (or a pipeline folder's `subfolder`) whose weights exist only as
    pickles (.bin/.pt/...) is refused unless `allow_pickle`; then diffusers' own choice applies (safetensors
    first, pickles as a fallback). A hub id cannot be checked here: from_pretrained enforces safetensors itself."""
    folder = Path(folder)
    if allow_pickle:
        return {"use_safetensors": None}
    if folder.is_dir():
        for comp in _component_dirs(folder, subfolder):
            if not comp.is_dir():
                continue
            files = [p.name for p in comp.iterdir() if p.is_file()]
            if any(f.endswith(".safetensors") for f in files):
                continue
            pickled = sorted(f for f in files if f.endswith(_PICKLE_WEIGHTS))
            if pickled:
                raise UnsafeFileError(
                    f"{str(comp)!r} has weights only as pickle ({', '.join(pickled)}), which can run code when "
                    f"loaded; convert them to safetensors, or set model.allow_pickle: true if you trust the folder")
    return {"use_safetensors": True}
