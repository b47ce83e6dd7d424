"""The latent shard format (version 1): what a sample holds and what ``dataset.json`` says.

A shard is a tar file in webdataset's layout: the members of one sample share a key and differ by
their extension::

    000000123.latent.npy   (C, H, W) float16 | float32   the VAE latent, as the VAE gave it (unscaled)
    000000123.cls          a decimal integer in ASCII    optional class label
    000000123.text.npy     (L, D) float16 | float32      optional per-token text embeddings
    000000123.pooled.npy   (D,) float16 | float32        optional pooled text embedding
    000000123.noise.npy    like latent                   optional reflow noise x0 (model space, never scaled)

``.npy`` members are NumPy's format, read with ``allow_pickle=False``: a shard cannot make the reader
run code. Every shard of a data set holds the same keys. ``dataset.json`` sits next to the shards::

    {"format": "rfkit-latent-shards", "version": 1,
     "scaling_factor": 1.5305, "shift_factor": 0.0609,     # model latent = (latent - shift) * scaling
     "keys": ["cls", "latent", "pooled", "text"],
     "shapes": {"latent": [[16, 32, 32], [16, 24, 40]], "text": [77, 384], "pooled": [384]},
     "num_samples": 2000,
     "shards": [{"name": "shard-000000.tar", "samples": 1000, "latent_shapes": {"16x32x32": 900, ...}}, ...],
     "vae": {...}, "text_encoder": {...}, ...}             # free-form provenance

The scaling is SD3's and Flux's: ``(latent - shift_factor) * scaling_factor`` (SD1/2 and SDXL have
``shift_factor = 0``). Batches reach the model scaled; the shards keep the VAE's own numbers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "rfkit-latent-shards"
VERSION = 1
MANIFEST = "dataset.json"
"""The manifest's file name, next to the shards."""


@dataclass(frozen=True)
class Field:
    """One key a sample (and a batch) may hold.

    Attributes:
        label: an integer class label (an ASCII tar member; batched as (B,) int64), else a float array.
        cond: conditioning the model reads (:data:`COND_KEYS`), rather than data.
        row_ndim: dimensions of one sample's value when fixed (cls 0, text 2, pooled 1).
    """

    label: bool = False
    cond: bool = False
    row_ndim: int | None = None


FIELDS = {
    "latent": Field(),
    "cls": Field(label=True, cond=True, row_ndim=0),
    "text": Field(cond=True, row_ndim=2),
    "pooled": Field(cond=True, row_ndim=1),
    "noise": Field(),
}
"""The one table of sample keys: the reader, the writer, the training module, ``rfkit sample`` and
``rfkit reflow`` derive what they do with a key from it."""
KEYS = tuple(FIELDS)
COND_KEYS = tuple(k for k, f in FIELDS.items() if f.cond)
"""Batch keys passed to the model as conditioning (see :data:`rfkit.models.Cond`)."""
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
SHARD_FIELDS = ("name", "samples", "latent_shapes")
RESERVED = ("format", "version", "keys", "shapes", "num_samples", "shards")
"""Manifest fields the writer computes; a caller's manifest may not set them."""


class BadSample(ValueError):
    """A sample that must not reach the model; the message names the shard, the sample and the key."""


def shape_name(shape: tuple[int, ...]) -> str:
    """(4, 32, 32) -> "4x32x32" (the manifest's shape keys)."""
    return "x".join(str(s) for s in shape)


def shard_name(index: int) -> str:
    """The file name rfkit's writer gives shard ``index``: ``shard-000007.tar``."""
    return f"shard-{index:06d}.tar"


def member(key: str) -> str:
    """The tar member extension of a sample key: labels are text (``cls``), the rest ``.npy``."""
    return key if FIELDS[key].label else f"{key}.npy"


# ---------------------------------------------------------------------------------- arrays


