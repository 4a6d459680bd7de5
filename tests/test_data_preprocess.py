"""Synthetic clips -> preprocessing -> shards: bitwise round trip, corrupt inputs, resume, ranks, Mochi."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastpost.config import ConfigError, from_dict
from fastpost.data import preprocess as pp
from fastpost.data import shards
from fastpost.data.shards import ShardDataset
from fastpost.data.synthetic import SyntheticConfig, generate
from fastpost.data.text import TextEncoder
from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae
from fastpost.models import get_family, resolve_family
from tests._harness import run_distributed

COG, MOCHI = get_family("cogvideox"), get_family("mochi")

RESOLUTIONS = [(64, 64), (48, 80)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Built once: 6 clips + 2 stills (two sizes) + one corrupt mp4, tiny CogVideoX VAE + T5, one full run."""
    root = tmp_path_factory.mktemp("pp")
    generate(SyntheticConfig(out_dir=str(root / "synth"), num_videos=6, num_images=2, frames=[9, 17],
                             sizes=[(64, 64), (48, 80)], seed=1))
    (root / "synth" / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    with open(root / "synth" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"path": "videos/corrupt.mp4", "caption": "a broken clip"}) + "\n")
    env = {"root": root, "data": str(root / "synth" / "metadata.jsonl"),
           "vae": str(build_tiny_vae(root / "vae", COG)), "te": str(build_tiny_text_encoder(root / "te"))}
    env["cfg"] = dict(data=env["data"], output_dir=str(root / "out"), vae=env["vae"], text_encoder=env["te"],
                      resolutions=RESOLUTIONS, samples_per_shard=3, max_frames=17, max_text_length=16)
    env["report"] = pp.preprocess(from_dict(pp.PreprocessConfig, env["cfg"]), COG)
    return env


def test_report_counts_and_corrupt_input_is_skipped(env):
    rep = env["report"]
    assert rep["shards_planned"] == rep["shards_written"] == rep["shards_complete"] == 3
    assert rep["samples_written"] == rep["dataset_samples"] == 8
    assert rep["inputs_failed"] == 1 and rep["failures"][0]["source"] == "videos/corrupt.mp4"
    assert "OSError" in rep["failures"][0]["error"]
    on_disk = json.loads((env["root"] / "out" / pp.REPORT).read_text())
    assert on_disk["inputs_failed"] == 1 and on_disk["samples_written"] == 8
    header, entries = shards.read_manifest(env["root"] / "out")
    assert entries[-1]["failed"][0]["source"] == "videos/corrupt.mp4"
    assert header["vae"]["family"] == "cogvideox" and header["text_encoder"]["pass_mask"] is False
    assert header["vae"]["normalization"]["formula"] == "(mean - shift_factor) * scaling_factor"


def test_round_trip_is_bitwise(env):
    """Latents read back from shards equal what the VAE produced for the same decoded clip."""
    vae = pp.load_vae(env["vae"])
    text = TextEncoder.from_pretrained(env["te"], family=COG)
    cfg = from_dict(pp.PreprocessConfig, env["cfg"])
    ds = ShardDataset(env["root"] / "out", verify=True)
    buckets = set()
    for i in range(len(ds)):
        s = ds[i]
        pixels, bucket = pp.load_pixels(env["root"] / "synth" / s["source"], cfg, multiple=4)
        assert bucket == s["bucket"]
        buckets.add(bucket)
        assert torch.equal(s["latents"], pp.encode_video(vae, pixels)), s["source"]
        embeds, mask = text.encode([s["caption"]], cfg.max_text_length)
        assert torch.equal(s["prompt_attention_mask"], mask[0])
        torch.testing.assert_close(s["prompt_embeds"], embeds[0], rtol=1e-6, atol=1e-6)
    # Both resolution buckets, images (1 frame) and two clip lengths (9 -> 3, 17 -> 5 latent frames).
    assert {b.split("x", 1)[1] for b in buckets} == {"64x64", "48x80"}
    assert {int(b.split("x")[0]) for b in buckets} == {1, 9, 17}
    assert {k[1] for k in ds.shape_keys()} == {1, 3, 5}


