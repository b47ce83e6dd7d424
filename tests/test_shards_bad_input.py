"""Bad input to the shard reader: missing shards and manifests, too few shards, bad samples (named,
never reaching the model, never unpickled), truncated and corrupt shards (skipped, named, flagged)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import one_pass, write_set
from webdataset import TarWriter

from rfkit.data import LatentShards
from rfkit.data.schema import BadSample, Manifest
from rfkit.data.stream import DataWarning


def test_missing_shards_manifest_and_too_few_shards_fail_at_start(tmp_path):
    write_set(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"2 of 8 shards are missing: .*shard-000006.tar"):
        LatentShards(str(tmp_path / "shard-{000000..000007}.tar")).setup("fit")
    (tmp_path / "shard-000003.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 6 shards are missing: .*shard-000003\.tar"):
        LatentShards(str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"no manifest at .*dataset\.json"):
        LatentShards(str(tmp_path / "stray" / "shard-000099.tar")).setup("fit")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "shard-000099.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"shard-000099\.tar is not listed in"):
        LatentShards(str(tmp_path / "stray" / "shard-000099.tar"), manifest=str(tmp_path / "dataset.json")).setup()
    incomplete = json.loads((tmp_path / "dataset.json").read_text())
    del incomplete["shards"][1]["latent_shapes"]
    (tmp_path / "stray" / "dataset.json").write_text(json.dumps(incomplete))
    with pytest.raises(ValueError, match=r"lacks \['shards\[1\]\.latent_shapes'\]"):
        LatentShards(str(tmp_path / "stray" / "shard-000099.tar")).setup()
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
