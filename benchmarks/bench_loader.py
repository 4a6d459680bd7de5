#!/usr/bin/env python
"""Shard loader vs one-.pt-file-per-sample loader on the same data, same batches, one run.

    python benchmarks/bench_loader.py            # ~15 s on 2 cores; --samples / --batch-size to change

Both loaders read in the consuming process (no workers) and iterate the identical batch order from
BucketBatchSampler, so the difference is the storage format: one mmap'd safetensors file per N samples with
per-tensor reads, vs a torch.load (pickle + zip) per sample and a file open per sample.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a fresh checkout without install

from fastpost.data import shards  # noqa: E402
from fastpost.data.loader import BucketBatchSampler, ShardLoader, collate  # noqa: E402


def make_samples(n: int, seed: int = 0):
    """Latents shaped like a small CogVideoX job (16 ch, 2 buckets), T5-ish prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        frames = 5 if i % 3 else 1  # two shape buckets: 5-latent-frame clips and 1-frame images
        yield {
            "latents": torch.randn(16, frames, 12, 20, generator=g),
            "prompt_embeds": torch.randn(32, 64, generator=g),
            "prompt_attention_mask": torch.ones(32, dtype=torch.long),
            "caption": f"sample {i}", "source": f"{i}.mp4", "bucket": f"{frames * 4 - 3}x96x160",
        }


def write_both(root: Path, n: int, per_shard: int) -> tuple[Path, Path]:
    shard_dir, pt_dir = root / "shards", root / "pt"
    pt_dir.mkdir(parents=True)
    shards.create_manifest(shard_dir, {"note": "bench"})
    buf = []
    for i, s in enumerate(make_samples(n)):
        torch.save(s, pt_dir / f"{i:07d}.pt")
        buf.append(s)
        if len(buf) == per_shard or i == n - 1:
            shards.append_manifest(shard_dir, shards.write_shard(shard_dir, i // per_shard, buf))
            buf = []
    return shard_dir, pt_dir


class PtPerSampleLoader:
    """The baseline: one torch.save'd dict per sample, read with torch.load on demand."""

    def __init__(self, pt_dir: Path, sampler: BucketBatchSampler) -> None:
        self.files = sorted(pt_dir.glob("*.pt"))
        self.sampler = sampler

    def __iter__(self):
        for indices in self.sampler:
            yield collate([torch.load(self.files[i], weights_only=True) for i in indices], indices)


def time_epoch(loader) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = sum(len(b["captions"]) for b in loader)
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="epochs per loader; the best is reported")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the box is shared; both loaders are single-threaded readers anyway
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shard_dir, pt_dir = write_both(Path(tmp), args.samples, args.samples_per_shard)
        print(f"wrote {args.samples} samples both ways in {time.perf_counter() - t0:.1f} s "
              f"(batch {args.batch_size}, {args.samples_per_shard} samples/shard, page cache warm)")
        keys = ShardLoader(shard_dir, args.batch_size, seed=0).dataset.shape_keys()

        def make_pt():
            return PtPerSampleLoader(pt_dir, BucketBatchSampler(keys, args.batch_size, seed=0))

        # Same data, same order: check before timing so the comparison is apples to apples.
        a, b = next(iter(ShardLoader(shard_dir, args.batch_size, seed=0))), next(iter(make_pt()))
        assert a["indices"] == b["indices"] and torch.equal(a["latents"], b["latents"])
        rows = []
        shard_files, pt_files = list(shard_dir.glob("*.safetensors")), list(pt_dir.glob("*.pt"))
        for name, make, files in [
            ("safetensors shards (fastpost)", lambda: ShardLoader(shard_dir, args.batch_size, seed=0), shard_files),
            ("safetensors shards, sha256 verify",
             lambda: ShardLoader(shard_dir, args.batch_size, seed=0, verify=True), shard_files),
            ("one .pt file per sample", make_pt, pt_files),
        ]:
            best = None
            for _ in range(args.repeats):
                n, dt = time_epoch(make())
                best = dt if best is None or dt < best else best
            size = sum(f.stat().st_size for f in files)
            rows.append((name, n, best, n / best, len(files), size / 2**20))
    print(f"\n| {'loader':<34} | {'samples':>7} | {'best epoch s':>12} | {'samples/s':>9} | {'files':>5} | {'MiB':>6} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 14}|{'-' * 11}|{'-' * 7}|{'-' * 8}|")
    for name, n, dt, rate, nfiles, mib in rows:
        print(f"| {name:<34} | {n:>7} | {dt:>12.3f} | {rate:>9.0f} | {nfiles:>5} | {mib:>6.1f} |")
    print(f"\nshards / per-sample .pt speedup: {rows[0][3] / rows[2][3]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
