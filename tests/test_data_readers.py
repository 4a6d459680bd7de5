"""Input formats -> the same shards; target_fps resampling; decode in DataLoader workers; dtype/tiling defaults."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from fastpost.config import ConfigError, from_dict
from fastpost.data import preprocess as pp
from fastpost.data import readers
from fastpost.data.shards import ShardDataset
from fastpost.data.synthetic import SyntheticConfig, generate, write_format, write_mp4
from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae
from fastpost.models import get_family

COG = get_family("cogvideox")
FORMATS = ("fastvideo_json", "csv", "txt_pairs", "webdataset")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """3 clips + 1 still, every format written from the same records, tiny VAE + T5, one jsonl run (no workers)."""
    root = tmp_path_factory.mktemp("readers")
    records = generate(SyntheticConfig(out_dir=str(root / "synth"), num_videos=3, num_images=1, frames=[9],
                                       sizes=[(32, 32)], seed=3))
    env = {"root": root, "records": records, "synth": root / "synth",
           "data": {fmt: write_format(root / "synth", records, fmt) for fmt in FORMATS},
           "vae": str(build_tiny_vae(root / "vae", COG)), "te": str(build_tiny_text_encoder(root / "te"))}
    env["data"]["jsonl"] = root / "synth" / "metadata.jsonl"
    env["base"] = dict(vae=env["vae"], text_encoder=env["te"], resolutions=[(32, 32)], samples_per_shard=2,
                       max_frames=9, num_workers=0, max_text_length=16)
    env["ref"] = run(env, "ref", data=str(env["data"]["jsonl"]))
    return env


def run(env, name, **kw):
    cfg = from_dict(pp.PreprocessConfig, {**env["base"], "output_dir": str(env["root"] / name), **kw})
    return pp.preprocess(cfg, COG), ShardDataset(env["root"] / name)


def by_caption(ds):
    return {ds[i]["caption"]: ds[i]["latents"] for i in range(len(ds))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_jsonl_shards(env, fmt):
    rec = readers.read_records(env["data"][fmt])
    assert sorted(r["caption"] for r in rec.rows) == sorted(r["caption"] for r in env["records"]) and not rec.skipped
    report, ds = run(env, fmt, data=str(env["data"][fmt]))
    assert report["samples_written"] == 4 and report["inputs_failed"] == 0 and report["records_skipped"] == 0
    ref = by_caption(env["ref"][1])
    got = by_caption(ds)
    assert got.keys() == ref.keys()
    for cap in ref:
        assert torch.equal(got[cap], ref[cap]), cap  # same pixels in, same latents out, bit for bit
    if fmt == "webdataset":
        assert ds[0]["source"] == "shard-00000.tar/000000.mp4"


def test_format_detection_and_override(env, tmp_path):
    d = env["data"]
    assert readers.detect_format(env["synth"]) == ("jsonl", d["jsonl"])  # metadata.jsonl wins in its folder
    assert readers.detect_format(d["fastvideo_json"])[0] == "fastvideo_json"
    assert readers.detect_format(d["csv"])[0] == "csv"
    assert readers.detect_format(env["synth"] / "prompts.txt") == ("txt_pairs", env["synth"])
    assert readers.detect_format(d["webdataset"]) == ("webdataset", d["webdataset"])
    assert readers.detect_format(sorted(d["webdataset"].glob("*.tar"))[0])[0] == "webdataset"
    (tmp_path / "only.csv").write_text("path,caption\na.mp4,x\n")
    assert readers.detect_format(tmp_path) == ("csv", tmp_path / "only.csv")
    # explicit override: a folder's txt pairs although metadata.jsonl is there
    rec = readers.read_records(env["synth"], "txt_pairs")
    assert [r["path"] for r in rec.rows] == [r["path"] for r in env["records"]]
    with pytest.raises(ValueError, match="data_format"):
        readers.detect_format(env["synth"] / "videos" / "000000.mp4")
    with pytest.raises(ValueError, match="no known input"):
        readers.detect_format(env["synth"] / "videos")
    with pytest.raises(ConfigError, match="data_format"):
        from_dict(pp.PreprocessConfig, {**env["base"], "data": "x", "output_dir": "y", "data_format": "parquet"})
    with pytest.raises(ValueError, match="'caption' or 'text'"):
        (tmp_path / "bad.csv").write_text("path,label\na.mp4,x\n")
        readers.read_csv(tmp_path / "bad.csv")


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_rows_and_inputs_are_counted_and_skipped(env, tmp_path):
    """Rows with no caption or no media are reader skips; a member that does not decode is an input failure."""
    syn, recs = env["synth"], env["records"]
    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "a.tar", "w") as tar:
        tar.add(syn / recs[0]["path"], arcname="good.mp4")
        _add(tar, "good.json", json.dumps({"caption": recs[0]["caption"]}).encode())
        tar.add(syn / recs[1]["path"], arcname="nocap.mp4")  # no json: skipped by the reader
        _add(tar, "junk.mp4", np.random.default_rng(0).bytes(2000))  # does not decode: counted by preprocess
        _add(tar, "junk.json", b'{"caption": "a broken clip"}')
        _add(tar, "orphan.json", b'{"caption": "no media"}')
    rec = readers.read_webdataset(wds)
    assert [r["member"] for r in rec.rows] == ["good.mp4", "junk.mp4"]
    assert sorted(s["source"] for s in rec.skipped) == ["a.tar/nocap.mp4", "a.tar/orphan"]
    report, ds = run(env, "bad_wds", data=str(wds), num_workers=2)
    assert report["samples_written"] == 1 and report["inputs_failed"] == 1 and report["records_skipped"] == 2
    assert report["failures"][0]["source"] == "a.tar/junk.mp4"
    assert torch.equal(ds[0]["latents"], by_caption(env["ref"][1])[recs[0]["caption"]])

    (tmp_path / "c.csv").write_text(f"path,caption\n{syn / recs[0]['path']},\n{syn / recs[1]['path']},ok\n")
    assert len(readers.read_csv(tmp_path / "c.csv").rows) == 1
    fv = tmp_path / "fv.json"
    fv.write_text(json.dumps([{"path": "a.mp4", "cap": []}, {"path": "b.mp4", "cap": ["", "second"]}]))
    rec = readers.read_fastvideo_json(fv)
    assert [r["caption"] for r in rec.rows] == ["second"] and rec.skipped[0]["source"] == "a.mp4"
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    with pytest.raises(ValueError, match="2 lines"):
        readers.read_txt_pairs(tmp_path)


def test_workers_decode_and_match_the_main_process(env):
    """num_workers=2: decoding happens in worker processes, the shards equal the in-process ones bit for bit."""
    todo = [(0, r) for r in env["records"]]
    cfg = from_dict(pp.PreprocessConfig, {**env["base"], "data": "x", "output_dir": "y", "num_workers": 2})
    items = list(pp.decoded_inputs(env["synth"], todo, cfg, 4))
    assert [it["row"]["path"] for it in items] == [r["path"] for r in env["records"]]  # order kept
    assert {it["worker"] for it in items} == {0, 1}
    report, ds = run(env, "workers", data=str(env["data"]["jsonl"]), num_workers=2)
    ref = env["ref"][1]
    assert report["samples_written"] == len(ref) == len(ds)
    for i in range(len(ds)):
        assert ds[i]["source"] == ref[i]["source"] and torch.equal(ds[i]["latents"], ref[i]["latents"])


def _counting_clip(path, n, fps):
    """Frame k is a flat grey of value 8k (so the decoded frame's mean says which source frame it is)."""
    frames = np.stack([np.full((32, 32, 3), 8 * k, np.uint8) for k in range(n)])
    write_mp4(path, frames, fps)


def _indices(frames):
    return [int(round(float(f.mean()) / 8)) for f in frames]


def test_target_fps_resamples_frame_times(env, tmp_path):
    _counting_clip(tmp_path / "c24.mp4", 30, 24)
    assert _indices(pp.read_frames(tmp_path / "c24.mp4")) == list(range(30))
    assert _indices(pp.read_frames(tmp_path / "c24.mp4", target_fps=8)) == list(range(0, 30, 3))
    assert _indices(pp.read_frames(tmp_path / "c24.mp4", 6, target_fps=10)) == [0, 2, 4, 7, 9, 12]  # 2.4 apart
    assert _indices(pp.read_frames(tmp_path / "c24.mp4", 5, target_fps=48)) == [0, 0, 1, 1, 2]  # faster: repeat
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "c24.mp4", "caption": "grey"}) + "\n")
    # "family": CogVideoX's pipeline runs at 8 fps -> 10 frames at 8 fps -> 9 (4k+1); without it 17 of 30
    rep8, ds8 = run(env, "fps8", data=str(tmp_path / "m.jsonl"), target_fps="family", max_frames=17)
    rep0, ds0 = run(env, "fps0", data=str(tmp_path / "m.jsonl"), max_frames=17)
    assert ds8[0]["bucket"] == "9x32x32" and ds0[0]["bucket"] == "17x32x32"
    with pytest.raises(ConfigError, match="not both"):
        from_dict(pp.PreprocessConfig, {**env["base"], "data": "x", "output_dir": "y", "target_fps": 8,
                                        "frame_stride": 2})
    with pytest.raises(ConfigError, match="target_fps"):
        from_dict(pp.PreprocessConfig, {**env["base"], "data": "x", "output_dir": "y", "target_fps": 0})


