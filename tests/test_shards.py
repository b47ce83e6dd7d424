"""Latent shards on disk: writer and manifest, exactly-once passes with workers, endless streams,
shape buckets, and every kind of bad input (missing, truncated, corrupt shards; bad samples; pickles)."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from webdataset import TarWriter

from rfkit.data import LatentShards, LatentShardWriter
from rfkit.data.schema import BadSample, Manifest
from rfkit.data.stream import DataWarning
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


class RecordingShift(ResolutionShifted):
    """ResolutionShifted that remembers the token count of every batch it was asked for."""

    seen: list[int] = []

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


# ---------------------------------------------------------------------------------- bad input


def test_missing_shards_manifest_and_too_few_shards_fail_at_start(tmp_path):
    write_set(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"2 of 8 shards are missing: .*shard-000006.tar"):
        LatentShards(str(tmp_path / "shard-{000000..000007}.tar")).setup("fit")
    (tmp_path / "shard-000003.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 shards are missing: .*shard-000003.tar"):
        LatentShards(str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="no manifest at .*dataset.json"):
        LatentShards(str(tmp_path / "elsewhere")).setup("fit")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "shard-000099.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="shard-000099.tar is not listed in"):
        LatentShards(str(tmp_path / "stray" / "shard-000099.tar"), manifest=str(tmp_path / "dataset.json")).setup()
    few = LatentShards(str(tmp_path / "shard-{000000..000001}.tar"), num_workers=3)
    few.setup("fit")
    with pytest.raises(ValueError, match=r"2 shards cannot feed 1 ranks x 3 workers = 3 readers"):
        few.train_dataloader()


def _replace_shard(path: Path, samples: list[dict]) -> None:
    with TarWriter(str(path), encoder=False) as tar:
        for i, sample in enumerate(samples):
            tar.write({"__key__": f"bad{i}", **sample})


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


class Boom:
    """Unpickling this would create a file: proof that the reader never unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_bad_samples_are_rejected_by_name_and_never_reach_the_model(tmp_path):
    write_set(tmp_path, n=20)
    ok = {"cls": b"7", "text.npy": _npy(np.zeros((3, 5), np.float32)), "pooled.npy": _npy(np.zeros(5, np.float32))}
    bad_latents = [
        _npy(np.full((4, 8, 8), np.inf, np.float16)),
        _npy(np.zeros((4, 8, 12), np.float16)),
        _npy(np.zeros((4, 8, 8), np.int64)),
        _npy(np.array([Boom(tmp_path / "pwned")], dtype=object), allow_pickle=True),
        b"not an npy file",
    ]
    samples = [{**ok, "latent.npy": z} for z in bad_latents]
    samples.append({"cls": b"7", "latent.npy": _npy(np.zeros((4, 8, 8), np.float16)), "pooled.npy": ok["pooled.npy"]})
    samples.append({**ok, "cls": b"seven", "latent.npy": _npy(np.zeros((4, 8, 8), np.float16))})
    samples += [{**ok, "latent.npy": _npy(np.ones((4, 8, 8), np.float16))}] * 3  # three good ones
    _replace_shard(tmp_path / "shard-000001.tar", samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = one_pass(tmp_path, workers=0, intact=False)
    messages = [str(w.message) for w in caught if w.category is DataWarning]
    for needle in [
        "shard-000001.tar: sample bad0: latent.npy holds 256 NaN or inf",
        "sample bad1: latent.npy has shape (4, 8, 12); the data set's shapes are [(4, 8, 8), (4, 8, 16)]",
        "sample bad2: latent.npy has dtype int64",
    ]:
        assert any(needle in m for m in messages), (needle, messages)
    assert "shard-000001.tar: 7 samples rejected in all" in messages[-1]
    assert not (tmp_path / "pwned").exists()
    assert all(torch.isfinite(b["latent"]).all() for b in batches)
    assert sum(len(b["cls"]) for b in batches) == 10 + 3  # shard 0 and the three good ones
    # past three per shard the warnings are summed up; each reason, straight from the schema check:
    manifest = Manifest.load(str(tmp_path / "dataset.json"))
    reasons = []
    for i, raw in enumerate(samples[:7]):
        with pytest.raises(BadSample) as err:
            manifest.decode({"__key__": f"bad{i}", **raw}, "shard-000001.tar")
        reasons.append(str(err.value))
    assert "sample bad3: latent.npy is not a plain .npy array: Object arrays cannot be loaded" in reasons[3]
    assert "sample bad4: latent.npy is not a plain .npy array" in reasons[4]
    assert "sample bad5: missing text.npy (this data set's keys: ['cls', 'latent', 'pooled', 'text'])" in reasons[5]
    assert "sample bad6: cls is 'seven', not a non-negative integer" in reasons[6]
    assert not (tmp_path / "pwned").exists()
    dm = LatentShards(tmp_path, val_shards=tmp_path, num_workers=0)
    dm.setup()
    with pytest.warns(DataWarning):
        list(dm.val_dataloader())
    assert dm.streams["val"].stats[:] == [20, 7]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_shards_are_skipped_named_and_flagged(tmp_path, damage):
    write_set(tmp_path, n=40)
    path = tmp_path / "shard-000002.tar"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\x00\xff" * 5000)
    dm = LatentShards(tmp_path, val_shards=tmp_path, num_workers=0)
    dm.setup()
    with pytest.warns(DataWarning, match=r"skipped unreadable shard .*shard-000002.tar"):
        seen = torch.cat([b["cls"] for b in dm.val_dataloader()]).tolist()
    assert set(range(20)) | set(range(30, 40)) <= set(seen) and len(seen) == len(set(seen))
    assert list(dm.streams["val"].bad) == [0, 0, 1, 0]
