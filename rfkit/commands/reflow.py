"""``rfkit reflow``: (noise, sample) pairs from a trained flow, as latent shards for k-rectified flow.

Reflow (Liu et al. 2022) retrains on the deterministic coupling ``(Z0, ODE_teacher(Z0))``: its paths
do not cross, so the new flow is straighter and samples well in fewer steps. Pairs are written in
rfkit's shard format (``noise.npy`` beside ``latent.npy``, plus ``cls`` when the teacher is
class-conditional), ready for ``rfkit.data.LatentShards`` and the ``Reflow`` coupling.

Work is split in shards of ``samples_per_shard`` pairs. Shard k's noise comes from a generator
seeded by (seed, k), so the pairs do not depend on how many ranks made them. Under ``torchrun``
each rank takes shards k = rank, rank + world, ... into its own part folder; when all are done,
rank 0 moves them into ``out`` under their global numbers and writes one ``dataset.json`` that
records the teacher and the solver. A rerun after a crash skips finished shards (same world size).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rfkit.checkpoint import load_checkpoint
from rfkit.commands.sample import load_condition
from rfkit.data.schema import COND_KEYS, FIELDS, MANIFEST
from rfkit.data.shards import read_rows, resolve_shards
from rfkit.data.writer import LatentShardWriter, merge_parts
from rfkit.distributed import stream_seed
from rfkit.solvers import Solver


def _rank_world() -> tuple[int, int]:
    """Rank and world size from torchrun's environment; joins the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def _pairs(flow, out: Path, shards: list[int], total: int, per_shard: int, extra: dict, cfg: dict) -> None:
    """Writes shards ``shards`` (global numbers) of ``total`` pairs into ``out`` (a part folder)."""
    shape = tuple(flow.model.latent_shape)
    device = next(flow.parameters()).device
    with LatentShardWriter(out, per_shard, extra, numbers=shards) as writer:
        for k in shards:
            if writer.is_complete(writer.index):
                writer.skip_shard()
                continue
            first, n = k * per_shard, min(per_shard, total - k * per_shard)
            x0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(stream_seed(cfg["seed"], k)))
            cond = load_condition(cfg["labels"], cfg["cond_file"], n, offset=first)  # pair i: condition i (cycled)
            if cfg["prompts_from"]:  # pair i: the i-th caption of the teacher's shards (cycled)
                rows = read_rows(cfg["prompts_from"], cfg["prompt_keys"], first, n)
                cond.update({key: torch.from_numpy(v) for key, v in rows.items()})
            for start in range(0, n, cfg["batch_size"]):
                part = slice(start, start + cfg["batch_size"])
                c = {key: v[part].to(device) for key, v in cond.items()}
                x1 = flow.sample(x0[part].to(device), c, **cfg["sampling"].kwargs()).float().cpu()
                for i in range(x1.shape[0]):
                    sample = {"latent": x1[i].numpy(), "noise": x0[part][i].numpy()}
                    for key, value in c.items():
                        sample[key] = int(value[i]) if FIELDS[key].label else value[i].float().cpu().numpy()
                    writer.write(sample)


