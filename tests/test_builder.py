"""The model builder: meta init + per-rank sliced loading equals diffusers' from_pretrained, at world 1 and under
FSDP at world 2 (sharded checkpoints, variants, LoRA on a meta model), and bad checkpoints fail clearly."""

import json

import pytest
import torch

from fastpost.builder import BuildError, ModelSpec, build_model
from fastpost.distributed import ParallelDims
from fastpost.lora import LoRAConfig, full_state_dict
from fastpost.models import get_family
from tests._harness import run_distributed


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pipeline-shaped folder whose transformer is saved in bf16, in 3 safetensors shards (plus an fp32
    single-file 'fp32' variant), as real downloads are."""
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(5)
    model = get_family("cogvideox").load(None, "debug")
    model.to(torch.bfloat16).save_pretrained(root / "transformer", max_shard_size="40KB")
    model.to(torch.float32).save_pretrained(root / "transformer", variant="fp32")
    return root


def _reference(pipeline_dir, dtype=torch.float32, variant=None):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(pipeline_dir, subfolder="transformer", torch_dtype=dtype,
                                                       variant=variant)


def test_sharded_checkpoint_is_really_sharded(pipeline_dir):
    index = json.loads((pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3


@pytest.mark.parametrize("variant", [None, "fp32"])
def test_world1_build_equals_from_pretrained(pipeline_dir, variant):
    family = get_family("cogvideox")
    dims = ParallelDims(world_size=1)
    model, _ = build_model(family, ModelSpec(pretrained=str(pipeline_dir), variant=variant), dims)
    ref = _reference(pipeline_dir, variant=variant)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for name, buf in ref.named_buffers():  # non-persistent buffers are computed at construction, not loaded
        assert torch.equal(dict(model.named_buffers())[name], buf), name
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_lora_on_meta_model_gets_real_seeded_init(pipeline_dir):
    family = get_family("cogvideox")
    spec = ModelSpec(pretrained=str(pipeline_dir), lora=LoRAConfig(enabled=True, rank=4, alpha=8), init_seed=3)
    a, _ = build_model(family, spec, ParallelDims(world_size=1))
    b, _ = build_model(family, spec, ParallelDims(world_size=1))
    lora = {n: p for n, p in a.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(not p.requires_grad for n, p in a.named_parameters() if "lora_" not in n)
    for n, p in lora.items():
        assert torch.isfinite(p).all() and torch.equal(p, dict(b.named_parameters())[n])
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_A" in n)
    assert all(p.abs().sum() == 0 for n, p in lora.items() if "lora_B" in n)  # starts at the base model
    ref = _reference(pipeline_dir)
    x = torch.randn(1, 4, 3, 10, 10)
    emb = torch.randn(1, 8, 16)
    with torch.no_grad():
        out = family.predict(a, x, torch.tensor([400]), emb)
        want = family.predict(ref, x, torch.tensor([400]), emb)
    assert torch.equal(out, want)


def _fsdp_worker(rank, world, pipeline_dir, lora):
    family = get_family("cogvideox")
    dims = ParallelDims(world_size=world, ulysses=world)
    dims.build_mesh()
    spec = ModelSpec(pretrained=str(pipeline_dir), lora=LoRAConfig(enabled=True, rank=4) if lora else None)
    model, _ = build_model(family, spec, dims)
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    total = sum(p.numel() for p in model.parameters())
    assert local <= total / world + 64 * 16, (local, total)  # this rank holds its shard only
    full = full_state_dict(model)
    x = torch.randn(1, 4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = family.predict(model, x, torch.tensor([400]), emb)
    if rank == 0:
        ref = _reference(pipeline_dir)
        want = ref.state_dict()
        for k, v in want.items():
            key = k if k in full else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(full[key], v), k
        with torch.no_grad():
            ref_out = family.predict(ref, x, torch.tensor([400]), emb)
        assert (out - ref_out).abs().max() <= 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_world2_each_rank_loads_its_slices(pipeline_dir, lora):
    run_distributed(_fsdp_worker, 2, pipeline_dir, lora)


def test_bad_checkpoints_fail_with_a_clear_error(pipeline_dir, tmp_path):
    family = get_family("cogvideox")
    dims = ParallelDims(world_size=1)
    with pytest.raises(BuildError, match="neither transformer/config.json"):
        build_model(family, ModelSpec(pretrained=str(tmp_path)), dims)
    # a config that does not fit the weights (3 -> 4 heads): the shape error names the tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    import shutil

    shutil.copytree(pipeline_dir / "transformer", bad, dirs_exist_ok=True)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
    with pytest.raises(BuildError, match="unexpected"):
        build_model(family, ModelSpec(pretrained=str(bad)), dims)
    (bad / "config.json").write_text(json.dumps({**config, "text_embed_dim": 32}))
    with pytest.raises(BuildError, match="has shape"):
        build_model(family, ModelSpec(pretrained=str(bad)), dims)
    with pytest.raises(BuildError, match="variant 'fp8'"):
        build_model(family, ModelSpec(pretrained=str(pipeline_dir), variant="fp8"), dims)
    # pickled weights only: refused unless opted in
    pickled = tmp_path / "pickled"
    torch.manual_seed(0)
    family.load(None, "debug").save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(BuildError, match="allow_pickle"):
        build_model(family, ModelSpec(pretrained=str(pickled)), dims)
    model, _ = build_model(family, ModelSpec(pretrained=str(pickled), allow_pickle=True), dims)
    torch.manual_seed(0)
    want = family.load(None, "debug").state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