def test_normalisation_round_trip_and_pipeline_formulas(env, tmp_path):
    cog = pp.load_vae(env["vae"])
    x = torch.randn(2, 4, 3, 8, 8)
    sf = cog.config.scaling_factor
    assert torch.equal(pp.normalize_latents(cog, x), x * sf)  # CogVideoX: posterior mean * scaling_factor
    torch.testing.assert_close(pp.denormalize_latents(cog, pp.normalize_latents(cog, x)), x, rtol=0, atol=1e-6)
    # Mochi-style config with a non-trivial scaling factor; inverse must match MochiPipeline's decode line.
    g = torch.Generator().manual_seed(0)
    cfg = {"_class_name": "AutoencoderKLMochi", "latents_mean": torch.randn(12, generator=g).tolist(),
           "latents_std": (torch.rand(12, generator=g) + 0.5).tolist(), "scaling_factor": 0.7}
    x = torch.randn(2, 12, 3, 4, 4)
    z = pp.normalize_latents(cfg, x)
    mean, std = torch.tensor(cfg["latents_mean"]).view(1, 12, 1, 1, 1), torch.tensor(cfg["latents_std"]).view(1, 12, 1, 1, 1)
    torch.testing.assert_close(z * std / 0.7 + mean, x, rtol=0, atol=1e-5)  # pipeline_mochi.py decode
    torch.testing.assert_close(pp.denormalize_latents(cfg, z), x, rtol=0, atol=1e-5)
    # The header's recorded normalisation works as the argument too (what the sampler will pass).
    header = shards.read_manifest(env["root"] / "out")[0]
    assert torch.equal(pp.denormalize_latents(header["vae"]["normalization"], x), pp.denormalize_latents(cog, x))


def test_mochi_family(env, tmp_path):
    generate(SyntheticConfig(out_dir=str(tmp_path / "synth"), num_videos=2, num_images=1, frames=[15], seed=2))
    vae_dir = build_tiny_vae(tmp_path / "vae", MOCHI)
    cfg = from_dict(pp.PreprocessConfig, dict(data=str(tmp_path / "synth"), output_dir=str(tmp_path / "out"),
                                              vae=str(vae_dir), text_encoder=env["te"], max_frames=15,
                                              max_text_length=16))
    rep = pp.preprocess(cfg, MOCHI)
    assert rep["samples_written"] == 3 and rep["inputs_failed"] == 0
    ds = ShardDataset(tmp_path / "out")
    # 15 source frames -> 13 (6k+1) -> 3 latent frames; the still image -> 1 latent frame; 12 channels.
    assert sorted(ds.shape_keys()) == [(12, 1, 8, 8), (12, 3, 8, 8), (12, 3, 8, 8)]
    assert sorted(ds[i]["bucket"] for i in range(3)) == ["13x64x64", "13x64x64", "1x64x64"]
    header = ds.header
    assert header["vae"]["family"] == "mochi" and header["text_encoder"]["pass_mask"] is True
    assert header["vae"]["normalization"]["formula"].startswith("(mean - latents_mean) / latents_std")
    vae = pp.load_vae(vae_dir)
    pixels, _ = pp.load_pixels(tmp_path / "synth" / ds[0]["source"], cfg, MOCHI.vae.frame_multiple(vae))
    raw = vae.encode(pixels[None]).latent_dist.mean
    assert torch.equal(ds[0]["latents"], pp.normalize_latents(vae, raw)[0])


def test_rerun_after_kill_redoes_only_the_unfinished_shard(env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(env["root"] / "out", out)  # copy2 keeps mtimes
    manifest = out / shards.MANIFEST
    lines = manifest.read_text().splitlines(keepends=True)
    # Simulate a kill after shard 2's file landed but mid-way through its manifest append, plus a temp file
    # another killed write left behind.
    manifest.write_text("".join(lines[:-1]) + lines[-1][:40])
    (out / ".shard-00002.safetensors.tmp4242").write_bytes(b"partial")
    assert len(ShardDataset(out)) == 6  # the unrecorded shard is not visible
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    before = [ShardDataset(env["root"] / "out")[i]["latents"] for i in range(8)]
    argv = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in {**env["cfg"], "output_dir": str(out)}.items()]
    assert pp.main(argv, resolve_family) == 0
    rep = json.loads((out / pp.REPORT).read_text())
    assert (rep["shards_written"], rep["shards_skipped_complete"], rep["samples_written"]) == (1, 2, 2)
    assert rep["dataset_samples"] == 8 and len(rep["dataset_failed_inputs"]) == 1
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]  # finished shards untouched
    assert not list(out.glob(".*tmp*"))
    ds = ShardDataset(out, verify=True)
    assert all(torch.equal(ds[i]["latents"], before[i]) for i in range(8))
    # A third run has nothing left to do.
    rep = pp.preprocess(from_dict(pp.PreprocessConfig, {**env["cfg"], "output_dir": str(out)}), COG)
    assert (rep["shards_written"], rep["shards_skipped_complete"]) == (0, 3)


