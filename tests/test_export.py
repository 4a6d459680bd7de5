"""Export streamed from the training model: a fused transformer folder and a whole pipeline folder reload in
diffusers with the trained model's outputs, also when written from FSDP shards at world 2."""

import pytest
import torch

from fastpost.builder import ModelSpec, build_model
from fastpost.tiny import build_tiny_pipeline
from fastpost.distributed import ParallelDims
from fastpost.export import save_pipeline, save_transformer
from fastpost.lora import LoRAConfig
from fastpost.models import get_family
from tests._harness import run_distributed

X = torch.randn(1, 4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
EMB = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny")


def _trained_lora_model(pipeline_dir, dims):
    """The pretrained model with a LoRA whose B is non-zero (as after training), scale alpha/r = 2."""
    spec = ModelSpec(pretrained=str(pipeline_dir), lora=LoRAConfig(enabled=True, rank=4, alpha=8))
    model, _ = build_model(get_family("cogvideox"), spec, dims)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                full = 0.05 * torch.randn(p.shape, generator=g)
                local = p.to_local() if hasattr(p, "to_local") else p
                if hasattr(p, "to_local"):
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
                local.copy_(full)
    return model


def _predict(model):
    with torch.no_grad():
        return get_family("cogvideox").predict(model, X, torch.tensor([300]), EMB)


def test_fused_transformer_and_pipeline_folders_reload_in_diffusers(pipeline_dir, tmp_path):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    model = _trained_lora_model(pipeline_dir, ParallelDims(world_size=1))
    want = _predict(model)
    base = CogVideoXTransformer3DModel.from_pretrained(pipeline_dir, subfolder="transformer")
    assert (want - _predict(base)).abs().max() > 1e-3, "the LoRA changes nothing: the check would be vacuous"

    out = save_transformer(model, tmp_path / "transformer", max_shard_mb=0)  # one tensor per file: many shards
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not list(out.glob("*.part"))
    fused = CogVideoXTransformer3DModel.from_pretrained(out)
    assert not any("lora" in k for k in fused.state_dict())
    assert (_predict(fused) - want).abs().max() <= 1e-5

    pipe_dir = save_pipeline(model, pipeline_dir, tmp_path / "pipe")
    from safetensors import safe_open

    for f in (pipe_dir / "transformer").glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}, "written in bf16"
    pipe = CogVideoXPipeline.from_pretrained(pipe_dir)
    got = _predict(pipe.transformer.float())
    assert (got - want).abs().max() <= 0.02 * want.abs().max(), "bf16 rounding only"
    video = pipe("a red ball", num_inference_steps=2, height=80, width=80, num_frames=9, max_sequence_length=8,
                 guidance_scale=1.0, output_type="np").frames
    assert video.shape[:2] == (1, 9)


def _fsdp_export_worker(rank, world, pipeline_dir, out):
    dims = ParallelDims(world_size=world, ulysses=world)
    dims.build_mesh()
    save_transformer(_trained_lora_model(pipeline_dir, dims), out)


def test_export_from_fsdp_shards_equals_single_process(pipeline_dir, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    run_distributed(_fsdp_export_worker, 2, pipeline_dir, tmp_path / "w2")
    save_transformer(_trained_lora_model(pipeline_dir, ParallelDims(world_size=1)), tmp_path / "w1")
    a = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "w1").state_dict()
    b = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "w2").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_comfyui_lora_applies_like_comfyui_to_the_base_weights(pipeline_dir, tmp_path):
    """ComfyUI's rule for its generic LoRA keys: W[<module>] += alpha / rank * up @ down, where <module> is the
    name in ComfyUI's own model (for CogVideoX: blocks.N.q / k / v / attn_out). Applied to the plain base
    transformer, the file must reproduce the trained LoRA model."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    from fastpost.export import save_comfy_lora

    family = get_family("cogvideox")
    model = _trained_lora_model(pipeline_dir, ParallelDims(world_size=1))
    path = save_comfy_lora(model, family, tmp_path / "lora_comfyui.safetensors")
    lora = load_file(path)
    assert "diffusion_model.blocks.0.q.lora_down.weight" in lora and "diffusion_model.blocks.1.attn_out.alpha" in lora
    base = CogVideoXTransformer3DModel.from_pretrained(pipeline_dir, subfolder="transformer")
    weights = dict(base.named_parameters())
    by_comfy_name = {family.comfy_name(n[: -len(".weight")]): n for n in weights if n.endswith(".weight")}
    applied = 0
    with torch.no_grad():
        for key, up in lora.items():
            if key.endswith(".lora_up.weight"):
                name = key[len("diffusion_model."): -len(".lora_up.weight")]
                down, alpha = lora[f"diffusion_model.{name}.lora_down.weight"], lora[f"diffusion_model.{name}.alpha"]
                weights[by_comfy_name[name]] += alpha / down.shape[0] * up @ down
                applied += 1
    assert applied == 2 * 4  # 2 blocks x q, k, v, attn_out
    assert (_predict(base) - _predict(model)).abs().max() <= 1e-5
