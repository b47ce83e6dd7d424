"""Writes latent samples as numbered webdataset shards plus the ``dataset.json`` manifest.

Used by ``rfkit encode`` and by anything else that produces latents (reflow pairs, for one)::

    with LatentShardWriter("data/latents", samples_per_shard=1000, manifest={"scaling_factor": 0.18215}) as out:
        for latent, label in items:
            out.write({"latent": latent, "cls": label})  # latent (C, H, W) float16/float32 numpy

A shard is written to ``shard-000007.tar.partial`` and renamed to ``shard-000007.tar`` only when
it is full (or is the last one), and the manifest is rewritten after every finished shard: a run
that dies leaves finished shards and a manifest that lists exactly them. Such a run resumes by
skipping the finished shards (:meth:`LatentShardWriter.is_complete`, :meth:`skip_shard`); the
writer never overwrites a finished shard.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rfkit.data.schema import FORMAT, KEYS, MANIFEST, RESERVED, VERSION, member, shape_name, shard_name, to_bytes


def _plain(value: Any) -> Any:
    """JSON round trip, so tuples compare equal to the lists a loaded manifest holds."""
    return json.loads(json.dumps(value))


def write_manifest(
    out_dir: Path, extra: Mapping[str, Any], keys, shapes: Mapping[str, Any], entries: list[dict[str, Any]]
) -> None:
    """Writes ``dataset.json`` atomically: the computed fields from the shard ``entries``, then ``extra``.

    Args:
        out_dir: the data set's directory.
        extra: scaling, shift and provenance fields.
        keys: the sample keys every shard holds.
        shapes: fixed shapes of ``text`` / ``pooled`` (latent shapes come from the entries).
        entries: one ``{"name", "samples", "latent_shapes"}`` per finished shard.
    """
    shards = sorted(entries, key=lambda e: e["name"])
    latent = sorted({tuple(int(x) for x in s.split("x")) for e in shards for s in e["latent_shapes"]})
    data = {
        "format": FORMAT,
        "version": VERSION,
        **extra,
        "keys": sorted(keys),
        "shapes": {"latent": [list(s) for s in latent], **{k: v for k, v in shapes.items() if k != "latent"}},
        "num_samples": sum(e["samples"] for e in shards),
        "shards": shards,
    }
    tmp = Path(out_dir) / f"{MANIFEST}.partial"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, Path(out_dir) / MANIFEST)


def merge_parts(out_dir: str | Path, parts: Iterable[str | Path]) -> dict[str, Any]:
    """Moves the shards of part data sets (written by one writer per rank, with disjoint ``numbers``)
    into ``out_dir`` and writes one manifest for them all.

    Idempotent, so a merge that died half-way is finished by running it again: a shard already in
    place is kept. The parts must share their manifest's extra fields and keys.

    Returns:
        The combined manifest.
    """
    out_dir = Path(out_dir)
    entries: dict[str, dict[str, Any]] = {}
    extra, keys, shapes = None, None, {}
    for part in parts:
        meta = json.loads((Path(part) / MANIFEST).read_text())
        mine = {k: v for k, v in meta.items() if k not in RESERVED}
        if extra is None:
            extra, keys = mine, meta["keys"]
        elif mine != extra or meta["keys"] != keys:
            raise ValueError(f"{part} was written with other settings than the other parts; they cannot be merged")
        shapes.update(meta["shapes"])
        for entry in meta["shards"]:
            name = entry["name"]
            if name in entries:
                raise ValueError(f"{name} is in two parts; each part must write its own shard numbers")
            source, target = Path(part) / name, out_dir / name
            if source.exists():
                os.replace(source, target)
            elif not target.exists():
                raise FileNotFoundError(f"{source} is gone and {target} does not exist")
            entries[name] = entry
    write_manifest(out_dir, extra or {}, keys or (), shapes, list(entries.values()))
    return json.loads((out_dir / MANIFEST).read_text())


class LatentShardWriter:
    """A context manager that writes samples into shards of ``samples_per_shard`` and keeps ``dataset.json``.

    Args:
        out_dir: directory for the shards and the manifest (created if missing).
        samples_per_shard: samples per shard; the last shard may hold fewer.
        manifest: fields for ``dataset.json``: ``scaling_factor`` and ``shift_factor`` (defaults 1
            and 0: model latent = (latent - shift) * scaling), and any free-form provenance (VAE,
            text encoder, teacher checkpoint, ...). Resuming into a directory whose manifest says
            otherwise is refused, so shards of two different encodings never mix.
        numbers: the numbers of the shards this writer writes, in order (default 0, 1, 2, ...).
            Several writers, one per rank, each write every world-th shard of one data set into
            folders of their own; :func:`merge_parts` then gathers them. Sample keys are
            ``number * samples_per_shard + position``, unique across the data set.
    """

    def __init__(
        self,
        out_dir: str | Path,
        samples_per_shard: int = 1000,
        manifest: Mapping | None = None,
        numbers: Iterable[int] | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        extra = _plain(dict(manifest or {}))
        taken = sorted(set(extra) & set(RESERVED))
        if taken:
            raise ValueError(f"manifest fields {taken} are computed by the writer; any other field name is free")
        extra = {"scaling_factor": 1.0, "shift_factor": 0.0, **extra}
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.extra = extra
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.finished: dict[str, dict[str, Any]] = {}
        self.keys: tuple[str, ...] | None = None
        self.shapes: dict[str, Any] = {}
        self._resume_from(self.out_dir / MANIFEST)
        self._numbers = iter(numbers) if numbers is not None else itertools.count()
        self.index = self._next()
        self._tar = None
        self._file = None
        self._count = 0
        self._latent_shapes = Counter()

    def _next(self) -> int | None:
        """The number of the next shard, None once the given numbers are used up."""
        return next(self._numbers, None)

    def _resume_from(self, path: Path) -> None:
        if not path.exists():
            return
        old = json.loads(path.read_text())
        before = {k: v for k, v in old.items() if k not in RESERVED}
        if before != self.extra:
            diff = sorted(k for k in set(before) | set(self.extra) if before.get(k) != self.extra.get(k))
            raise ValueError(
                f"{self.out_dir} holds shards written with another manifest (fields {diff} differ); "
                "write to a new directory, or resume with the same settings"
            )
        self.finished = {s["name"]: s for s in old["shards"]}
        self.keys = tuple(old["keys"])
        self.shapes = {k: v for k, v in old["shapes"].items() if k != "latent"}

    # ------------------------------------------------------------------ resuming

    def is_complete(self, index: int) -> bool:
        """Whether shard ``index`` was finished by this or an earlier run (listed and on disk)."""
        name = shard_name(index)
        return name in self.finished and (self.out_dir / name).exists()

    def skip_shard(self) -> None:
        """Moves past the current shard, which an earlier run finished (resume)."""
        if self._count:
            raise RuntimeError(f"{shard_name(self.index)} is being written; only a finished shard can be skipped")
        if not self.is_complete(self.index):
            raise RuntimeError(f"{shard_name(self.index)} is not finished in {self.out_dir}; write it instead")
        self.index = self._next()

    # ------------------------------------------------------------------ writing

    def write(self, sample: Mapping[str, np.ndarray | int]) -> None:
        """Appends one sample: ``latent`` (C, H, W) and any of ``cls``, ``text``, ``pooled``, ``noise``."""
        if self.index is None:
            raise ValueError("every shard number given to this writer is used up")
        number = self.index * self.samples_per_shard + self._count
        keys = tuple(sorted(sample))
        if "latent" not in keys or not set(keys) <= set(KEYS):
            raise ValueError(f"sample {number} has keys {list(keys)}; it needs 'latent' and may hold {list(KEYS[1:])}")
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise ValueError(f"sample {number} has keys {list(keys)}; every sample of this data set has {self.keys}")
        try:
            members = {member(k): to_bytes(k, v) for k, v in sample.items()}
        except ValueError as err:
            raise ValueError(f"sample {number}: {err}") from None
        self._check_shapes(sample, number)
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": f"{number:09d}", **members})
        self._latent_shapes[shape_name(sample["latent"].shape)] += 1
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def _check_shapes(self, sample: Mapping[str, Any], number: int) -> None:
        if sample["latent"].ndim not in (1, 3):
            shape = sample["latent"].shape
            raise ValueError(f"sample {number}: latent.npy has shape {shape}; expected (C, H, W) or (D,)")
        if "noise" in sample and sample["noise"].shape != sample["latent"].shape:
            raise ValueError(f"sample {number}: noise.npy has shape {sample['noise'].shape}, unlike latent.npy")
        for key in ("text", "pooled"):
            if key in sample:
                shape = list(sample[key].shape)
                expected = self.shapes.setdefault(key, shape)
                if shape != expected:
                    was = tuple(expected)
                    raise ValueError(f"sample {number}: {key}.npy has shape {tuple(shape)}; earlier ones {was}")

    def _open(self) -> None:
        from webdataset import TarWriter

        name = shard_name(self.index)
        if name in self.finished or (self.out_dir / name).exists():
            raise FileExistsError(
                f"{self.out_dir / name} exists and the writer never overwrites; skip it (skip_shard) or remove it"
            )
        self._file = open(self.out_dir / f"{name}.partial", "wb")  # noqa: SIM115 (closed in _finish / _abort)
        self._tar = TarWriter(self._file, encoder=False, mtime=0)  # mtime fixed: equal inputs, equal bytes

    def _finish(self) -> None:
        name = shard_name(self.index)
        self._tar.close()
        self._file.close()
        os.replace(self.out_dir / f"{name}.partial", self.out_dir / name)
        self.finished[name] = {"name": name, "samples": self._count, "latent_shapes": dict(self._latent_shapes)}
        self._write_manifest()
        self.index, self._tar, self._file, self._count, self._latent_shapes = self._next(), None, None, 0, Counter()

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            (self.out_dir / f"{shard_name(self.index)}.partial").unlink(missing_ok=True)
            self._tar, self._count = None, 0

    def _write_manifest(self) -> None:
        write_manifest(self.out_dir, self.extra, self.keys or (), self.shapes, list(self.finished.values()))

    def close(self) -> None:
        """Finishes the last, possibly short, shard."""
        if self._count:
            self._finish()

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an error the shard in progress is dropped: the manifest lists only whole shards
        if exc_type is None:
            self.close()
        else:
            self._abort()