def test_compute_dtype_and_tiling_defaults(env):
    assert pp._resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert pp._resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert pp._resolve_dtype("float16", torch.device("cpu")) == torch.float16
    cfg = from_dict(pp.PreprocessConfig, {"data": "x", "output_dir": "y", "vae": "v", "text_encoder": "t"})
    assert cfg.compute_dtype == "auto" and cfg.vae_tiling == "auto" and cfg.num_workers == "auto"
    assert pp._resolve_workers("auto", torch.device("cpu")) == 0 and pp._resolve_workers(3, torch.device("cpu")) == 3
    assert 1 <= pp._resolve_workers("auto", torch.device("cuda", 0)) <= 8
    # bf16 compute (what CUDA gets by default) stays close to fp32 and is stored in the storage dtype
    data = str(env["data"]["jsonl"])
    _, bf = run(env, "bf16", data=data, compute_dtype="bfloat16", vae_tiling=True)
    ref = env["ref"][1]
    assert bf[0]["latents"].dtype == torch.float32 and bf[0]["prompt_embeds"].dtype == torch.float32
    for i in range(len(ref)):
        err = (bf[i]["latents"] - ref[i]["latents"]).abs().max() / ref[i]["latents"].abs().max()
        assert 0 < err < 0.05, err


def test_compressed_tar_members_are_read_through_tarfile(env, tmp_path):
    """A gzipped shard named .tar has no byte offsets to seek to: its members decode through tarfile."""
    src = sorted(env["data"]["webdataset"].glob("*.tar"))[0]
    (tmp_path / "wds").mkdir()
    with tarfile.open(src) as a, tarfile.open(tmp_path / "wds" / "z.tar", "w:gz") as b:
        for m in a.getmembers():
            b.addfile(m, a.extractfile(m))
    plain, gz = readers.read_webdataset(src), readers.read_webdataset(tmp_path / "wds")
    assert "member_offset" in plain.rows[0] and "member_offset" not in gz.rows[0]
    with pp._input_file(src.parent, plain.rows[0]) as p1, pp._input_file(tmp_path / "wds", gz.rows[0]) as p2:
        assert p1.read_bytes() == p2.read_bytes() == (env["synth"] / env["records"][0]["path"]).read_bytes()
