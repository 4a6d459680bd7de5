"""A family is the whole pipeline: its VAE / text / scheduler / LoRA facts agree with diffusers, and no module
outside fastpost/models keys anything on a family name or crosses a layer."""

import ast
import json
from pathlib import Path

import pytest
import torch

from fastpost.models import family_for_vae, get_family

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,frames,latent_frames", [("cogvideox", 9, 3), ("mochi", 13, 3)])
def test_vae_factors_match_what_the_vae_does(name, frames, latent_frames, tmp_path):
    from fastpost.components import load_vae

    family = get_family(name)
    vae = load_vae(family.vae.build_tiny(tmp_path / "vae"), spec=family.vae)
    spatial, temporal = family.vae_factors(vae.config)
    assert (frames - 1) % temporal == 0 and (frames - 1) // temporal + 1 == latent_frames
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, frames, 32, 32)).latent_dist.mean
    assert tuple(z.shape[2:]) == (latent_frames, 32 // spatial, 32 // spatial)
    assert family_for_vae(vae.config["_class_name"]) is family
    other = get_family("mochi" if name == "cogvideox" else "cogvideox")
    with pytest.raises(ValueError, match="this family uses"):
        other.vae_factors(vae.config)


def test_scheduler_config_reads_the_checkpoint(tmp_path):
    fam = get_family("cogvideox")
    (tmp_path / "scheduler").mkdir()
    cfg = {**fam.scheduler_config(flavor="5b"), "snr_shift_scale": 2.5, "_class_name": "CogVideoXDPMScheduler"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    got = fam.scheduler_config(str(tmp_path))
    assert got["snr_shift_scale"] == 2.5 and "_class_name" not in got
    assert fam.default_sampler(str(tmp_path)) == "dpm"
    # a flavor wins over the checkpoint; no checkpoint file: the flavor's (default) config
    assert fam.scheduler_config(str(tmp_path), "2b")["snr_shift_scale"] == 3.0
    assert fam.default_sampler(str(tmp_path), "2b") == "ddim"
    assert fam.scheduler_config(str(tmp_path / "nothing")) == fam.scheduler_config(flavor="debug")
    assert get_family("mochi").default_sampler() == "flow_euler"


def test_patch_sizes_and_text_spec():
    cog, mochi = get_family("cogvideox"), get_family("mochi")
    assert cog.patch_sizes(cog.config("debug")) == (1, 2, 2)
    assert cog.patch_sizes(cog.config("debug-1.5")) == (2, 2, 2) and cog.voxels_per_token(cog.config("1.5-5b")) == 8
    assert cog.patch_sizes({"patch_size": (1, 2, 2)}) == (1, 2, 2)  # Wan's tuple
    assert cog.text.max_length(cog.config("2b")) == 226 and mochi.text.max_length(mochi.config("mochi-1")) == 256
    assert (cog.text.pass_mask, mochi.text.pass_mask) == (False, True)


def test_lora_targets_stay_in_the_blocks():
    import re

    from tests._parity import make_model

    fam = get_family("mochi")
    names = [n for n, _ in make_model(fam, "debug").named_modules()]
    hit = [n for n in names if re.fullmatch(fam.lora_target_modules, n)]
    assert hit and all(n.startswith("transformer_blocks.") for n in hit)
    assert any(n.endswith("pooler.to_q") for n in names)  # the module a bare "to_q" would also catch


def test_text_encoder_zero_padding(tmp_path):
    from fastpost.components import TextSpec
    from fastpost.data.text import TextEncoder
    from fastpost.data.tiny import build_tiny_text_encoder

    path = build_tiny_text_encoder(tmp_path / "t5")
    plain = TextEncoder.from_pretrained(path, family=TextSpec())
    zeroed = TextEncoder.from_pretrained(path, family=TextSpec(zero_padding=True))
    (e1, m1), (e2, m2) = plain.encode(["a red circle"], 8), zeroed.encode(["a red circle"], 8)
    assert torch.equal(m1, m2) and 0 < int(m1.sum()) < 8
    valid = m1[0].bool()
    assert torch.equal(e1[0, valid], e2[0, valid]) and not e2[0, ~valid].any() and e1[0, ~valid].any()
    with pytest.raises(TypeError, match="get_family"):
        TextEncoder.from_pretrained(path, family="cogvideox")


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


def test_layering_and_no_family_tables_outside_models():
    pkg = ROOT / "fastpost"
    rules = {"data": ("fastpost.models", "fastpost.sampling", "fastpost.recipes"),
             "models": ("fastpost.data", "fastpost.sampling", "fastpost.recipes"),
             "sampling": ("fastpost.recipes",)}
    allowed = set()  # cli.py is the composition root: it hands preprocess its family resolver
    for layer, banned in rules.items():
        for f in (pkg / layer).rglob("*.py"):
            rel = str(f.relative_to(pkg))
            bad = [m for m in _imports(f) if m.startswith(banned) and (rel, m) not in allowed]
            assert not bad, f"{rel} imports {bad}"
    # a table keyed by a family name (dict keys) or a branch on one (comparisons); defaults in configs are fine
    families = {"cogvideox", "mochi", "pyramid", "wan"}
    skip = {"models", "recipes"}  # models own the facts; recipes/pyramid_flow.py checks its own family by design
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg)
        if rel.parts[0] in skip:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            keys = node.keys if isinstance(node, ast.Dict) else node.comparators if isinstance(node, ast.Compare) else []
            names = [k.value for k in keys if isinstance(k, ast.Constant) and k.value in families]
            assert not names, f"{rel}:{node.lineno} keys or branches on the family {names}: read it from the family"


def test_training_fps_follows_the_model_version():
    """preprocess target_fps=family: CogVideoX 1.0 was trained at 8 fps, 1.5 (patch_size_t) at 16, Mochi at 30."""
    cog = get_family("cogvideox")
    assert cog.training_fps(cog.config("debug")) == 8 and cog.training_fps(cog.config("1.5-5b")) == 16
    assert cog.training_fps(None) == 8
    assert get_family("mochi").training_fps(None) == 30
