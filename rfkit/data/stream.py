"""Reading latent shards: who reads which shard, decoding, shuffling and shape-bucketed batches.

Every (rank, DataLoader worker) pair is a *slot*. Shards are dealt to slots once, balanced by their
sample counts from the manifest (largest first, each to the slot holding fewest samples), so no
two slots read the same shard and none starves. Within a slot, samples of one latent shape are
batched together (shape buckets); a batch never mixes shapes.

Two modes:

- **stream** (training, ``batches_per_epoch`` given): each slot loops over its shards forever,
  in a fresh seeded order every pass, through a shuffle buffer; an epoch is exactly
  ``batches_per_epoch`` batches per rank, on every rank.
- **one pass** (validation, ``batches_per_epoch=None``): shards in order, every sample exactly
  once, partial batches flushed at the end. Every rank yields the same number of batches (some
  batches are split in two to even the count out), so lock-step strategies cannot hang on a rank
  that ran out.

Bad data never stops the stream by itself: a shard that cannot be read (missing, truncated,
corrupt) is skipped with a warning and flagged; a sample that fails the schema checks
(:meth:`rfkit.data.schema.Manifest.decode`) is dropped with a warning. The flags and counts live
in shared memory so the data module can log and police them in the main process.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing as mp
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from rfkit.data.batches import stream_seed
from rfkit.data.schema import FIELDS, BadSample, Manifest

WARN_PER_SHARD = 3  # rejected samples named one by one per shard; the rest are summed up


class DataWarning(UserWarning):
    """Bad data that was skipped: an unreadable shard or a rejected sample."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is, its manifest name, and its sample count per latent shape."""

    url: str
    name: str
    shapes: tuple[tuple[tuple[int, ...], int], ...]

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.shapes)


def deal(shards: list[ShardInfo], slots: int) -> list[list[int]]:
    """Shard indices per slot, balanced by samples; each slot's list is in shard order."""
    heap, out = [(0, s) for s in range(slots)], [[] for _ in range(slots)]  # (samples held, slot)
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i].samples, i)):
        load, slot = heapq.heappop(heap)
        out[slot].append(i)
        heapq.heappush(heap, (load + shards[i].samples, slot))
    return [sorted(s) for s in out]


def count_batches(shards: list[ShardInfo], batch_size: int) -> tuple[int, int]:
    """(batches, samples) of one ordered pass over ``shards``: each shape gives ceil(n / batch_size) batches."""
    per_shape: dict[tuple[int, ...], int] = {}
    for shard in shards:
        for shape, n in shard.shapes:
            per_shape[shape] = per_shape.get(shape, 0) + n
    return sum(math.ceil(n / batch_size) for n in per_shape.values()), sum(per_shape.values())


