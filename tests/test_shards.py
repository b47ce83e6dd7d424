"""Latent shards on disk: writer and manifest, exactly-once passes with workers, endless streams that
reshuffle and resume, URLs, and shape buckets driving the resolution-dependent timestep shift."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from rfkit.data import LatentShards, LatentShardWriter
from rfkit.models import DiT
from rfkit.module import RectifiedFlow
from rfkit.timesteps import ResolutionShifted, Uniform

SHAPES = [(4, 8, 8), (4, 8, 16)]


def latent_for(i: int, shape=None) -> np.ndarray:
    """Sample i's latent: a constant image of value i / 10 (so a batch tells which samples it holds)."""
    shape = shape or SHAPES[i % 3 == 0]
    return np.full(shape, i / 10, dtype=np.float16)


def write_set(root: Path, n: int = 53, per_shard: int = 10, **manifest) -> Path:
    """n samples with cls = index, two latent shapes (every third is 4x8x16), text and pooled embeddings."""
    manifest = {"scaling_factor": 2.0, "shift_factor": 0.5, **manifest}
    with LatentShardWriter(root, per_shard, manifest) as out:
        for i in range(n):
            text = np.full((3, 5), i, np.float32)
            out.write({"latent": latent_for(i), "cls": i, "text": text, "pooled": np.full(5, -i, np.float32)})
    return root


def one_pass(root, workers: int, batch_size: int = 4, intact: bool = True) -> list[dict]:
    dm = LatentShards(root, val_shards=root, batch_size=2, val_batch_size=batch_size, num_workers=workers)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) or not intact  # planned from the manifest; bad samples make fewer
    return batches


# ---------------------------------------------------------------------------------- writer


def test_writer_names_shards_and_keeps_a_manifest(tmp_path):
    write_set(tmp_path, vae={"path": "/models/vae"}, teacher="runs/a/last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"] + [f"shard-{i:06d}.tar" for i in range(6)]
    m = json.loads((tmp_path / "dataset.json").read_text())
    assert (m["format"], m["version"], m["num_samples"], m["keys"]) == ("rfkit-latent-shards", 1, 53, [
        "cls", "latent", "pooled", "text"])  # fmt: skip
    assert m["shapes"] == {"latent": [[4, 8, 8], [4, 8, 16]], "text": [3, 5], "pooled": [5]}
    assert m["vae"] == {"path": "/models/vae"} and m["teacher"] == "runs/a/last.ckpt"
    assert [s["samples"] for s in m["shards"]] == [10] * 5 + [3]
    assert m["shards"][0]["latent_shapes"] == {"4x8x16": 4, "4x8x8": 6}  # samples 0, 3, 6, 9 are wide
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames()[:4] == [
            "000000000.cls",
            "000000000.latent.npy",
            "000000000.pooled.npy",
            "000000000.text.npy",
        ]


def test_batches_are_scaled_and_keep_the_schema(tmp_path):
    write_set(tmp_path, n=12)
    for batch in one_pass(tmp_path, workers=0):
        i = batch["cls"]
        assert batch["latent"].dtype == torch.float32 and batch["cls"].dtype == torch.int64
        expected = (i.float() / 10 - 0.5) * 2.0  # (latent - shift) * scaling, SD3 / Flux
        assert torch.allclose(batch["latent"].flatten(1).mean(1), expected, atol=2e-3)
        assert torch.equal(batch["text"][:, 0, 0], i.float()) and batch["text"].shape[1:] == (3, 5)
        assert torch.equal(batch["pooled"][:, 0], -i.float())


def test_writer_refuses_bad_samples_and_reserved_fields(tmp_path):
    good = {"latent": np.zeros((4, 8, 8), np.float32), "cls": 1}
    with LatentShardWriter(tmp_path, 10) as out:
        out.write(good)
        for bad, match in [
            ({"latent": np.full((4, 8, 8), np.nan, np.float32), "cls": 1}, "sample 1: latent.npy holds 256 NaN"),
            ({"latent": np.zeros((4, 8, 8), np.int32), "cls": 1}, "dtype int32"),
            ({"latent": np.zeros((4, 8, 8), np.float32), "cls": -3}, "cls must be a non-negative int"),
            ({"latent": np.zeros((4, 8, 8), np.float32)}, "every sample of this data set has"),
            ({"latent": np.zeros((4, 8, 8), np.float32), "cls": 1, "caption": np.zeros(2)}, "may hold"),
        ]:
            with pytest.raises(ValueError, match=match):
                out.write(bad)
    assert json.loads((tmp_path / "dataset.json").read_text())["num_samples"] == 1
    with pytest.raises(ValueError, match=r"\['shards'\] are computed by the writer"):
        LatentShardWriter(tmp_path / "x", 10, {"shards": []})


