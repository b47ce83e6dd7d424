"""LatentShards: precomputed latents (and text embeddings) from webdataset shards, at scale.

The format is :mod:`rfkit.data.schema`'s (``dataset.json`` next to ``shard-000000.tar``, ...), as
``rfkit encode`` and :class:`rfkit.data.LatentShardWriter` write it. How shards are dealt to ranks
and workers, shuffled and bucketed by shape is :mod:`rfkit.data.stream`'s.

Bad data, as real pipelines produce it:

- a shard named but absent, a shard the manifest does not list, or fewer shards than readers
  (ranks x workers): an error at start; ranks compare notes first, so a shard missing from one
  node's disk stops every rank instead of leaving the others waiting;
- a truncated or corrupt shard: skipped with a warning naming it; ``data/skipped`` (unreadable
  shards so far, all ranks) is logged every ``log_every_n_steps``, and once more than
  ``max_skip_fraction`` of the training (or validation) shards were skipped the run stops with an
  error that lists them: the same decision on every rank, so none is left waiting;
- a sample with a missing key, a wrong shape or dtype, NaN or inf: dropped with a warning naming
  the shard, the sample and the key, counted in ``data/rejected``. Nothing non-finite reaches the model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from urllib.parse import urlparse

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from rfkit.data.batches import per_rank_batch, rank_and_world
from rfkit.data.schema import MANIFEST, Manifest
from rfkit.data.stream import ShardInfo, ShardStream

__all__ = ["LatentShards", "read_rows", "resolve_shards", "vae_decoder"]


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def resolve_shards(shards: str | list[str], manifest: str | None = None) -> tuple[list[ShardInfo], Manifest]:
    """Expands shard specs and matches them with the manifest.

    Args:
        shards: a directory (all the shards its manifest lists), a path or URL with brace
            patterns (``data/shard-{000000..000099}.tar``, ``https://host/shard-{000..009}.tar``,
            ``pipe:curl -s URL``), or a list of those.
        manifest: where ``dataset.json`` is; default: next to the first shard.

    Raises:
        FileNotFoundError: a local shard or the manifest is missing (all missing shards are named).
        ValueError: a shard the manifest does not list, or one named twice.
    """
    from webdataset.shardlists import expand_urls

    specs = [str(shards)] if isinstance(shards, (str, os.PathLike)) else [str(s) for s in shards]
    if not specs:
        raise ValueError("no shards given")
    first = specs[0]
    if manifest is None:  # in the directory given, or next to the first shard
        if _is_local(first) and os.path.isdir(_local_path(first)):
            manifest = f"{first.rstrip('/')}/{MANIFEST}"
        else:
            manifest = f"{expand_urls(first)[0].rsplit('/', 1)[0]}/{MANIFEST}"
    info = Manifest.load(manifest)
    urls: list[str] = []
    for spec in specs:
        if _is_local(spec) and os.path.isdir(_local_path(spec)):
            urls += [os.path.join(spec, name) for name in sorted(info.shards)]
        else:
            urls += expand_urls(spec)
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(_local_path(u))]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards are missing: {missing[:5]}{more}")
    out = []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if name not in info.shards:
            raise ValueError(f"shard {url} is not listed in {manifest} (which lists {len(info.shards)} shards)")
        shapes = info.shards[name]["latent_shapes"]
        out.append(ShardInfo(url, name, tuple((tuple(int(x) for x in k.split("x")), n) for k, n in shapes.items())))
    if len({s.url for s in out}) != len(out):
        raise ValueError("a shard is named twice; every sample must appear once per pass")
    return out, info


def vae_decoder(info: Manifest) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Model latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1], when the manifest names a VAE.

    The manifest holds the VAE's local path (as given to ``rfkit encode --vae``) and the scaling
    the loader applied, ``z = (latent - shift) * scale``; decoding undoes it:
    ``vae.decode(z / scale + shift)``, on the CPU. None when there is no VAE to use (pixel data, a
    missing path, diffusers not installed: with a warning).
    """
    vae = info.raw.get("vae")
    if not vae:
        return None
    try:
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(vae["path"], local_files_only=True).eval()
    except (ImportError, OSError) as err:
        warnings.warn(
            f"the data's VAE ({vae.get('path')}) cannot be loaded ({err}); run from where the path holds "
            "(rfkit encode stored it as given), or install diffusers; keeping raw latents",
            stacklevel=2,
        )
        return None
    scale, shift = info.scaling_factor, info.shift_factor

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z.float().cpu() / scale + shift).sample.clamp(-1, 1)

    return decode


