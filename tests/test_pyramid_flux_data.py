"""pyramid_flux data and LoRA: the importer turns a synthetic folder in the layout of Pyramid Flow's extraction tools
into shards (per-frame normalisation applied and recorded, pooled prompts, the empty prompt); the pyramid_flow recipe
trains a LoRA on them with the release's conventions (caption dropout to the stored encoding of ""); the exported
LoRA has diffusers' Flux keys and loads with diffusers' Flux LoRA loader into a FluxTransformer2DModel that then
computes what the trained model computes."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastpost.builder import ModelSpec, build_model
from fastpost.data.loader import collate
from fastpost.data.pyramid_import import import_upstream
from fastpost.data.shards import ShardDataset, read_empty_prompt
from fastpost.distributed import ParallelDims
from fastpost.lora import LoRAConfig, export_lora
from fastpost.models import get_family
from fastpost.models.pyramid.packing import Segment, pack
from fastpost.models.pyramid_flux import LATENT_NORM, MinifluxSchedule, forward_packed
from fastpost.recipes import RecipeContext, get_recipe

FAMILY = get_family("pyramid_flux")


def _upstream_folder(root, n=3, frames=3):
    g = torch.Generator().manual_seed(0)
    rows, raw = [], []
    (root / "lat").mkdir(parents=True)
    (root / "txt").mkdir()

    def features(valid):
        mask = torch.zeros(1, 6, dtype=torch.long)
        mask[0, :valid] = 1
        return {"prompt_embed": torch.randn(1, 6, 16, generator=g), "prompt_attention_mask": mask,
                "pooled_prompt_embed": torch.randn(1, 8, generator=g)}

    for i in range(n):
        latent = torch.randn(1, 4, frames, 16, 16, generator=g) * 2 + 0.3
        torch.save(latent, root / "lat" / f"{i}.pt")
        torch.save(features(2 + i), root / "txt" / f"{i}.pt")
        raw.append(latent[0])
        rows.append({"video": f"v{i}.mp4", "text": f"caption {i}", "latent": f"lat/{i}.pt", "text_fea": f"txt/{i}.pt"})
    (root / "anno.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save(features(1), root / "empty.pt")
    return raw


def test_import_upstream_extracted_latents_and_text(tmp_path):
    raw = _upstream_folder(tmp_path / "up")
    report = import_upstream(tmp_path / "up" / "anno.jsonl", tmp_path / "shards", tmp_path / "up" / "empty.pt",
                             LATENT_NORM, "pyramid_flux", samples_per_shard=2, dtype="float32")
    assert report == {"samples": 3, "shards": 2, "output_dir": str(tmp_path / "shards")}
    ds = ShardDataset(tmp_path / "shards", verify=True)
    assert ds.header["vae"]["normalization"] == {"per_frame": LATENT_NORM} and ds.header["vae"]["family"] == "pyramid_flux"
    for i in range(3):
        item = ds[i]
        first, other = LATENT_NORM["first_frame"], LATENT_NORM["other_frames"]
        assert torch.allclose(item["latents"][:, 0], (raw[i][:, 0] - first["shift"]) * first["scale"])
        assert torch.allclose(item["latents"][:, 1:], (raw[i][:, 1:] - other["shift"]) * other["scale"])
        assert item["prompt_attention_mask"].sum() == 2 + i and item["pooled_prompt_embeds"].shape == (8,)
    batch = collate([ds[0], ds[1]])
    assert batch["pooled_prompt_embeds"].shape == (2, 8) and batch["latents"].shape == (2, 4, 3, 16, 16)
    e, m, p = read_empty_prompt(tmp_path / "shards", with_pooled=True)
    assert e.shape == (6, 16) and m.sum() == 1 and p.shape == (8,)
    with pytest.raises(FileExistsError):  # nothing already written is overwritten
        import_upstream(tmp_path / "up" / "anno.jsonl", tmp_path / "shards", tmp_path / "up" / "empty.pt",
                        LATENT_NORM, "pyramid_flux")


def test_lora_trains_with_release_conventions_and_loads_in_diffusers(tmp_path):
    _upstream_folder(tmp_path / "up", n=2, frames=3)
    import_upstream(tmp_path / "up" / "anno.jsonl", tmp_path / "shards", tmp_path / "up" / "empty.pt",
                    LATENT_NORM, "pyramid_flux", dtype="float32")
    ds = ShardDataset(tmp_path / "shards")
    batch = collate([ds[0], ds[1]])
    spec = ModelSpec(flavor="debug", lora=LoRAConfig(enabled=True, rank=4, alpha=8.0))
    model, _ = build_model(FAMILY, spec, ParallelDims(world_size=1), shard=False)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    recipe_cls = get_recipe("pyramid_flow")
    ctx = RecipeContext(FAMILY, None, SimpleNamespace(data=SimpleNamespace(path=str(tmp_path / "shards"))),
                        lambda spec=None: model)
    recipe = recipe_cls(recipe_cls.Config(caption_dropout=0.5), ctx)
    assert isinstance(recipe.sched, MinifluxSchedule) and recipe.stage_probs.tolist() == [0.25, 0.5, 0.25]
    loss, metrics = recipe.loss(batch, torch.Generator().manual_seed(3))
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)
    assert any("single_transformer_blocks" in n for n in trained) and any(".to_add_out." in n for n in trained)

    export_lora(model, tmp_path / "lora", FAMILY.pipeline_class)
    from diffusers import FluxPipeline
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.to_add_out.lora_B.weight" in keys
    base = FAMILY.load(flavor="debug")
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                          if "lora_" not in k})
    base.save_pretrained(tmp_path / "transformer")
    # what FluxPipeline.load_lora_weights does for its transformer (alphas / adapter config from the file)
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(str(tmp_path / "lora"), return_alphas=True,
                                                                return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state_dict, alphas, transformer=base, metadata=metadata)
    FAMILY.apply_sequence_parallel(base, ParallelDims(world_size=1))
    g = torch.Generator().manual_seed(1)
    sched = MinifluxSchedule()
    packed = pack([Segment(torch.randn(2, 4, 1, 8, 8, generator=g), 0, 1),
                   Segment(torch.randn(2, 4, 1, 16, 16, generator=g), 1, 0)], 2, sched)
    text = {k: batch[k] for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")}
    with torch.no_grad():
        a = forward_packed(model.eval(), packed, torch.tensor([500.0, 20.0]), text)
        b = forward_packed(base.eval(), packed, torch.tensor([500.0, 20.0]), text)
        base.disable_lora()
        c = forward_packed(base, packed, torch.tensor([500.0, 20.0]), text)
    assert (a - b).abs().max().item() < 1e-5 and (a - c).abs().max().item() > 1e-3

    # the sampling command: base folder + LoRA, i2v (the shard sample's first frame), decoded by a vae_class
    from fastpost.sampling.pyramid import main as sample_main

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"seed": 3}))
    assert sample_main(["--family", "pyramid_flux", "--transformer", str(tmp_path / "transformer"), "--lora",
                        str(tmp_path / "lora"), "--shards", str(tmp_path / "shards"), "--i2v", "--steps", "1,1,1",
                        "--vae-class", "tests.test_pyramid_flux_data:TinyCausalVAE", "--vae-path",
                        str(tmp_path / "vae"), "--out", str(tmp_path / "s.pt")]) == 0
    latents, meta = torch.load(tmp_path / "s.pt"), json.loads((tmp_path / "s.json").read_text())
    assert latents.shape == (1, 4, 3, 16, 16) and torch.equal(latents[0, :, :1], ds[0]["latents"][:, :1])
    assert meta["first_frame_steps"] == [20, 20, 20] and meta["guidance_scale"] == 7.0 and meta["lora"]
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "s.mp4").shape == (17, 128, 128, 3)  # 1 + 2 x 8 frames, 8x the latent size


class TinyCausalVAE(torch.nn.Module):
    """A stand-in with the release VAE's interface (from_pretrained, encode(video).latent_dist, decode(z).sample):
    8x spatial, causal 8x temporal (frame 0 alone, then groups of 8), 3 -> 4 channels by a fixed linear map."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(4, 3, generator=g))

    @classmethod
    def from_pretrained(cls, path):
        return cls(json.loads((Path(path) / "config.json").read_text())["seed"])

    def encode(self, video_BCFHW):
        b, c, f, h, w = video_BCFHW.shape
        first, rest = video_BCFHW[:, :, :1], video_BCFHW[:, :, 1:].reshape(b, c, (f - 1) // 8, 8, h, w).mean(3)
        x = torch.nn.functional.avg_pool3d(torch.cat([first, rest], 2), (1, 8, 8))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.einsum("oc,bcfhw->bofhw", self.proj, x)))

    def decode(self, z_BCFHW):
        x = torch.einsum("co,bofhw->bcfhw", torch.linalg.pinv(self.proj), z_BCFHW)
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(8, 2)], 2)
        return SimpleNamespace(sample=x.repeat_interleave(8, 3).repeat_interleave(8, 4))


