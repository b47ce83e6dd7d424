"""Indexing latent shards that another tool wrote: scan them, then write the ``dataset.json`` they lack.

:class:`rfkit.data.LatentShards` reads any webdataset shards whose members follow
:mod:`rfkit.data.schema` (``<key>.latent.npy``, ``<key>.cls``, ``<key>.text.npy``, ...), but it
needs the manifest to deal shards to ranks by sample count and to bucket latent shapes. A cache
written by your own encoder or another trainer has none; ``rfkit index`` (``rfkit.commands.index``)
makes it from what the shards hold:

- the keys (the member names every sample has), the text / pooled shapes, and per shard the
  sample count and the count of each latent shape;
- shards that cannot be read (truncated, not a tar) are reported and left out of the manifest;
- samples that would be rejected at training time (a missing member, a wrong dtype or shape,
  NaN / inf) are reported by shard and sample, and counted: the reader drops them the same way.

Members that are not rfkit's (``latents.pt``, ``caption.txt``) are refused with the names rfkit
reads: rename them, since the training reader looks for exactly those.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rfkit.data.schema import KEYS, MANIFEST, check_array, from_bytes, member, shape_name
from rfkit.data.writer import write_manifest

__all__ = ["ShardScan", "index_shards", "scan_shard"]

MEMBERS = {member(k): k for k in KEYS}  # "latent.npy" -> "latent", "cls" -> "cls", ...


@dataclass
class ShardScan:
    """What one shard holds.

    Attributes:
        name: the shard's file name (the manifest's key for it).
        samples: samples in the shard.
        latent_shapes: count of each latent shape, ``{"4x32x32": 900, ...}``.
        keys: the keys of the first sample (every sample must have the same).
        shapes: ``text`` / ``pooled`` shapes.
        problems: one line per sample the training reader would reject.
    """

    name: str
    samples: int = 0
    latent_shapes: Counter = field(default_factory=Counter)
    keys: tuple[str, ...] = ()
    shapes: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def entry(self) -> dict:
        """The manifest's entry for this shard."""
        return {"name": self.name, "samples": self.samples, "latent_shapes": dict(self.latent_shapes)}


def _samples(path: Path):
    """(sample key, {member: bytes}) in tar order; webdataset's rule: the key is the name up to the first dot."""
    current, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # streaming: one pass, truncation raises
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != current and members:
                yield current, members
                members = {}
            current = key
            members[ext] = tar.extractfile(info).read()
    if members:
        yield current, members


def scan_shard(path: str | Path) -> ShardScan:
    """Reads every sample of one shard.

    Raises:
        tarfile.TarError, EOFError, OSError: the shard cannot be read (truncated, not a tar).
        ValueError: a member rfkit does not read, naming it and the ones it does.
    """
    path = Path(path)
    scan, shapeless = ShardScan(path.name), 0
    for key, members in _samples(path):
        unknown = sorted(set(members) - set(MEMBERS))
        if unknown:
            raise ValueError(
                f"{path.name}: sample {key} has members {unknown} that rfkit does not read; rfkit's members are "
                f"{sorted(MEMBERS)} (latents as .npy arrays, never pickled); rename them before indexing"
            )
        keys = tuple(sorted(MEMBERS[m] for m in members))
        scan.keys, scan.samples, latent = scan.keys or keys, scan.samples + 1, None
        try:
            if keys != scan.keys:
                raise ValueError(f"has keys {list(keys)}, the shard's first sample {list(scan.keys)}")
            values = {MEMBERS[m]: from_bytes(MEMBERS[m], data) for m, data in members.items()}
            latent = values.get("latent")
            _check(values, scan.shapes)
        except ValueError as err:
            scan.problems.append(f"{path.name}: sample {key}: {err}")
        if isinstance(latent, np.ndarray):
            scan.latent_shapes[shape_name(latent.shape)] += 1
        else:
            shapeless += 1
    if shapeless:  # the reader checks that the shape counts add up to the samples it reads and rejects
        most = scan.latent_shapes.most_common(1)
        scan.latent_shapes[most[0][0] if most else "0"] += shapeless
    return scan


def _check(values: dict, shapes: dict[str, list[int]]) -> None:
    """Raises ValueError for a sample the training reader would reject; fixes text / pooled shapes in ``shapes``."""
    if not isinstance(values.get("latent"), np.ndarray) or values["latent"].ndim not in (1, 3):
        raise ValueError("latent.npy must be an array of shape (C, H, W) or (D,)")
    for name, value in values.items():
        if name != "cls":
            check_array(name, value, values["latent"].shape if name == "noise" else None)
        if name in ("text", "pooled") and shapes.setdefault(name, list(value.shape)) != list(value.shape):
            raise ValueError(f"{member(name)} has shape {value.shape}, earlier samples {tuple(shapes[name])}")


def index_shards(paths: list[Path], out_dir: Path, extra: dict) -> dict:
    """Scans ``paths`` and writes ``out_dir/dataset.json`` for the readable ones.

    Args:
        paths: the shard files.
        out_dir: where the manifest goes (the shards' directory).
        extra: manifest fields besides the computed ones (``scaling_factor``, ``shift_factor``,
            provenance such as ``vae``).

    Returns:
        A report: shards and samples indexed, keys, latent shapes, unreadable shards with the
        reason, and the samples the reader will reject.

    Raises:
        ValueError: no shard is readable, or the shards disagree on keys or text shapes.
    """
    scans, unreadable = [], {}
    for path in paths:
        try:
            scans.append(scan_shard(path))
        except (tarfile.TarError, EOFError, OSError) as err:
            unreadable[path.name] = f"{type(err).__name__}: {err}"
    if not scans:
        raise ValueError(f"none of the {len(paths)} shards could be read: {unreadable}")
    first = scans[0]
    for scan in scans[1:]:
        for what, mine, theirs in (("keys", scan.keys, first.keys), ("shapes", scan.shapes, first.shapes)):
            if mine != theirs:
                raise ValueError(f"{scan.name} has {what} {mine}, {first.name} {theirs}; one data set has one schema")
    write_manifest(out_dir, extra, first.keys, first.shapes, [s.entry() for s in scans])
    shapes = sum((s.latent_shapes for s in scans), Counter())
    return {
        "manifest": str(out_dir / MANIFEST),
        "shards": len(scans),
        "samples": sum(s.samples for s in scans),
        "keys": list(first.keys),
        "latent_shapes": dict(shapes),
        "unreadable": unreadable,
        "rejected": [p for s in scans for p in s.problems],
    }