class LatentShards(pl.LightningDataModule):
    """Training and validation batches from latent shards, split across ranks and workers.

    Batches follow rfkit's schema: ``latent`` (B, C, H, W) float32, scaled as the manifest says
    (``(latent - shift_factor) * scaling_factor``), and the keys the data set holds: ``cls`` (B,)
    int64, ``text`` (B, L, D), ``pooled`` (B, D), ``noise`` (B, C, H, W). Every batch holds one
    latent shape, so the module's resolution-dependent timestep shift sees that batch's tokens.
    Checkpoints record how many epochs the training stream began, so a resumed run continues
    with fresh orders instead of replaying the first ones.

    Args:
        shards: training shards: a directory, a brace pattern or URL, or a list
            (see :func:`resolve_shards`).
        val_shards: validation shards, read once in order (every sample exactly once); None for none.
        batch_size: samples per batch and per rank.
        val_batch_size: for validation, per rank (default: the training batch per rank).
        batches_per_epoch: training batches per epoch and per rank (the stream itself is endless).
        num_workers: DataLoader worker processes per rank (0 = read in the training process).
        shuffle_buffer: samples each worker holds for shuffling.
        manifest: path or URL of ``dataset.json`` when it is not next to the shards.
        val_manifest: the same for ``val_shards`` (default: ``manifest``, else next to them).
        max_skip_fraction: stop once more than this share of the shards proved unreadable.
        seed: seeds shard orders and shuffling.
        global_batch_size: samples per optimizer step over all ranks; when set, each rank takes
            ``global_batch_size / (world size x accumulate_grad_batches)`` and ``batch_size`` is unused.
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        batches_per_epoch: int = 1000,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        manifest: str | None = None,
        val_manifest: str | None = None,
        max_skip_fraction: float = 0.05,
        seed: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must lie in [0, 1], got {max_skip_fraction}")
        if batch_size < 1 or batches_per_epoch < 1 or num_workers < 0:
            raise ValueError("batch_size and batches_per_epoch must be >= 1 and num_workers >= 0")
        self.spec = shards
        self.val_spec = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.global_batch_size = global_batch_size
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.manifest = manifest
        self.val_manifest = val_manifest or manifest
        self.max_skip_fraction = max_skip_fraction
        self.seed = seed
        self.streams: dict[str, ShardStream] = {}
        self._reported_at = -1
        self._passes: list[int] | None = None  # from a checkpoint: resumed runs do not replay the same order

    @override
    def setup(self, stage: str | None = None) -> None:
        # checked before any step; ranks agree on the outcome (a rank whose disk lacks a shard
        # must not leave the others waiting in their first all-reduce)
        self.batch_size = per_rank_batch(self.global_batch_size, self.batch_size, self.trainer)  # same on every rank
        error = None
        try:
            self.train, self.info = resolve_shards(self.spec, self.manifest)
            self.val = resolve_shards(self.val_spec, self.val_manifest) if self.val_spec is not None else None
        except (OSError, ValueError) as err:
            error = err
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            flag = torch.tensor([float(error is not None)], device=trainer.strategy.root_device)
            if float(trainer.strategy.reduce(flag, reduce_op="max")) > 0 and error is None:
                raise RuntimeError("another rank could not open its shards (its error says why); stopping every rank")
        if error is not None:
            raise error

    def decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The training manifest's VAE decoder (:func:`vae_decoder`, loaded once), or None without a VAE."""
        if not hasattr(self, "_decoder"):
            if not hasattr(self, "info"):
                self.setup("validate")
            self._decoder = vae_decoder(self.info)
        return self._decoder

    def _loader(self, split: str, shards, info, batch_size: int, batches: int | None) -> DataLoader:
        rank, world = rank_and_world()
        stream = ShardStream(
            shards, info, batch_size, batches, rank, world, self.num_workers, self.shuffle_buffer, self.seed
        )
        self.streams[split] = stream
        if split == "train" and self._passes is not None and len(self._passes) == len(stream.passes):
            stream.passes[:] = self._passes
        workers = self.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    @override
    def train_dataloader(self) -> DataLoader:
        if not hasattr(self, "train"):
            self.setup("fit")
        return self._loader("train", self.train, self.info, self.batch_size, self.batches_per_epoch)

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not hasattr(self, "train"):
            self.setup("validate")
        if self.val is None:
            return []
        return self._loader("val", *self.val, self.val_batch_size or self.batch_size, None)

    @override
    def state_dict(self) -> dict:
        """Saved in checkpoints: how many epochs each worker of the training stream has begun."""
        return {"passes": list(self.streams["train"].passes)} if "train" in self.streams else {}

    @override
    def load_state_dict(self, state: dict) -> None:
        self._passes = state.get("passes")

    # ------------------------------------------------------------------ bad-data accounting

    @override
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training and trainer.log_every_n_steps > 0:
            step = trainer.global_step
            if step % trainer.log_every_n_steps == 0 and step != self._reported_at:
                self._reported_at = step
                self.report(trainer)
        return batch

    def report(self, trainer: pl.Trainer) -> None:
        """Sums the bad-data counts of all ranks, logs them, and stops past ``max_skip_fraction``.

        Called at the same step on every rank (it all-reduces), from training only.
        """
        splits = list(self.streams.items())
        device = trainer.strategy.root_device  # NCCL reduces CUDA tensors only
        flags = torch.tensor([f for _, s in splits for f in s.bad[:]], dtype=torch.float32, device=device)
        stats = torch.tensor([sum(s.stats[1] for _, s in splits)], dtype=torch.float32, device=device)
        flags = trainer.strategy.reduce(flags, reduce_op="max")  # a shard skipped anywhere is skipped
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
        metrics = {"data/skipped": float(flags.sum()), "data/rejected": float(stats[0])}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        start = 0
        for split, stream in splits:
            mine = flags[start : start + len(stream.shards)].tolist()
            bad = [s.name for s, f in zip(stream.shards, mine, strict=True) if f]
            start += len(stream.shards)
            if len(bad) > self.max_skip_fraction * len(stream.shards):
                raise RuntimeError(
                    f"{len(bad)} of {len(stream.shards)} {split} shards were unreadable, more than "
                    f"max_skip_fraction={self.max_skip_fraction}: {bad[:10]}"
                )


