"""THE model builder: every model fastpost runs (trained model, teacher, EMA target, critic, sampler, export)
is made here, in one fixed order:

  1. construct   pretrained: on the meta device (no memory; buffers stay real), config from the checkpoint
                 no pretrained: seeded random init from the family's flavor (tiny models, tests, docs)
  2. LoRA        injected before sharding (FSDP must see the final parameter set); its init is real and seeded
     storage     model.storage_dtype: the frozen block linears stored in float8/bf16 (fastpost/storage.py)
  3. SP          the family's sequence-parallel processors and split/gather hooks
  4. AC          activation checkpointing of the blocks
  4b. compile    torch.compile of each block (regional, in place; `compile.enabled`)
  5. FSDP2       per block, then the root, over the dp_shard x sp mesh (skipped with shard=False)
  6. load        each rank reads only its own slice of every tensor from the safetensors files (mmap'd); no
                 rank ever holds the whole model unless it is unsharded
     offload     one GPU: frozen block weights to pinned host memory (distributed/offload.py; its forward wrapper
                 goes on before AC so the recompute streams too; the weights are loaded on the host)

Peak host memory per rank is therefore ~ its shard of the model in `dtype` plus one tensor in flight
(benchmarks/bench_load_memory.py measures it).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastpost.distributed.activation_checkpoint import ACConfig, apply_activation_checkpointing
from fastpost.distributed.compile import CompileConfig, apply_compile
from fastpost.distributed.fsdp import DTYPES, FSDPConfig, apply_fsdp
from fastpost.distributed.offload import ActivationOffloader, BlockOffloader, OffloadConfig, checkpoint_offloaded
from fastpost.storage import apply_storage

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLED = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


class BuildError(ValueError):
    """A checkpoint that does not fit the model (missing folder, keys, shapes): the message names the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build. `pretrained` is a diffusers pipeline dir (with transformer/) or a transformer dir."""

    pretrained: str | None = None
    flavor: str | None = None  # random init only: the family's config of that name
    init_seed: int = 0  # random init (and LoRA init): identical on every rank
    dtype: str = "float32"  # the dtype the weights are stored in (FSDP's param_dtype may compute lower)
    variant: str | None = None  # diffusers weight variant, e.g. "fp16" -> diffusion_pytorch_model.fp16.safetensors
    lora: Any = None  # a fastpost.lora.LoRAConfig with enabled=True, or None
    # more named LoRA adapters on the same base, ((name, LoRAConfig), ...), inactive until switched to with
    # fastpost.lora.set_active_adapter (a DMD2 critic sharing the student's frozen base)
    extra_adapters: tuple = ()
    trainable: bool = True  # False: frozen (teacher, target, sampler); FSDP then reshards every unit after forward
    allow_pickle: bool = False  # accept pickled .bin weights (can run code from the file: opt-in)
    # one expert of a two-expert pipeline (Wan 2.2 A14B): the flow-matching noise levels (sigma) it owns; recipes
    # draw training times only there. None: the whole schedule
    expert_range: tuple[float, float] | None = None
    # both experts of a two-expert pipeline folder (model.expert=both): not buildable as one model; a recipe that
    # supports it builds each with expert_spec(spec, "high_noise") / expert_spec(spec, "low_noise")
    both_experts: bool = False
    storage_dtype: str | None = None  # frozen block linears stored in this dtype (fastpost.storage)

    def with_(self, **kw) -> "ModelSpec":
        return replace(self, **kw)


def _add_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def transformer_dir(pretrained: str | Path) -> Path:
    """The folder holding the transformer's config.json: <pipeline>/transformer, or `pretrained` itself."""
    path = Path(pretrained)
    for candidate in (path / "transformer", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise BuildError(f"{str(path)!r} holds neither transformer/config.json (a diffusers pipeline folder) nor "
                     f"config.json (a transformer folder); point model.pretrained at one of those (downloaded "
                     f"checkpoints are used from a local folder)")


EXPERTS = ("high_noise", "low_noise")  # transformer/ and transformer_2/ of a two-expert pipeline folder
BOTH = "both"  # model.expert: train both experts in one job, each step the one that owns its drawn time


def pipeline_boundary_ratio(pretrained: str | Path | None) -> float | None:
    """boundary_ratio of a diffusers pipeline folder whose model_index.json names a transformer_2 (Wan 2.2 A14B:
    transformer = the high-noise expert for t >= boundary_ratio * 1000, transformer_2 = the low-noise one), else
    None."""
    index = Path(pretrained) / "model_index.json" if pretrained is not None else None
    if index is None or not index.is_file():
        return None
    raw = json.loads(index.read_text())
    second = raw.get("transformer_2")
    if not (isinstance(second, list) and second and second[0] is not None):
        return None
    if raw.get("boundary_ratio") is None:
        raise BuildError(f"{index} names a transformer_2 but no boundary_ratio: it does not say which timesteps "
                         f"each expert denoises")
    return float(raw["boundary_ratio"])


def expert_spec(spec: "ModelSpec", expert: str | None) -> "ModelSpec":
    """The spec of one expert of a two-expert pipeline folder: its transformer folder and the sigmas it owns
    (high_noise: [boundary_ratio, 1], low_noise: [0, boundary_ratio)). expert None: spec unchanged, and a
    two-expert folder is an error (which expert would train is not said). expert "both": the pipeline's spec
    marked both_experts (the recipe splits it)."""
    ratio = pipeline_boundary_ratio(spec.pretrained)
    if expert is None:
        if ratio is not None:
            raise BuildError(f"{spec.pretrained} holds two experts (transformer/ high noise, transformer_2/ low noise, "
                             f"boundary_ratio {ratio}): set model.expert to high_noise, low_noise or both")
        return spec
    if expert not in (*EXPERTS, BOTH):
        raise BuildError(f"model.expert must be one of {(*EXPERTS, BOTH)}, got {expert!r}")
    if ratio is None:
        raise BuildError(f"model.expert={expert!r} needs a two-expert pipeline folder (model_index.json with "
                         f"transformer_2 and boundary_ratio, e.g. Wan2.2-T2V-A14B-Diffusers); {spec.pretrained} is not")
    if expert == BOTH:
        return replace(spec, both_experts=True, expert_range=None)
    spec = replace(spec, both_experts=False)
    if expert == "high_noise":
        return replace(spec, pretrained=str(Path(spec.pretrained) / "transformer"), expert_range=(ratio, 1.0))
    return replace(spec, pretrained=str(Path(spec.pretrained) / "transformer_2"), expert_range=(0.0, ratio))


def weight_files(folder: Path, variant: str | None = None, allow_pickle: bool = False) -> dict[str, Path]:
    """checkpoint key -> the file holding it (a single safetensors file, or a sharded one via its index)."""
    single = folder / _add_variant(WEIGHTS, variant)
    index = folder / _add_variant(INDEX, variant)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: folder / v for k, v in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise BuildError(f"{index} names shard files that are missing: {missing[:3]}; the download is incomplete")
        return files
    if single.is_file():
        return {k: single for k in _SafetensorsFile(single).entries}
    pickled = [folder / _add_variant(n, variant) for n in PICKLED if (folder / _add_variant(n, variant)).is_file()]
    if pickled and allow_pickle:
        return {k: pickled[0] for k in torch.load(pickled[0], map_location="meta", weights_only=True)}
    if pickled:
        raise BuildError(f"{folder} has only pickled weights ({pickled[0].name}), which can run code when loaded; "
                         f"convert them to safetensors, or opt in with model.allow_pickle: true")
    want = single.name if variant is None else f"{single.name} (variant {variant!r})"
    raise BuildError(f"no weights in {folder}: expected {want} or {index.name}")


def _checkpoint_key(name: str) -> str:
    return name.replace(".base_layer.", ".")  # peft wraps a LoRA target's original weights in base_layer


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _SafetensorsFile:
    """Reads row ranges of tensors with plain file reads (no mmap): only the rows asked for ever enter this
    process's memory (mmap'd pages would count towards its RSS while mapped)."""

    def __init__(self, path: Path):
        import struct

        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        entry = self.entries[key]
        shape, dtype = self.shape(key), _ST_DTYPES[entry["dtype"]]
        if not shape:
            rows = slice(0, 1)
        else:
            rows = index[0]
        full_rest = all(sl.start == 0 and sl.stop == n for sl, n in zip(index[1:], shape[1:]))
        if not full_rest:  # not a row range (no FSDP placement does this): read the tensor, then index it
            return self.read(key, tuple(slice(0, n) for n in shape))[index]
        row_numel = 1
        for n in shape[1:]:
            row_numel *= n
        item = torch.empty((), dtype=dtype).element_size()
        out = torch.empty((rows.stop - rows.start, *shape[1:]) if shape else (), dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + entry["data_offsets"][0] + rows.start * row_numel * item)
            view = out.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(view) != view.nbytes:
                raise BuildError(f"{self.path} is truncated: tensor {key} ends past the end of the file; "
                                 f"download it again")
        return out


class _Reader:
    """Slices of checkpoint tensors from safetensors files (or an opted-in pickled file)."""

    def __init__(self, files: dict[str, Path]):
        self.files, self._open = files, {}

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = _SafetensorsFile(path)
            else:  # opted-in pickled weights: weights_only refuses anything but tensors and containers
                self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._handle(self.files[key])
        return f.shape(key) if isinstance(f, _SafetensorsFile) else tuple(f[key].shape)

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        f = self._handle(self.files[key])
        return f.read(key, index) if isinstance(f, _SafetensorsFile) else f[key][index]


def _local_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's storage of t, the global index it covers); a plain tensor covers everything."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return t, tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_weights(model: nn.Module, folder: Path, variant: str | None = None, allow_pickle: bool = False) -> None:
    """Fill every non-LoRA parameter and persistent buffer of `model` (plain or FSDP-sharded) from the
    checkpoint in `folder`, each rank reading only its own rows. Strict: keys and shapes must match."""
    files = weight_files(folder, variant, allow_pickle)
    reader = _Reader(files)
    wanted: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            wanted[_checkpoint_key(name)] = p
    persistent = {k for k, _ in model.state_dict().items()}
    for name, b in model.named_buffers():
        if name in persistent:
            wanted[_checkpoint_key(name)] = b
    missing = sorted(set(wanted) - set(files))
    unexpected = sorted(set(files) - set(wanted))
    if missing or unexpected:
        raise BuildError(f"the checkpoint in {folder} does not match {type(model).__name__} built from its "
                         f"config.json: {len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} "
                         f"unexpected (e.g. {unexpected[:3]}); the folder holds a different model or version")
    for key, target in wanted.items():
        if reader.shape(key) != tuple(target.shape):
            raise BuildError(f"{folder}: tensor {key} has shape {list(reader.shape(key))} but the model expects "
                             f"{list(target.shape)}; the weights do not belong to this config.json")
        local, index = _local_view(target)
        if local.numel():
            local.copy_(reader.read(key, index))


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Replace meta storage by real (uninitialised) storage on `device`; real tensors that were already set
    (buffers computed at construction, LoRA weights) keep their values."""
    local = _local
    keep = {n: local(t).detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not local(t).is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n in keep:
                local(t).copy_(keep[n])


def read_config(pretrained: str | Path) -> dict:
    raw = json.loads((transformer_dir(pretrained) / "config.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def model_config(family, spec: ModelSpec):
    """The transformer config `spec` builds (the checkpoint's config.json, or the flavor's), with attribute access
    like model.config, read without building anything."""
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(read_config(spec.pretrained) if spec.pretrained is not None else family.config(spec.flavor))


def construct(family, spec: ModelSpec) -> nn.Module:
    """Step 1 (+2): the module, on meta when weights will be loaded, seeded and real otherwise; LoRA injected."""
    dtype = DTYPES[spec.dtype]
    cls = family.diffusers_class
    if spec.pretrained is not None:
        from accelerate import init_empty_weights

        config = read_config(spec.pretrained)
        with init_empty_weights(include_buffers=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers warns about config keys of other versions it ignores
            model = cls.from_config(config)
        _cast_parameters(model, dtype)
    else:
        torch.manual_seed(spec.init_seed)
        model = cls.from_config(family.config(spec.flavor))
        if dtype != torch.float32:
            model.to(dtype)
    if spec.lora is not None and spec.lora.enabled:
        _inject_real_lora(model, spec, family.lora_target_modules)
    if spec.trainable:
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()
    return model


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`, buffers as constructed: what from_pretrained(torch_dtype=...) gives (CogVideoX's
    sincos table stays float64 there; casting it would move outputs)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.dtype != dtype and p.is_floating_point():
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)


def _inject_real_lora(model: nn.Module, spec: ModelSpec, default_targets=None) -> None:
    """peft puts adapters on the base weights' device, meta for a pretrained model: give them real initial
    values from a generator seeded the same on every rank."""
    from fastpost.lora import inject_lora

    inject_lora(model, spec.lora, default_targets)
    for name, cfg in spec.extra_adapters:
        inject_lora(model, cfg, default_targets, adapter_name=name)
    if any(p.is_meta for n, p in model.named_parameters() if "lora_" in n):
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(spec.init_seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for sub in (module.lora_A, module.lora_B):
                    for name in sub:
                        sub[name].to_empty(device="cpu")
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, spec.lora.init if spec.lora.init != "default" else True)


def build_model(family, spec: ModelSpec, dims, *, ac: ACConfig | None = None, fsdp: FSDPConfig | None = None,
                attention_backend: str = "auto", shard: bool = True, device: torch.device | None = None,
                offload: OffloadConfig | None = None, compile: CompileConfig | None = None):
    """Build `spec` for `family` in the fixed order (module docstring); returns (model, sp_state).

    shard=False leaves the weights replicated (sampling): SP processors only, every rank loads everything.
    """
    fsdp, offload = fsdp or FSDPConfig(), offload or OffloadConfig()
    if spec.both_experts:
        raise BuildError(f"model.expert=both: {spec.pretrained} holds two experts and this recipe builds one model; "
                         f"train them with recipe finetune, or one expert per job (model.expert high_noise / "
                         f"low_noise)")
    model = construct(family, spec)
    if spec.storage_dtype:
        apply_storage(model, family.blocks(model), spec.storage_dtype, DTYPES[fsdp.param_dtype])
    sp_state = family.apply_sequence_parallel(model, dims, attention_backend)
    blocks = family.blocks(model)
    offloader = None
    if offload.any and dims.world_size > 1:
        raise BuildError(f"offload.blocks / offload.activations are for one GPU ({dims.world_size} ranks here); "
                         f"with several GPUs use fsdp.cpu_offload")
    if offload.blocks:
        offloader = BlockOffloader(blocks, offload.prefetch)
        offloader.install()  # before AC, so the recompute in backward streams the block in again
    if spec.trainable and offload.activations:
        if (ac or ACConfig()).mode != "full":
            raise BuildError("offload.activations offloads the inputs of fully checkpointed blocks: set ac.mode: full")
        checkpoint_offloaded(blocks, ActivationOffloader())
    elif spec.trainable:
        apply_activation_checkpointing(blocks, ac or ACConfig())
    apply_compile(blocks, compile)
    if shard:
        apply_fsdp(model, blocks, dims, fsdp)
    if device is None:
        device = torch.device(dims.mesh.device_type if dims.mesh is not None else "cpu")
    from torch.distributed.tensor import DTensor

    if offloader is not None and any(isinstance(p, DTensor) for p in model.parameters()):
        raise BuildError("offload.blocks runs without FSDP, but FSDP was applied for mixed precision: set "
                         "model.storage_dtype (per-layer casting) or fsdp.param_dtype: float32")
    home = torch.device("cpu") if offloader is not None else device  # offloaded weights are loaded on the host
    if any(_local(p).is_meta for p in model.parameters()):
        _materialize(model, home)
    elif not any(isinstance(p, DTensor) for p in model.parameters()):  # not sharded (world 1, or shard=False)
        model.to(home)
    if spec.pretrained is not None:
        load_weights(model, transformer_dir(spec.pretrained), spec.variant, spec.allow_pickle)
    if offloader is not None:
        offloader.attach(device)  # frozen block weights to pinned host memory,
        _to_device_except_offloaded(model, offloader, device)  # everything else to the GPU
    return model, sp_state


def _to_device_except_offloaded(model: nn.Module, offloader: BlockOffloader, device: torch.device) -> None:
    hosted = {id(p) for entries in offloader.frozen for _, _, p in entries}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in hosted and p.device != device:
                module._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
