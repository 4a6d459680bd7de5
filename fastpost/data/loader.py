"""Distributed, bucketed, resumable batches over a latent shard folder.

Semantics (what the trainer relies on):
  * The sampler depends only on (dp_rank, dp_size). Ranks of one SP group share a dp_rank, so they receive
    the *same* batch, which they then split along the sequence; different dp ranks receive disjoint batches.
  * Every batch holds samples of one latent shape (bucketing), so tensors stack without padding.
  * The epoch's global batch list is a pure function of (seed, epoch, sample shapes); each dp rank takes
    every dp_size-th batch. The list is padded (or, with drop_last, truncated) to a multiple of dp_size so
    every rank runs the same number of steps: no rank waits forever in a collective.
  * state_dict() after k batches + load_state_dict() in a fresh process yields exactly batch k+1 onward.
  * `forever()` prefetches (LoaderConfig.prefetch batches ahead) on a background thread that walks its own copy
    of the sampler; each batch travels with the sampler state right after it, which becomes the loader's state
    when training takes the batch. So prefetching changes neither the batches nor the state (the same as reading
    in the consuming thread). On CUDA the batch tensors are pinned, so the trainer's copy to the GPU is async.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
import torch

from fastpost.data.shards import OPTIONAL_TENSOR_FIELDS, TENSOR_FIELDS, ShardDataset, ShardError

@dataclass
class LoaderConfig:
    path: str  # folder holding manifest.jsonl
    batch_size: int = 1  # per dp rank
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False  # False: pad incomplete buckets by repeating samples (every sample seen each epoch)
    verify_checksums: bool = False  # sha256 each shard on first open (reads every byte once)
    prefetch: int = 2  # batches read ahead on a background thread by forever() (0: read in the training thread)


class BucketBatchSampler:
    """Yields lists of sample indices for one dp rank; all ranks agree on the global order without talking."""

    def __init__(self, shape_keys: Sequence[Hashable], batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_samples = len(shape_keys)
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, key in enumerate(shape_keys):
            groups[key].append(i)
        # Sorted by repr so the bucket order is identical on every rank and in every process.
        self._groups = [groups[k] for k in sorted(groups, key=repr)]
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None
        if len(self) == 0:
            sizes = {repr(k): len(v) for k, v in groups.items()}
            raise ValueError(
                f"no batches: {self.num_samples} samples in buckets {sizes} give fewer than dp_size={dp_size} full "
                f"batches of {batch_size}; lower batch_size, or set drop_last=False to pad buckets"
            )

    @classmethod
    def from_parallel_dims(cls, shape_keys: Sequence[Hashable], batch_size: int, dims: Any, **kw: Any):
        """dims: a fastpost.distributed.ParallelDims after build_mesh() (dp_rank is 0 at world 1)."""
        return cls(shape_keys, batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp, **kw)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The whole epoch's batch list (identical on every rank); rank r takes items r, r+dp_size, ..."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for idx in self._groups:
            order = [idx[i] for i in rng.permutation(len(idx))] if self.shuffle else list(idx)
            full, rest = divmod(len(order), self.batch_size)
            batches += [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(full)]
            if rest and not self.drop_last:
                tail = order[full * self.batch_size:]
                # Pad with the bucket's own samples (cycling) so the batch still stacks and nothing is dropped.
                tail += [order[i % len(order)] for i in range(self.batch_size - rest)]
                batches.append(tail)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            batches = batches[:len(batches) // self.dp_size * self.dp_size]
        elif batches and len(batches) % self.dp_size:
            extra = self.dp_size - len(batches) % self.dp_size
            batches += [batches[i % len(batches)] for i in range(extra)]
        return batches

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.global_batches(epoch)[self.dp_rank::self.dp_size])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return len(self._rank_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch, unless it is the epoch we are already in (resume)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; afterwards the state points at the next epoch's first batch."""
        if self.position >= len(self._rank_batches(self.epoch)):  # resumed exactly at an epoch boundary
            self.epoch, self.position = self.epoch + 1, 0
        batches = self._rank_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1  # before yielding: state_dict() taken after consuming k batches says k
            yield list(batch)
        self.epoch, self.position = self.epoch + 1, 0

    def upcoming(self, n: int) -> list[list[int]]:
        """The next n batches this rank will read (crossing into later epochs), without moving the state."""
        out: list[list[int]] = []
        epoch, position = self.epoch, self.position
        while len(out) < n:
            batches = (self._rank_batches(epoch) if epoch == self.epoch
                       else self.global_batches(epoch)[self.dp_rank::self.dp_size])
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                continue
            out.append(list(batches[position]))
            position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        # The position is kept in global batches (every dp rank has consumed `position` of its share), so a
        # resume with another dp size continues at the same global batch.
        return {"epoch": self.epoch, "position": self.position, "global_position": self.position * self.dp_size,
                "seed": self.seed, "batch_size": self.batch_size, "dp_size": self.dp_size, "dp_rank": self.dp_rank,
                "num_samples": self.num_samples, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "epoch_batches": len(self.global_batches(self.epoch))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # dp_rank may differ (every rank's state is identical apart from it, so rank 0's copy serves all);
        # anything that changes the global batch list may not.
        for k in ("seed", "batch_size", "num_samples", "shuffle", "drop_last"):
            if state[k] != getattr(self, k):
                raise ValueError(
                    f"loader state was saved with {k}={state[k]!r} but this loader has {k}={getattr(self, k)!r}; "
                    f"resuming would not continue the same sample order. Use the original setting, or start a "
                    f"fresh epoch by not loading the loader state"
                )
        epoch = int(state["epoch"])
        global_position = int(state.get("global_position", int(state["position"]) * int(state["dp_size"])))
        if state["dp_size"] != self.dp_size:
            # the epoch's batch list is padded to a multiple of dp_size: it must come out the same
            saved_len = state.get("epoch_batches")
            if saved_len != len(self.global_batches(epoch)) or global_position % self.dp_size:
                raise ValueError(
                    f"loader state was saved at dp_size={state['dp_size']} after {global_position} global batches "
                    f"of an epoch of {saved_len}; at dp_size={self.dp_size} that is not a whole step or the epoch "
                    f"pads differently. Resume with a data-parallel size that divides both, or the original one"
                )
        self.epoch, self.position = epoch, global_position // self.dp_size


def collate(samples: list[dict[str, Any]], indices: list[int] | None = None) -> dict[str, Any]:
    """Stack tensors (latents [B,C,F,H,W], prompt_embeds [B,T,D], prompt_attention_mask [B,T]) + list metadata."""
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack latents of different shapes {sorted(shapes)} in one batch; "
                         f"batches must come from BucketBatchSampler (one shape per batch)")
    batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in TENSOR_FIELDS}
    # image-to-video conditioning (the shard header's conditioning.fields): what family.predict takes as `cond`
    extra = [k for k in samples[0] if isinstance(samples[0][k], torch.Tensor) and k not in TENSOR_FIELDS
             and k not in OPTIONAL_TENSOR_FIELDS]
    if extra:
        batch["cond"] = {k: torch.stack([s[k] for s in samples]) for k in extra}
    for k in OPTIONAL_TENSOR_FIELDS:  # e.g. pooled_prompt_embeds [B, D]: stacked when every sample has it
        if all(k in s for s in samples):
            batch[k] = torch.stack([s[k] for s in samples])
    batch["captions"] = [s["caption"] for s in samples]
    batch["sources"] = [s["source"] for s in samples]
    batch["buckets"] = [s["bucket"] for s in samples]
    if indices is not None:
        batch["indices"] = list(indices)
    return batch


