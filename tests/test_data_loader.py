"""Loader: bucketing, dp/sp semantics at world 4 (dp 2 x sp 2), equal step counts, exact resume."""

import itertools
import json
from collections import Counter

import pytest
import torch

from fastpost.data import shards
from fastpost.data.loader import BucketBatchSampler, LoaderConfig, ShardLoader
from fastpost.distributed import ParallelDims
from tests._harness import run_distributed

# Three buckets (latent frames 1 = images, 3 and 5 = videos) of sizes 10, 8, 6.
BUCKET_SIZES = {1: 10, 3: 8, 5: 6}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    shards.create_manifest(root, {"note": "loader test"})
    frames = [f for f, n in BUCKET_SIZES.items() for _ in range(n)]
    frames = [frames[(i * 7) % len(frames)] for i in range(len(frames))]  # interleave buckets across shards
    for s in range(0, len(frames), 5):
        samples = []
        for i in range(s, min(s + 5, len(frames))):
            samples.append({
                "latents": torch.full((4, frames[i], 2, 2), float(i)),
                "prompt_embeds": torch.full((6, 8), float(i)),
                "prompt_attention_mask": torch.ones(6, dtype=torch.long),
                "caption": f"sample {i}", "source": f"{i}.mp4", "bucket": f"f{frames[i]}",
            })
        shards.append_manifest(root, shards.write_shard(root, s // 5, samples))
    return root


def _ids(batch) -> list[int]:
    return [int(v) for v in batch["latents"][:, 0, 0, 0, 0]]


def test_batches_are_bucketed_and_well_formed(dataset_dir):
    loader = ShardLoader(dataset_dir, batch_size=3, seed=0)
    seen = Counter()
    for batch in loader:
        B = len(batch["captions"])
        assert batch["latents"].shape[0] == B == 3 and batch["latents"].ndim == 5
        assert batch["prompt_embeds"].shape == (3, 6, 8) and batch["prompt_attention_mask"].shape == (3, 6)
        assert len(set(batch["buckets"])) == 1  # one shape per batch
        assert batch["captions"] == [f"sample {i}" for i in _ids(batch)] == [f"sample {i}" for i in batch["indices"]]
        seen.update(_ids(batch))
    assert set(seen) == set(range(24))  # drop_last=False: every sample at least once (buckets padded)


def test_dp_split_disjoint_equal_length_and_deterministic():
    keys = [(f,) for f, n in {1: 7, 3: 5, 5: 2}.items() for _ in range(n)]  # nothing divides evenly
    for drop_last in (False, True):
        samplers = [BucketBatchSampler(keys, 2, dp_rank=r, dp_size=3, seed=5, drop_last=drop_last) for r in range(3)]
        lengths = {len(s) for s in samplers}
        assert len(lengths) == 1  # same number of steps on every dp rank: no rank hangs in a collective
        per_rank = [list(s) for s in samplers]
        assert {len(b) for b in per_rank} == lengths
        for batches in per_rank:
            assert all(len({keys[i] for i in b}) == 1 and len(b) == 2 for b in batches)
        flat = [i for b in per_rank for batch in b for i in batch]
        if drop_last:
            assert len(flat) == len(set(flat))  # no repeats at all
        else:
            assert set(flat) == set(range(len(keys)))
    # Same seed + epoch -> same order on a fresh object; another epoch or seed -> another order.
    a = BucketBatchSampler(keys, 2, seed=5)
    assert a.global_batches(0) == BucketBatchSampler(keys, 2, seed=5).global_batches(0)
    assert a.global_batches(0) != a.global_batches(1)
    assert a.global_batches(0) != BucketBatchSampler(keys, 2, seed=6).global_batches(0)


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than dp_size=4 full batches"):
        BucketBatchSampler([(1,)] * 5, 2, dp_rank=0, dp_size=4, drop_last=True)


@pytest.mark.parametrize("k", [0, 3, 11, 12, 13])
def test_resume_yields_exactly_the_next_batches(dataset_dir, k):
    """State after k batches -> JSON -> a loader built from scratch yields batches k+1..., also across epochs."""
    ref = ShardLoader(dataset_dir, batch_size=2, seed=11)
    stream = ref.forever()
    expected = [next(stream) for _ in range(20)]  # 12 batches per epoch: crosses into epoch 1
    first = ShardLoader(dataset_dir, batch_size=2, seed=11)
    it = first.forever()
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardLoader(dataset_dir, batch_size=2, seed=11)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed.forever(), 20 - k))
    assert [b["indices"] for b in got] == [b["indices"] for b in expected[k:]]
    for g, e in zip(got, expected[k:]):
        assert torch.equal(g["latents"], e["latents"]) and torch.equal(g["prompt_embeds"], e["prompt_embeds"])


def test_resume_at_epoch_end_and_set_epoch(dataset_dir):
    loader = ShardLoader(dataset_dir, batch_size=2, seed=1)
    epoch0 = [b["indices"] for b in itertools.islice(iter(loader), len(loader))]  # consumed, not exhausted
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, len(loader))
    fresh = ShardLoader(dataset_dir, batch_size=2, seed=1)
    fresh.load_state_dict(state)
    fresh.set_epoch(0)  # a trainer calling set_epoch(current) after resuming must not restart the epoch
    epoch1 = [b["indices"] for b in fresh]
    assert epoch1 == [b for b in fresh.sampler.global_batches(1)] and epoch1 != epoch0
    assert fresh.state_dict()["epoch"] == 2 and fresh.state_dict()["position"] == 0


def test_state_from_another_setup_is_rejected(dataset_dir):
    state = ShardLoader(dataset_dir, batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with batch_size=2 but this loader has batch_size=4"):
        ShardLoader(dataset_dir, batch_size=4, seed=1).load_state_dict(state)


def test_from_config_at_world_1(dataset_dir):
    dims = ParallelDims(world_size=1)
    dims.build_mesh("cpu")  # no process group at world 1: dp_rank 0, dp 1
    loader = ShardLoader.from_config(LoaderConfig(path=str(dataset_dir), batch_size=2, seed=3), dims)
    assert len(loader) == 12 and loader.header["note"] == "loader test"


def _world4_worker(rank: int, world: int, root: str, out_dir: str) -> None:
    dims = ParallelDims(ulysses=2, world_size=4)
    dims.build_mesh("cpu")
    loader = ShardLoader.from_parallel_dims(root, 2, dims, seed=3)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([{"indices": b["indices"], "ids": _ids(b), "sum": float(b["latents"].sum())} for b in loader])
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"dp_rank": dims.dp_rank, "sp_rank": dims.sp_rank, "epochs": epochs}, f)


def test_world4_dp2_sp2(dataset_dir, tmp_path):
    run_distributed(_world4_worker, 4, str(dataset_dir), str(tmp_path))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["dp_rank"], r["sp_rank"]) for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in range(2):
        # SP peers (same dp_rank) see identical batches, tensor data included.
        assert res[0]["epochs"][epoch] == res[1]["epochs"][epoch]
        assert res[2]["epochs"][epoch] == res[3]["epochs"][epoch]
        a = [i for b in res[0]["epochs"][epoch] for i in b["ids"]]
        b = [i for b in res[2]["epochs"][epoch] for i in b["ids"]]
        assert len(res[0]["epochs"][epoch]) == len(res[2]["epochs"][epoch]) == 6  # 12 batches / dp 2
        assert not set(a) & set(b)  # dp ranks are disjoint...
        assert sorted(a + b) == list(range(24))  # ...and together cover the epoch exactly once
    assert res[0]["epochs"][0] != res[0]["epochs"][1]  # reshuffled per epoch