def _text_encoders(root: Path) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_tokenizer

    build_tiny_text_encoder(root / "t5", d_model=16, num_layers=1)
    tok = build_tiny_tokenizer()
    for sub in ("tokenizer", "tokenizer_2"):
        tok.save_pretrained(str(root / sub))
    T5EncoderModel.from_pretrained(str(root / "t5")).save_pretrained(str(root / "text_encoder_2"))
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=1,
                                        pad_token_id=0, bos_token_id=1))
    clip.save_pretrained(str(root / "text_encoder"))
    return root


def test_preprocess_videos_with_vae_class_and_release_text(tmp_path):
    from fastpost.data.preprocess import PreprocessConfig, load_pixels
    from fastpost.data.pyramid_preprocess import FluxText, denormalize_per_frame, preprocess_pyramid, vae_decode
    from fastpost.data.synthetic import write_mp4

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"seed": 3}))
    rng = torch.Generator().manual_seed(0)
    rows = []
    for i in range(2):
        frames = (torch.rand(9, 64, 64, 3, generator=rng) * 255).byte().numpy()
        write_mp4(tmp_path / f"{i}.mp4", frames, 8)
        rows.append({"path": f"{i}.mp4", "caption": f"a red circle {i}"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text_dir = _text_encoders(tmp_path / "text")
    report = preprocess_pyramid(str(tmp_path / "metadata.jsonl"), str(tmp_path / "shards"),
                                "tests.test_pyramid_flux_data:TinyCausalVAE", str(text_dir), LATENT_NORM,
                                "pyramid_flux", str(tmp_path / "vae"), [(64, 64)], 9, dtype="float32")
    assert report["samples"] == 2
    ds = ShardDataset(tmp_path / "shards")
    item = ds[1]
    vae = TinyCausalVAE(3)
    pixels, _ = load_pixels(tmp_path / "1.mp4", PreprocessConfig("", "", "", "", resolutions=[(64, 64)],
                                                                 max_frames=9), 8)
    raw = vae.encode(pixels[None]).latent_dist.mean[0]
    assert item["latents"].shape == (4, 2, 8, 8)
    assert torch.allclose(item["latents"][:, 0], (raw[:, 0] + 0.04) / 1.8726, atol=1e-6)
    assert torch.allclose(item["latents"][:, 1], (raw[:, 1] + 0.2343) / 3.0986, atol=1e-6)
    assert torch.allclose(denormalize_per_frame(item["latents"], LATENT_NORM), raw, atol=1e-5)
    assert vae_decode(vae, raw[None]).shape == (1, 3, 9, 64, 64)
    # T5 at 128 tokens with its mask, CLIP pooled: as transformers computes them
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(text_dir / "tokenizer_2"))
    ids = tok(["a red circle 1"], padding="max_length", max_length=128, return_tensors="pt")
    t5 = T5EncoderModel.from_pretrained(str(text_dir / "text_encoder_2"))
    with torch.no_grad():
        want = t5(ids.input_ids, attention_mask=ids.attention_mask)[0][0]
        pooled = CLIPTextModel.from_pretrained(str(text_dir / "text_encoder"))(
            tok(["a red circle 1"], padding="max_length", max_length=77, return_tensors="pt").input_ids).pooler_output
    assert item["prompt_embeds"].shape == (128, 16) and torch.allclose(item["prompt_embeds"], want, atol=1e-6)
    assert item["prompt_attention_mask"].sum() == ids.attention_mask.sum()
    assert torch.allclose(item["pooled_prompt_embeds"], pooled[0], atol=1e-6)
    assert FluxText(text_dir).encode([""])["prompt_attention_mask"].sum() == 1  # "" is </s> alone
    with pytest.raises(ValueError, match="import path"):
        from fastpost.data.pyramid_preprocess import import_class

        import_class("NoModule")