def reflow(
    ckpt: Path,
    out: Path,
    num_pairs: int = 10_000,
    num_val_pairs: int = 0,
    solver: Solver | None = None,
    num_steps: int = 32,
    shift: float | None = None,
    cfg_scale: float | None = None,
    labels: list[int] | None = None,
    cond_file: Path | None = None,
    prompts_from: str | None = None,
    samples_per_shard: int = 1000,
    batch_size: int = 256,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Generate reflow pairs from a teacher checkpoint (its EMA weights when it had EMA).

    Writes ``out/shard-*.tar`` + ``out/dataset.json`` (and ``out/val/`` with ``num_val_pairs``
    pairs from another seed, for validation). Run it as ``torchrun --nproc_per_node N -m rfkit.cli
    reflow ...`` to spread the shards over N ranks.

    Args:
        ckpt: the teacher, written by ``rfkit fit``.
        out: output directory.
        num_pairs: training pairs.
        num_val_pairs: validation pairs (0: none).
        solver: ODE solver (default: the teacher's validation solver).
        num_steps: solver steps per pair; reflow wants an accurate teacher ODE.
        shift: inference timestep shift (default: the teacher's).
        cfg_scale: guidance scale (default: the teacher's).
        labels: class labels, cycled over the pairs; default for a class-conditional teacher:
            all its classes in turn (0, 1, ..., C-1, 0, 1, ...).
        cond_file: ``.npz`` with ``cls`` / ``text`` / ``pooled`` arrays, cycled over the pairs.
        prompts_from: latent shards (a directory, a brace pattern) whose conditioning the pairs take,
            e.g. the shards the teacher trained on: pair i gets row i (cycled) of every ``text`` /
            ``pooled`` / ``cls`` the teacher reads and the shards hold, in the shards' order
            (:func:`rfkit.data.shards.read_rows`); the pairs store those rows beside the noise.
        samples_per_shard: pairs per shard (the unit of work and of resuming).
        batch_size: pairs integrated at once.
        seed: seed of the noise.
        device: where to integrate (default: this rank's GPU, else the CPU).
    """
    rank, world = _rank_world()
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    flow = load_checkpoint(ckpt, map_location=device)
    if labels is None and cond_file is None and prompts_from is None and "cls" in flow.model.cond_keys:
        labels = list(range(flow.model.num_classes))
    sampling = flow.sampling.override(solver=solver, num_steps=num_steps, shift=shift, cfg_scale=cfg_scale)
    prompt_keys = []
    if prompts_from is not None:
        _, manifest = resolve_shards(prompts_from)
        prompt_keys = [k for k in flow.model.cond_keys if k in manifest.keys]
        if not prompt_keys:
            raise ValueError(
                f"{prompts_from} holds none of the teacher's conditioning {list(flow.model.cond_keys)} "
                f"(its keys: {list(manifest.keys)}): pass the shards the teacher trained on"
            )
    given = ({"cls"} if labels else set()) | (set(COND_KEYS) if cond_file else set()) | set(prompt_keys)
    missing = sorted(set(flow.model.cond_keys) - given)
    if missing:
        raise ValueError(
            f"the teacher needs conditioning {missing}: pass --prompts_from (the shards it trained on), "
            "--cond_file (an .npz with text / pooled arrays) or --labels"
        )
    teacher = {"checkpoint": str(ckpt), **sampling.record()}
    teacher["prompts_from"] = prompts_from
    extra = {"reflow": {**teacher, "seed": seed}}  # pairs are in model space: scaling 1, shift 0
    cfg = {
        "seed": seed,
        "labels": labels,
        "cond_file": cond_file,
        "prompts_from": prompts_from,
        "prompt_keys": prompt_keys,
        "batch_size": batch_size,
        "sampling": sampling,
    }
    num_shards = -(-num_pairs // samples_per_shard)
    if (out / MANIFEST).exists() and not any(out.glob("part-*")):  # finished earlier
        return {"out": str(out), "num_pairs": num_pairs, "teacher": teacher, "resumed": True}

    def part(r: int) -> Path:
        return out / f"part-{r:03d}-of-{world:03d}"

    stale = [p.name for p in out.glob("part-*") if not p.name.endswith(f"-of-{world:03d}")]
    if stale:
        raise ValueError(f"{out} holds parts of a run with another world size ({stale[:2]}): rerun with that size")
    mine = list(range(rank, num_shards, world))
    started = time.perf_counter()
    _pairs(flow, part(rank), mine, num_pairs, samples_per_shard, extra, cfg)
    if world > 1:
        dist.barrier()
    if rank == 0:
        merge_parts(
            out, {out / f"part-{r:03d}-of-{world:03d}": list(range(r, num_shards, world)) for r in range(world)}
        )
        for r in range(world):
            leftover = out / f"part-{r:03d}-of-{world:03d}"
            (leftover / MANIFEST).unlink(missing_ok=True)
            leftover.rmdir()
        if num_val_pairs > 0:
            val_cfg = {**cfg, "seed": stream_seed(seed, 1)}
            _pairs(flow, out / "val", list(range(-(-num_val_pairs // samples_per_shard))), num_val_pairs,
                   samples_per_shard, {"reflow": {**teacher, "seed": val_cfg["seed"]}}, val_cfg)  # fmt: skip
    if world > 1:
        dist.barrier()
    return {
        "out": str(out),
        "num_pairs": num_pairs,
        "num_val_pairs": num_val_pairs,
        "ranks": world,
        "teacher": teacher,
        "nfe_per_pair": flow.nfe(conditional=bool(flow.model.cond_keys), **sampling.kwargs()),
        "seconds": round(time.perf_counter() - started, 2),
    }