class ShardLoader:
    """Iterate collated batches of a shard folder for one dp rank; resumable via state_dict()."""

    def __init__(self, dataset: ShardDataset | str | Path, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, verify: bool = False,
                 require: tuple[str, ...] = (), prefetch: int = 0) -> None:
        """require: conditioning fields the model needs (family.cond_fields(config)); shards without them raise.
        prefetch: batches read ahead on a background thread (0: read in the calling thread)."""
        if prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0 (batches read ahead), got {prefetch}")
        self.prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self.dataset = dataset if isinstance(dataset, ShardDataset) else ShardDataset(dataset, verify=verify,
                                                                                      require=require)
        lacking = [f for f in require if f not in self.dataset.cond_fields]
        if lacking:
            raise ShardError(f"the shards in {self.dataset.root} carry no {lacking}, which an image-to-video model "
                             f"needs: preprocess again with the I2V model's pipeline (transformer=<its folder>)")
        self.sampler = BucketBatchSampler(self.dataset.shape_keys(), batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                          seed=seed, shuffle=shuffle, drop_last=drop_last)
        self.dataset.check_sizes()  # a stat per shard: a truncated file fails here, on every rank alike

    def check_next(self, n_batches: int) -> None:
        """Raise the ShardError that reading the next n batches would raise, without reading their tensors
        (the trainer runs this on every rank at a step boundary, where all ranks can stop together)."""
        for indices in self.sampler.upcoming(n_batches):
            for i in indices:
                self.dataset.check_sample(i)

    @classmethod
    def from_parallel_dims(cls, dataset: ShardDataset | str | Path, batch_size: int, dims: Any,
                           **kw: Any) -> "ShardLoader":
        """SP peers share dims.dp_rank, hence get identical batches; dims.dp ranks split the data."""
        return cls(dataset, batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp, **kw)

    @classmethod
    def from_config(cls, cfg: LoaderConfig, dims: Any = None, require: tuple[str, ...] = ()) -> "ShardLoader":
        dp_rank, dp_size = (dims.dp_rank, dims.dp) if dims is not None else (0, 1)
        return cls(cfg.path, cfg.batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed,
                   shuffle=cfg.shuffle, drop_last=cfg.drop_last, verify=cfg.verify_checksums, require=require,
                   prefetch=cfg.prefetch)

    @property
    def header(self) -> dict[str, Any]:
        """The manifest header: VAE family + latent normalisation + text encoder settings used to make the data."""
        return self.dataset.header

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for indices in self.sampler:
            yield collate([self.dataset[i] for i in indices], indices)

    def forever(self) -> Iterator[dict[str, Any]]:
        """Endless stream across epochs (for step-based training); the state stays exact throughout, also with
        prefetch (then the reads happen on a background thread)."""
        if not self.prefetch:
            while True:
                yield from self
        self.close()
        self._prefetcher = _Prefetcher(self, self.prefetch, pin=torch.cuda.is_available())
        prefetcher = self._prefetcher
        try:
            while True:
                batch, (epoch, position) = prefetcher.get()
                self.sampler.epoch, self.sampler.position = epoch, position  # the state after this batch
                yield batch
        finally:
            prefetcher.stop()

    def close(self) -> None:
        """Stop a running prefetch thread (forever() restarts it from the current state)."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()  # batches read ahead belong to the old position
        self.sampler.load_state_dict(state)


class _Prefetcher:
    """Reads batches ahead on a daemon thread, from a copy of the loader's sampler; errors arrive in order."""

    _END = object()

    def __init__(self, loader: ShardLoader, depth: int, pin: bool):
        self.loader, self.pin = loader, pin
        self.sampler = copy.deepcopy(loader.sampler)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fastpost-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                for indices in self.sampler:
                    state = (self.sampler.epoch, self.sampler.position)  # right after this batch was taken
                    batch = collate([self.loader.dataset[i] for i in indices], indices)
                    if self.pin:
                        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    if not self._put((batch, state)):
                        return
        except BaseException as e:  # a bad shard: raised in the training thread when it reaches that batch
            self._put((self._END, e))

    def get(self):
        item = self.queue.get()
        if item[0] is self._END:
            raise item[1]
        return item

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