class ShardStream(IterableDataset):
    """Batches ``{"latent", "cls"?, "text"?, "pooled"?, "noise"?}`` from latent shards for one rank.

    Load with ``DataLoader(stream, batch_size=None, num_workers=num_workers)``: the stream is
    built for that many workers and refuses to run with another number.

    Args:
        shards: the data set's shards, in order.
        manifest: its ``dataset.json``; supplies the schema checks and the latent scaling.
        batch_size: samples per batch.
        batches_per_epoch: batches per epoch on this rank (stream mode), or None for one pass.
        rank, world: this process's rank and the number of ranks.
        num_workers: the DataLoader's workers (0 = read in the main process).
        shuffle_buffer: samples held for shuffling in stream mode (per worker).
        seed: seeds shard orders and the shuffle buffer.
    """

    def __init__(
        self,
        shards: list[ShardInfo],
        manifest: Manifest,
        batch_size: int,
        batches_per_epoch: int | None,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        self.workers = max(1, num_workers)
        slots = world * self.workers
        if len(shards) < slots:
            raise ValueError(
                f"{len(shards)} shards cannot feed {world} ranks x {self.workers} workers = {slots} readers: "
                "every reader needs a shard of its own; write smaller shards (samples_per_shard) or use fewer workers"
            )
        self.shards = shards
        self.manifest = manifest
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank = rank
        self.world = world
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.slots = deal(shards, slots)
        self.extra_splits = self._even_out() if batches_per_epoch is None else [0] * self.workers
        # shared with the worker processes: unreadable-shard flags, [samples read, rejected], passes per worker
        self.bad = mp.Array("b", len(shards))
        self.stats = mp.Array("q", 2)
        self.passes = mp.Array("q", self.workers)

    def _even_out(self) -> list[int]:
        """Extra batches each of this rank's workers makes by splitting batches, so all ranks yield ``len(self)``."""
        counts = [count_batches([self.shards[i] for i in slot], self.batch_size) for slot in self.slots]
        per_rank = [sum(b for b, _ in counts[r * self.workers : (r + 1) * self.workers]) for r in range(self.world)]
        self.length = max(per_rank)
        mine = counts[self.rank * self.workers : (self.rank + 1) * self.workers]
        need, splits = self.length - per_rank[self.rank], []
        for batches, samples in mine:
            take = min(need, samples - batches)  # a batch of n samples splits into at most n
            splits.append(take)
            need -= take
        if need:
            raise ValueError(
                f"rank {self.rank} holds too few validation samples to match the {self.length} batches of another rank "
                f"(batch_size {self.batch_size}); use fewer ranks or workers, or a larger validation set"
            )
        return splits

    def __len__(self) -> int:
        return self.batches_per_epoch if self.batches_per_epoch is not None else self.length

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"this stream was built for {self.workers} loader workers but runs with {workers}")
        slot = self.slots[self.rank * self.workers + worker]
        if self.batches_per_epoch is None:
            yield from self._one_pass(slot, self.extra_splits[worker])
            return
        quota = self.batches_per_epoch // workers + int(worker < self.batches_per_epoch % workers)
        with self.passes.get_lock():
            epoch = self.passes[worker]
            self.passes[worker] += 1
        yield from self._stream(slot, quota, random.Random(stream_seed(self.seed, self.rank, worker, epoch)))

    def _one_pass(self, slot: list[int], splits: int) -> Iterator[dict[str, Tensor]]:
        buckets: dict[tuple[int, ...], list] = {}
        for i in slot:
            for sample in self._read(i):
                bucket = buckets.setdefault(sample["latent"].shape, [])
                bucket.append(sample)
                if len(bucket) == self.batch_size:
                    splits = yield from self._emit(buckets.pop(sample["latent"].shape), splits)
        for bucket in buckets.values():
            splits = yield from self._emit(bucket, splits)

    def _emit(self, samples: list, splits: int):
        """Yields ``samples`` as one batch, or as up to ``splits + 1`` smaller ones; returns the splits left."""
        pieces = min(len(samples), splits + 1)
        for part in np.array_split(np.arange(len(samples)), pieces):
            yield self._collate([samples[j] for j in part])
        return splits - (pieces - 1)

    def _stream(self, slot: list[int], quota: int, rng: random.Random) -> Iterator[dict[str, Tensor]]:
        buffer, buckets, done = [], {}, 0
        while done < quota:
            pool = [i for i in slot if not self.bad[i]] or [i for i in range(len(self.shards)) if not self.bad[i]]
            rng.shuffle(pool)
            read = 0
            for i in pool:
                for sample in self._read(i):
                    read += 1
                    buffer.append(sample)
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    drawn = buffer.pop()
                    bucket = buckets.setdefault(drawn["latent"].shape, [])
                    bucket.append(drawn)
                    if len(bucket) == self.batch_size:
                        yield self._collate(buckets.pop(drawn["latent"].shape))
                        done += 1
                        if done == quota:
                            return
            if not read:
                names = [self.shards[i].name for i in (pool or slot)][:5]
                raise RuntimeError(f"no readable sample in any shard of this reader (e.g. {names}); see the warnings")

    def _read(self, i: int) -> Iterator[dict[str, np.ndarray | int]]:
        """Decoded, checked samples of shard ``i``; unreadable shards and bad samples are warned about and skipped."""
        from webdataset import gopen
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        shard, read, rejected = self.shards[i], 0, 0
        try:
            with gopen(shard.url) as stream:
                for raw in group_by_keys(dict(s, __url__=shard.url) for s in tar_file_iterator(stream)):
                    try:
                        sample = self.manifest.decode(raw, shard.name)
                    except BadSample as err:
                        rejected += 1
                        if rejected <= WARN_PER_SHARD:
                            warnings.warn(f"rejected {err}", DataWarning, stacklevel=2)
                        continue
                    read += 1
                    yield sample
            if read + rejected != shard.samples:
                raise OSError(f"it holds {read + rejected} samples but the manifest lists {shard.samples} (truncated?)")
        except Exception as err:  # any failure to read is the shard's fault, never the run's: skip it
            self.bad[i] = 1
            why = f"{type(err).__name__}: {err}"
            warnings.warn(f"skipped unreadable shard {shard.url}: {why}", DataWarning, stacklevel=2)
        finally:
            if rejected > WARN_PER_SHARD:
                warnings.warn(f"{shard.name}: {rejected} samples rejected in all", DataWarning, stacklevel=2)
            with self.stats.get_lock():
                self.stats[0] += read + rejected
                self.stats[1] += rejected

    def _collate(self, samples: list[dict]) -> dict[str, Tensor]:
        m = self.manifest
        latent = torch.from_numpy(np.stack([s["latent"] for s in samples])).float()
        batch = {"latent": (latent - m.shift_factor) * m.scaling_factor}
        for key in m.keys:
            if key == "latent":
                continue
            if FIELDS[key].label:
                batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
            else:
                batch[key] = torch.from_numpy(np.stack([s[key] for s in samples])).float()
        return batch