def read_rows(
    shards: str | list[str], keys: list[str], first: int, n: int, manifest: str | None = None
) -> dict[str, np.ndarray]:
    """Rows ``first .. first + n - 1`` of ``keys``, counting samples in the shards' order, cycled.

    Row ``i`` is sample ``i mod N`` of the N samples of ``shards`` (listed as :func:`resolve_shards`
    lists them, each shard in its stored order): e.g. ``text`` (n, L, D) and ``pooled`` (n, D) of the
    captions a teacher trained on, for ``rfkit reflow --prompts_from``. Arrays keep the shards'
    dtype; each shard needed is read once per call. Order matters here, so a sample that fails its
    checks is an error (naming shard and sample), not a skip.
    """
    from webdataset import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    infos, info = resolve_shards(shards, manifest)
    absent = sorted(set(keys) - set(info.keys))
    if absent:
        raise ValueError(f"the shards {shards} hold no {absent} (their keys: {list(info.keys)})")
    starts = np.cumsum([0] + [s.samples for s in infos])
    total = int(starts[-1])
    if total == 0:
        raise ValueError(f"the shards {shards} hold no samples")
    wanted: dict[int, list[tuple[int, int]]] = {}  # shard -> [(sample in shard, row)]
    for row in range(n):
        i = (first + row) % total
        k = int(np.searchsorted(starts, i, side="right")) - 1
        wanted.setdefault(k, []).append((i - int(starts[k]), row))
    out: dict[str, list] = {key: [None] * n for key in keys}
    for k, rows in wanted.items():
        need = dict.fromkeys(j for j, _ in rows)
        found: dict[int, dict] = {}
        with gopen(infos[k].url) as stream:
            for j, raw in enumerate(group_by_keys(dict(s, __url__=infos[k].url) for s in tar_file_iterator(stream))):
                if j in need:
                    found[j] = info.decode(raw, infos[k].name)
                if len(found) == len(need):
                    break
        if len(found) < len(need):
            raise ValueError(f"{infos[k].url} holds fewer samples than its manifest lists ({infos[k].samples})")
        for j, row in rows:
            for key in keys:
                out[key][row] = found[j][key]
    return {key: np.stack(values) for key, values in out.items()}
