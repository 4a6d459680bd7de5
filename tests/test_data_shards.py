"""Shard format: atomic writes, manifest semantics, lazy reads and the clear errors for damaged folders."""

import json
import os

import pytest
import torch

from fastpost.data import shards
from fastpost.data.shards import MANIFEST, ShardDataset, ShardError


def _sample(i: int, frames: int = 3, caption: str | None = None) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "latents": torch.randn(4, frames, 4, 4, generator=g),
        "prompt_embeds": torch.randn(8, 16, generator=g),
        "prompt_attention_mask": (torch.arange(8) < 3 + i % 4).long(),
        "caption": caption or f"caption {i}", "source": f"videos/{i}.mp4", "bucket": f"{frames}x32x32",
    }


def _make(root, n_shards: int = 3, per_shard: int = 4) -> list[dict]:
    shards.create_manifest(root, {"note": "test"})
    written = []
    for s in range(n_shards):
        # Mix images (1 latent frame) and videos (3 latent frames) in the same shard and dataset.
        samples = [_sample(s * per_shard + j, frames=1 if j % 2 else 3) for j in range(per_shard)]
        shards.append_manifest(root, shards.write_shard(root, s, samples))
        written += samples
    return written


def test_round_trip_mixed_images_and_videos(tmp_path):
    written = _make(tmp_path)
    ds = ShardDataset(tmp_path, verify=True)
    assert len(ds) == len(written) == 12
    assert {k[1] for k in ds.shape_keys()} == {1, 3}
    for i, want in enumerate(written):
        got = ds[i]
        for k in shards.TENSOR_FIELDS:
            assert torch.equal(got[k], want[k]), (i, k)
        assert got["caption"] == want["caption"] and got["source"] == want["source"]
    # No temp files are left behind, and the manifest lists each shard once with a matching checksum.
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    _, entries = shards.read_manifest(tmp_path)
    for e in entries:
        assert shards.sha256_file(tmp_path / e["file"]) == e["sha256"]


def test_reads_are_lazy(tmp_path, monkeypatch):
    """Tensors come from safe_open (memory-mapped), one tensor at a time; only touched shards are opened."""
    _make(tmp_path)
    opened = []
    real = shards.safe_open

    def spy(path, framework):
        opened.append(os.path.basename(path))
        return real(path, framework=framework)

    monkeypatch.setattr(shards, "safe_open", spy)
    ds = ShardDataset(tmp_path)
    assert opened == []  # building the index reads only the manifest
    ds[5]
    ds[6]
    assert opened == ["shard-00001.safetensors"]  # opened once, handle reused


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match=r"no manifest\.jsonl in .*fastpost\.data\.preprocess"):
        ShardDataset(tmp_path)
    with pytest.raises(ShardError, match="the folder does not exist"):
        ShardDataset(tmp_path / "nope")


def test_truncated_shard_is_a_clear_error(tmp_path):
    _make(tmp_path)
    path = tmp_path / "shard-00001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = ShardDataset(tmp_path)
    ds[0]  # other shards still read fine
    with pytest.raises(ShardError, match=r"shard-00001\.safetensors is truncated.*rerun preprocessing"):
        ds[4]


def test_checksum_mismatch_is_caught_with_verify(tmp_path):
    _make(tmp_path)
    path = tmp_path / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte inside a tensor
    path.write_bytes(bytes(data))
    ds = ShardDataset(tmp_path, verify=False)
    ds[8]  # without verification the flipped byte goes unnoticed (size still matches)
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors fails its checksum"):
        ShardDataset(tmp_path, verify=True)[8]
    with pytest.raises(ShardError, match="fails its checksum"):
        ShardDataset(tmp_path).verify_all()


def test_wrong_shape_in_manifest_is_a_clear_error(tmp_path):
    _make(tmp_path, n_shards=1)
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    entry = json.loads(lines[1])
    entry["samples"][0]["latents_shape"] = [4, 5, 4, 4]
    lines[1] = json.dumps(entry)
    (tmp_path / MANIFEST).write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=r"s0\.latents has shape \[4, 3, 4, 4\] but the manifest says \[4, 5, 4, 4\]"):
        ShardDataset(tmp_path)[0]


def test_shard_without_manifest_line_is_not_complete(tmp_path):
    """A shard file written but never recorded (killed between os.replace and the append) is invisible."""
    _make(tmp_path, n_shards=2)
    shards.write_shard(tmp_path, 2, [_sample(100)])  # no append_manifest
    assert (tmp_path / "shard-00002.safetensors").exists()
    assert len(ShardDataset(tmp_path)) == 8


def test_torn_manifest_tail_is_ignored_then_cut(tmp_path):
    _make(tmp_path, n_shards=2)
    entry = shards.write_shard(tmp_path, 2, [_sample(100)])
    line = json.dumps(entry)
    with open(tmp_path / MANIFEST, "a") as f:
        f.write(line[: len(line) // 2])  # killed mid-append
    assert [e["index"] for e in shards.read_manifest(tmp_path)[1]] == [0, 1]
    shards.append_manifest(tmp_path, entry)  # the rerun's append removes the torn tail first
    _, entries = shards.read_manifest(tmp_path)
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert all(json.loads(x) for x in (tmp_path / MANIFEST).read_text().splitlines())
    assert len(ShardDataset(tmp_path)) == 9


def test_damaged_manifest_and_foreign_folder(tmp_path):
    _make(tmp_path, n_shards=1)
    text = (tmp_path / MANIFEST).read_text().splitlines()
    (tmp_path / MANIFEST).write_text(text[0] + "\n{oops\n" + text[1] + "\n")
    with pytest.raises(ShardError, match="line 2 is not valid JSON"):
        ShardDataset(tmp_path)
    (tmp_path / MANIFEST).write_text(text[1] + "\n")  # no header line
    with pytest.raises(ShardError, match="no 'fastpost-shards' header"):
        ShardDataset(tmp_path)


def test_stale_temp_files_are_removed_on_rewrite(tmp_path):
    _make(tmp_path, n_shards=1)
    stale = tmp_path / ".shard-00001.safetensors.tmp999"
    stale.write_bytes(b"half a shard")
    shards.write_shard(tmp_path, 1, [_sample(7)])
    assert not stale.exists()