def test_sigkill_mid_run_then_rerun(env, tmp_path):
    """A real SIGKILL wherever it lands: the rerun completes the set and never rewrites a recorded shard."""
    out = tmp_path / "out"
    cfg = {**env["cfg"], "output_dir": str(out), "samples_per_shard": 1}
    argv = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in cfg.items()]
    proc = subprocess.Popen([sys.executable, "-m", "fastpost.data.preprocess", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest, deadline = out / shards.MANIFEST, time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count('"type": "shard"') >= 2:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    _, done = shards.read_manifest(out)
    assert len(done) >= 2
    mtimes = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in done if e["file"]}
    rep = pp.preprocess(from_dict(pp.PreprocessConfig, cfg), COG)
    assert rep["shards_skipped_complete"] == len(done) and rep["shards_written"] == 9 - len(done)
    assert rep["dataset_samples"] == 8 and rep["shards_complete"] == 9
    assert all((out / f).stat().st_mtime_ns == t for f, t in mtimes.items())
    a, b = ShardDataset(out, verify=True), ShardDataset(env["root"] / "out")
    assert sorted(s.source for s in a.samples) == sorted(s.source for s in b.samples)


def test_growing_metadata_redoes_a_short_last_shard(env, tmp_path):
    cfg = {**env["cfg"], "output_dir": str(tmp_path / "out")}
    rep = pp.preprocess(from_dict(pp.PreprocessConfig, {**cfg, "limit": 4}), COG)  # shards: rows 0-2, row 3
    assert (rep["shards_written"], rep["dataset_samples"]) == (2, 4)
    rep = pp.preprocess(from_dict(pp.PreprocessConfig, cfg), COG)
    # Shard 0 is kept; shard 1 now has rows 3-5, so it is rewritten; shard 2 is new.
    assert (rep["shards_skipped_complete"], rep["shards_written"], rep["dataset_samples"]) == (1, 2, 8)
    a, b = ShardDataset(tmp_path / "out"), ShardDataset(env["root"] / "out")
    assert [s.source for s in a.samples] == [s.source for s in b.samples]


def test_resume_with_different_settings_or_unknown_key_raises(env):
    with pytest.raises(ConfigError, match=r"different settings \(max_frames 17 -> 9\); use a new output_dir"):
        pp.preprocess(from_dict(pp.PreprocessConfig, {**env["cfg"], "max_frames": 9}), COG)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['max_frame'\]"):
        pp.main([f"data={env['data']}", "output_dir=x", "vae=v", "text_encoder=t", "max_frame=3"], resolve_family)


def _world2_worker(rank: int, world: int, cfg: dict) -> None:
    pp.preprocess(from_dict(pp.PreprocessConfig, cfg), COG)


def test_two_ranks_split_shards_and_match_world1(env, tmp_path):
    cfg = {**env["cfg"], "output_dir": str(tmp_path / "out")}
    run_distributed(_world2_worker, 2, cfg)
    rep = json.loads((tmp_path / "out" / pp.REPORT).read_text())
    assert rep["world_size"] == 2 and [r["shards_written"] for r in rep["per_rank"]] == [2, 1]  # 0,2 | 1
    assert rep["samples_written"] == 8 and rep["inputs_failed"] == 1
    a, b = ShardDataset(tmp_path / "out"), ShardDataset(env["root"] / "out")
    assert [s.source for s in a.samples] == [s.source for s in b.samples]
    # Workers run with 1 thread; the parent may not, so compare to tolerance rather than bit for bit.
    for i in range(len(b)):
        torch.testing.assert_close(a[i]["latents"], b[i]["latents"], rtol=1e-5, atol=1e-6)


def test_helpers():
    assert [pp.valid_frame_count(n, 4, 25) for n in (1, 4, 5, 16, 17, 40)] == [1, 1, 5, 13, 17, 25]
    assert [pp.valid_frame_count(n, 6, 25) for n in (6, 7, 24, 25)] == [1, 7, 19, 25]
    assert pp.choose_bucket(480, 720, RESOLUTIONS) == (48, 80)
    assert pp.choose_bucket(500, 480, RESOLUTIONS) == (64, 64)
    x = pp.resize_center_crop(np.zeros((2, 30, 100, 3), np.uint8), 48, 80)
    assert x.shape == (3, 2, 48, 80) and float(x.max()) == -1.0


def test_synthetic_is_deterministic(tmp_path):
    kw = dict(num_videos=3, num_images=1, frames=[9], sizes=[(48, 80)])
    a = generate(SyntheticConfig(out_dir=str(tmp_path / "a"), seed=7, **kw))
    b = generate(SyntheticConfig(out_dir=str(tmp_path / "b"), seed=7, **kw))
    c = generate(SyntheticConfig(out_dir=str(tmp_path / "c"), seed=8, **kw))
    assert a == b and a != c
    for r in a:
        fa, fb = pp.read_frames(tmp_path / "a" / r["path"]), pp.read_frames(tmp_path / "b" / r["path"])
        assert np.array_equal(fa, fb) and fa.shape == (r["frames"], r["height"], r["width"], 3)
    meta = [json.loads(x) for x in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert meta == a and all(set(m) >= {"path", "caption", "fps", "frames", "width", "height"} for m in meta)
    assert not [p for p in os.listdir(tmp_path / "a" / "videos") if "tmp" in p]
