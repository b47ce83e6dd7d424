"""Latent shards across 2 real processes (gloo): exactly-once validation with even batch counts per
rank, DataLoader workers inside each rank, and a Lightning DDP run that skips a truncated shard,
logs ``data/skipped`` and stops on every rank alike once too many shards are bad, or when one rank's
disk lacks a shard (no hang)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 300  # a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(root: Path, rank_dir: Path, max_skip_fraction: float, cls_seen: list, train: str = "train"):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from rfkit.data import LatentShards
    from rfkit.models import DiT
    from rfkit.module import RectifiedFlow

    class SeenInValidation(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            cls_seen.append(batch["cls"].tolist())

    data = LatentShards(
        str(root / train), val_shards=str(root / "val"), batch_size=4, val_batch_size=4, batches_per_epoch=12,
        num_workers=0, shuffle_buffer=4, max_skip_fraction=max_skip_fraction,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=12, log_every_n_steps=4, val_check_interval=12,
        logger=CSVLogger(rank_dir, name="", version=""), callbacks=[SeenInValidation()], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    flow = RectifiedFlow(DiT(in_channels=4, input_size=8, width=32, depth=1, heads=2, num_classes=100))
    trainer.fit(flow, datamodule=data)


def _rank_main(rank: int, ports: tuple[int, int], root: str) -> None:
    root = Path(root)
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    out: dict = {}
    try:
        import torch.distributed as dist

        from rfkit.data import LatentShards

        # 1) the loader alone: 2 ranks x 2 workers, one validation pass, one training epoch
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        dm = LatentShards(
            str(root / "uneven"), val_shards=str(root / "uneven"), batch_size=4, batches_per_epoch=9, num_workers=2
        )
        dm.setup("fit")
        val = dm.val_dataloader()
        out["val"] = [b["cls"].tolist() for b in val]
        out["val_len"] = len(val)
        out["train"] = [b["cls"].tolist() for b in dm.train_dataloader()]
        # global_batch_size: 10 over 2 ranks is 5 rows each; 7 does not split and says so
        dm = LatentShards(str(root / "uneven"), global_batch_size=10, batches_per_epoch=3, num_workers=0)
        dm.setup("fit")
        out["global"] = [len(b["cls"]) for b in dm.train_dataloader()]
        try:
            LatentShards(str(root / "uneven"), global_batch_size=7, num_workers=0).setup("fit")
        except ValueError as err:
            out["global_error"] = str(err)
        dist.destroy_process_group()
        # 2) Lightning DDP: a truncated shard is skipped and counted; past the fraction every rank stops
        os.environ["MASTER_PORT"] = str(ports[1])
        out["fit_val"] = []
        _trainer(root, root / f"fit{rank}", 0.5, out["fit_val"])
        try:
            _trainer(root, root / f"stop{rank}", 0.1, [])
        except RuntimeError as err:
            out["stopped"] = str(err)
        # 3) a shard that only rank 1's disk lacks: both ranks stop at setup, neither waits for the other
        try:
            _trainer(root, root / f"missing{rank}", 0.5, [], train="train" if rank == 0 else "lacking")
        except (RuntimeError, FileNotFoundError) as err:
            out["missing"] = f"{type(err).__name__}: {err}"
    except Exception:
        out["error"] = traceback.format_exc()
    (root / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    from test_shards import write_set

    root = tmp_path_factory.mktemp("ddp")
    write_set(root / "uneven", n=53)  # 6 shards: 5 of 10 samples, 1 of 3
    write_set(root / "train", n=60)
    write_set(root / "val", n=23, per_shard=5)
    shutil.copytree(root / "train", root / "lacking")
    (root / "lacking" / "shard-000004.tar").unlink()
    bad = root / "train" / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    ctx = mp.get_context("spawn")
    ports = (_free_port(), _free_port())
    procs = [ctx.Process(target=_rank_main, args=(r, ports, str(root))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {TIMEOUT_S} s: a hang"
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert "error" not in r, r["error"]
    return root, results


def test_two_ranks_with_workers_see_every_sample_once(ddp_results):
    _, (r0, r1) = ddp_results
    seen0, seen1 = [c for b in r0["val"] for c in b], [c for b in r1["val"] for c in b]
    assert sorted(seen0 + seen1) == list(range(53))  # exactly once across ranks
    assert seen0 and seen1 and not set(seen0) & set(seen1)  # no rank starves, none overlaps
    assert len(r0["val"]) == len(r1["val"]) == r0["val_len"] == r1["val_len"]  # lock-step safe
    for batch in r0["val"] + r1["val"]:
        assert len({c % 3 == 0 for c in batch}) == 1  # one latent shape per batch
    assert len(r0["train"]) == len(r1["train"]) == 9 and all(len(b) == 4 for b in r0["train"] + r1["train"])
    assert not set(map(tuple, r0["train"])) & set(map(tuple, r1["train"]))  # ranks read different shards


def test_global_batch_size_splits_over_ranks(ddp_results):
    _, (r0, r1) = ddp_results
    assert r0["global"] == r1["global"] == [5, 5, 5]
    for r in (r0, r1):
        assert (
            "global_batch_size=7 must be a positive multiple of world size x accumulate_grad_batches = 2 x 1"
            in (r["global_error"])
        )


def test_lightning_ddp_skips_logs_and_stops_on_every_rank(ddp_results):
    root, (r0, r1) = ddp_results
    # validation inside Lightning DDP: every one of the 23 samples once, the same number of batches per rank
    seen = [c for b in r0["fit_val"] + r1["fit_val"] for c in b]
    assert sorted(seen) == list(range(23)) and len(r0["fit_val"]) == len(r1["fit_val"])
    rows = (root / "fit0" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    skipped = [row.split(",")[header.index("data/skipped")] for row in rows[1:]]
    assert "1.0" in skipped and "data/rejected" in header and last  # the truncated shard, counted once
    for r in (r0, r1):
        assert "1 of 6 train shards were unreadable, more than max_skip_fraction=0.1" in r["stopped"]
        assert "shard-000002.tar" in r["stopped"]
    assert r0["missing"].startswith("RuntimeError: another rank could not open its shards")
    assert r1["missing"].startswith("FileNotFoundError: 1 of 6 shards are missing") and "shard-000004" in r1["missing"]