def test_writer_resumes_and_never_overwrites(tmp_path):
    with pytest.raises(KeyboardInterrupt), LatentShardWriter(tmp_path, 10, {"vae": "a"}) as out:
        for i in range(25):
            if i == 23:
                raise KeyboardInterrupt  # the run dies in shard 2
            out.write({"latent": latent_for(i, (4, 8, 8))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "shard-000000.tar", "shard-000001.tar"]
    assert json.loads((tmp_path / "dataset.json").read_text())["num_samples"] == 20
    with pytest.raises(ValueError, match=r"another manifest \(fields \['vae'\] differ\)"):
        LatentShardWriter(tmp_path, 10, {"vae": "b"})
    with LatentShardWriter(tmp_path, 10, {"vae": "a"}) as out:
        with pytest.raises(FileExistsError, match="never overwrites"):
            out.write({"latent": latent_for(0, (4, 8, 8))})
        assert out.is_complete(0) and out.is_complete(1) and not out.is_complete(2)
        out.skip_shard()
        out.skip_shard()
        for i in range(20, 25):
            out.write({"latent": latent_for(i, (4, 8, 8))})
    assert json.loads((tmp_path / "dataset.json").read_text())["num_samples"] == 25
    seen = torch.cat([b["latent"][:, 0, 0, 0] for b in one_pass(tmp_path, workers=0)])
    assert sorted(torch.round(seen * 10).long().tolist()) == list(range(25))  # scaling 1, shift 0 by default


# ---------------------------------------------------------------------------------- passes and streams


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_yields_every_sample_once_in_single_shape_batches(tmp_path, workers):
    write_set(tmp_path)
    batches = one_pass(tmp_path, workers)
    seen = torch.cat([b["cls"] for b in batches]).tolist()
    assert sorted(seen) == list(range(53))
    for b in batches:
        assert len(b["cls"]) <= 4
        wide = b["cls"] % 3 == 0
        assert bool(wide.all()) == (b["latent"].shape[-1] == 16) and bool(wide.all() or not wide.any())


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_epochs_have_fixed_length_and_reshuffle(tmp_path, workers):
    write_set(tmp_path)
    dm = LatentShards(tmp_path, batch_size=4, batches_per_epoch=30, num_workers=workers, shuffle_buffer=8, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[b["cls"] for b in loader] for _ in range(2)]
    assert [len(e) for e in epochs] == [30, 30] == [len(loader)] * 2
    assert all(len(b) == 4 for e in epochs for b in e)  # the endless stream only yields full batches
    first, second = (torch.cat(e).tolist() for e in epochs)
    assert first != second  # a new order every epoch
    assert set(first) | set(second) == set(range(53))  # 240 draws cover the 53 samples
    assert max(Counter(first).values()) <= 4  # ~2.3 passes per epoch, not one sample over and over
    again = LatentShards(tmp_path, batch_size=4, batches_per_epoch=30, num_workers=workers, shuffle_buffer=8, seed=1)
    again.setup("fit")
    assert torch.cat([b["cls"] for b in again.train_dataloader()]).tolist() == first  # seeded


def test_a_resumed_run_continues_the_order_instead_of_replaying_it(tmp_path):
    write_set(tmp_path)

    def epochs(dm, n):
        loader = dm.train_dataloader()
        return [torch.cat([b["cls"] for b in loader]).tolist() for _ in range(n)]

    first = LatentShards(tmp_path, batch_size=4, batches_per_epoch=5, num_workers=2, shuffle_buffer=8)
    first.setup("fit")
    one, two = epochs(first, 2)
    saved = first.state_dict()
    assert saved == {"passes": [2, 2]}
    resumed = LatentShards(tmp_path, batch_size=4, batches_per_epoch=5, num_workers=2, shuffle_buffer=8)
    resumed.setup("fit")
    resumed.load_state_dict({"passes": [1, 1]})  # as if saved after the first epoch
    assert epochs(resumed, 1) == [two] != [one]


@pytest.mark.parametrize("form", ["pipe", "file"])
def test_shards_from_urls(tmp_path, form):
    write_set(tmp_path, n=30)
    url = (
        f"pipe:cat {tmp_path}/shard-{{000000..000002}}.tar"
        if form == "pipe"
        else f"file://{tmp_path}/shard-{{000000..000002}}.tar"
    )
    dm = LatentShards(url, val_shards=url, num_workers=0)  # the manifest is found next to the shards
    dm.setup()
    assert sorted(torch.cat([b["cls"] for b in dm.val_dataloader()]).tolist()) == list(range(30))


class RecordingShift(ResolutionShifted):
    """ResolutionShifted that remembers the token count of every batch it was asked for."""

    seen: ClassVar[list[int]] = []

    def for_tokens(self, num_tokens: int):
        RecordingShift.seen.append(num_tokens)
        return super().for_tokens(num_tokens)


class BatchShapes(pl.Callback):
    def __init__(self):
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch["latent"].shape[1:]))


def test_shape_buckets_drive_the_resolution_shift_end_to_end(tmp_path):
    write_set(tmp_path)
    RecordingShift.seen = []
    flow = RectifiedFlow(
        DiT(in_channels=4, input_size=8, width=32, depth=1, heads=2), timesteps=RecordingShift(Uniform())
    )
    shapes = BatchShapes()
    dm = LatentShards(tmp_path, batch_size=4, batches_per_epoch=8, num_workers=0, shuffle_buffer=4)
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", logger=False, callbacks=[shapes], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(flow, datamodule=dm)
    assert set(shapes.shapes) == {(4, 8, 8), (4, 8, 16)}
    assert RecordingShift.seen == [(h // 2) * (w // 2) for _, h, w in shapes.shapes]  # 16 or 32 tokens
    assert flow.timesteps.for_tokens(32).shift > flow.timesteps.for_tokens(16).shift
