#!/usr/bin/env python
"""Preprocess throughput with decode + resize in the main process (0 workers) vs in DataLoader workers.

    python benchmarks/bench_preprocess.py            # ~1.5 min on 2 cores; --videos / --frames / --size / --workers

Two measurements on the same synthetic mp4 clips (libx264, made once in a temp folder):
  decode + resize   fastpost.data.preprocess.decoded_inputs alone: ffmpeg decode, bucket, resize + crop
  end to end        fastpost.data.preprocess.preprocess with the tiny CogVideoX VAE + tiny T5 (model loading
                    included: it is a few ms for the tiny models), shards written to a fresh folder each run
Workers overlap decoding with the VAE encode in the main process, so their gain end to end is bounded by
whichever side is slower; with real VAEs on a GPU the encode is short and decoding dominates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import machine_line, markdown_table  # also puts the repo on sys.path

from fastpost.config import from_dict  # noqa: E402
from fastpost.data import preprocess as pp  # noqa: E402
from fastpost.data.synthetic import SyntheticConfig, generate  # noqa: E402
from fastpost.data.tiny import build_tiny_text_encoder, build_tiny_vae  # noqa: E402
from fastpost.models import get_family  # noqa: E402


def measure(root: Path, workers: list[int], args) -> list[list[str]]:
    fam = get_family("cogvideox")
    data = root / "synth" / "metadata.jsonl"
    vae, te = build_tiny_vae(root / "vae", fam), build_tiny_text_encoder(root / "te")
    base = dict(data=str(data), vae=str(vae), text_encoder=str(te), resolutions=[(args.out, args.out)],
                max_frames=args.frames, samples_per_shard=4, max_text_length=16)
    base_dir, records, _ = pp.read_metadata(data)
    items = [(0, r) for r in records]
    decode = {w: float("inf") for w in workers}
    e2e = dict(decode)
    for r in range(args.repeats):  # the settings take turns, so load from other jobs drifts onto both alike
        for w in workers:
            cfg = from_dict(pp.PreprocessConfig, {**base, "output_dir": str(root / f"out-w{w}-{r}"), "num_workers": w})
            t0 = time.perf_counter()
            n = sum("pixels" in it for it in pp.decoded_inputs(base_dir, items, cfg, 4))
            decode[w] = min(decode[w], time.perf_counter() - t0)
            assert n == len(records), f"only {n} of {len(records)} clips decoded"
            t0 = time.perf_counter()
            report = pp.preprocess(cfg, fam)
            e2e[w] = min(e2e[w], time.perf_counter() - t0)
            assert report["samples_written"] == len(records)
    rows = [[str(w), f"{len(records) / decode[w]:.1f}", f"{len(records) / e2e[w]:.1f}"] for w in workers]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--frames", type=int, default=17, help="frames per clip (all are used: 4k+1)")
    p.add_argument("--size", type=int, default=256, help="source clip height and width")
    p.add_argument("--out", type=int, default=48, help="resolution bucket (square)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3, help="best of N runs")
    args = p.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SyntheticConfig(out_dir=str(root / "synth"), num_videos=args.videos, frames=[args.frames],
                                 sizes=[(args.size, args.size)], fps=24, seed=0))
        rows = measure(root, args.workers, args)
    print(f"\n{args.videos} clips of {args.frames}x{args.size}x{args.size} -> {args.frames}x{args.out}x{args.out}, "
          f"best of {args.repeats}\n")
    print(markdown_table(["workers", "decode + resize (videos/s)", "end to end, tiny VAE + T5 (videos/s)"], rows))


if __name__ == "__main__":
    main()