def check_array(key: str, value: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Raises ValueError unless ``value`` is a finite float16/float32 array (of ``shape`` if given)."""
    if not isinstance(value, np.ndarray) or value.dtype not in FLOAT_DTYPES:
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"{member(key)} has dtype {kind}; expected float16 or float32")
    if shape is not None and value.shape != tuple(shape):
        raise ValueError(f"{member(key)} has shape {value.shape}; expected {tuple(shape)}")
    if not np.isfinite(value).all():
        raise ValueError(f"{member(key)} holds {int((~np.isfinite(value)).sum())} NaN or inf values")
    return value


def to_bytes(key: str, value: Any) -> bytes:
    """Encodes one field of a sample as its tar member's bytes (never pickled)."""
    if FIELDS[key].label:
        if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{key} must be a non-negative int, got {value!r}")
        return str(int(value)).encode()
    buf = io.BytesIO()
    np.save(buf, check_array(key, value), allow_pickle=False)
    return buf.getvalue()


def from_bytes(key: str, data: bytes) -> np.ndarray | int:
    """Decodes one tar member; ``allow_pickle=False`` refuses object arrays. Errors name the member."""
    if FIELDS[key].label:
        text = data.decode("ascii", errors="replace").strip()
        if not text.isdigit():
            raise ValueError(f"{key} is {text[:20]!r}, not a non-negative integer")
        return int(text)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:  # truncated, not .npy, or an object (pickled) array
        raise ValueError(f"{member(key)} is not a plain .npy array: {err}") from None


# ---------------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """``dataset.json``, checked. ``shards`` maps a shard's file name to its entry."""

    keys: tuple[str, ...]
    latent_shapes: set[tuple[int, ...]]
    text_shape: tuple[int, ...] | None = None
    pooled_shape: tuple[int, ...] | None = None
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "dataset.json") -> Manifest:
        if raw.get("format") != FORMAT:
            raise ValueError(f"{source} is not an rfkit latent manifest (format {raw.get('format')!r}, not {FORMAT!r})")
        if raw.get("version") != VERSION:
            raise ValueError(f"{source} has schema version {raw.get('version')!r}; this rfkit reads version {VERSION}")
        missing = [k for k in ("keys", "shapes", "shards") if k not in raw]
        missing += [f"shards[{i}].{k}" for i, e in enumerate(raw.get("shards", [])) for k in SHARD_FIELDS if k not in e]
        if missing:
            raise ValueError(f"{source} lacks {missing[:5]}; rfkit.data.LatentShardWriter writes complete manifests")
        keys = tuple(raw["keys"])
        unknown = set(keys) - set(KEYS)
        if "latent" not in keys or unknown:
            raise ValueError(f"{source}: keys {list(keys)} must include 'latent' and lie in {list(KEYS)}")
        shapes = raw["shapes"]
        return cls(
            keys=keys,
            latent_shapes={tuple(s) for s in shapes["latent"]},
            text_shape=tuple(shapes["text"]) if "text" in keys else None,
            pooled_shape=tuple(shapes["pooled"]) if "pooled" in keys else None,
            scaling_factor=float(raw.get("scaling_factor", 1.0)),
            shift_factor=float(raw.get("shift_factor", 0.0)),
            shards={s["name"]: s for s in raw["shards"]},
            raw=dict(raw),
        )

    @classmethod
    def load(cls, url: str) -> Manifest:
        """Reads ``dataset.json`` from a path or any URL webdataset opens."""
        from webdataset import gopen

        try:
            with gopen(url) as f:
                raw = json.loads(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no manifest at {url}: latent shards need the dataset.json that rfkit's writer puts next to them "
                "(rfkit encode, rfkit.data.LatentShardWriter); for shards another tool wrote, "
                "`rfkit index --shards DIR` scans them and writes it, or pass its location as `manifest`"
            ) from None
        return cls.from_dict(raw, url)

    def decode(self, raw: Mapping[str, bytes], shard: str) -> dict[str, np.ndarray | int]:
        """Decodes and checks one sample's members; raises :class:`BadSample` naming shard, sample and key."""
        where = f"{shard}: sample {raw.get('__key__', '?')}"
        out: dict[str, np.ndarray | int] = {}
        for key in self.keys:
            name = member(key)
            if name not in raw:
                raise BadSample(f"{where}: missing {name} (this data set's keys: {list(self.keys)})")
            try:
                value = from_bytes(key, raw[name])
                if not FIELDS[key].label:
                    value = check_array(key, value, self._shape(key, out))
                if key == "latent" and value.shape not in self.latent_shapes:
                    shapes = sorted(self.latent_shapes)
                    raise ValueError(f"latent.npy has shape {value.shape}; the data set's shapes are {shapes}")
            except ValueError as err:
                raise BadSample(f"{where}: {err}") from None
            out[key] = value
        return out

    def _shape(self, key: str, decoded: Mapping[str, Any]) -> tuple[int, ...] | None:
        if key == "text":
            return self.text_shape
        if key == "pooled":
            return self.pooled_shape
        if key == "noise" and "latent" in decoded:
            return decoded["latent"].shape
        return None
