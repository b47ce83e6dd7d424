"""`rfkit index`: shards another tool wrote get the manifest rfkit's own writer would have written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_shards import one_pass, write_set
from webdataset import TarWriter

from rfkit.cli import main
from rfkit.data import LatentShards


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def foreign_shard(path: Path, first: int, n: int, bad: int | None = None) -> None:
    """What another encoder writes: rfkit's member names, its own file names and sample keys."""
    with open(path, "wb") as f, TarWriter(f, encoder=False) as tar:
        for i in range(first, first + n):
            latent = np.full((4, 8, 8) if i % 2 else (4, 8, 16), i, np.float32)
            if i == bad:
                latent[0, 0, 0] = np.nan
            tar.write({"__key__": f"img_{i:05d}", "latent.npy": npy(latent), "cls": str(i % 10).encode()})


def run_index(capsys, *args: str) -> tuple[dict, str]:
    main(["index", *args])
    out = capsys.readouterr().out
    notes = "\n".join(line for line in out.splitlines() if line.startswith("rfkit index:"))
    body = "\n".join(line for line in out.splitlines() if not line.startswith("rfkit index:"))
    return yaml.safe_load(body), notes


def test_foreign_shards_are_indexed_and_train(tmp_path, capsys):
    foreign_shard(tmp_path / "cache-a.tar", 0, 12)
    foreign_shard(tmp_path / "cache-b.tar", 12, 9, bad=15)
    foreign_shard(tmp_path / "cache-c.tar", 21, 10)
    data = (tmp_path / "cache-c.tar").read_bytes()
    (tmp_path / "cache-c.tar").write_bytes(data[: len(data) // 2])  # truncated mid-sample
    with pytest.raises(FileNotFoundError, match="rfkit index --shards"):
        LatentShards(tmp_path, batch_size=2).setup("fit")  # the "no manifest" error names the command
    report, notes = run_index(capsys, f"--shards={tmp_path}")
    assert report["shards"] == 2 and report["samples"] == 21 and report["keys"] == ["cls", "latent"]
    assert report["latent_shapes"] == {"4x8x16": 11, "4x8x8": 10} and report["rejected"] == 1
    assert "cache-c.tar" in notes and "unreadable" in notes and "img_00015" in notes and "NaN" in notes
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["cache-a.tar", "cache-b.tar"]
    assert (manifest["scaling_factor"], manifest["shift_factor"]) == (1.0, 0.0)
    # the training reader takes them: every good sample once, the NaN one rejected
    batches = one_pass(tmp_path, workers=0, batch_size=4, intact=False)
    seen = sorted(int(v) for b in batches for v in b["latent"][:, 0, 0, 1])
    assert seen == [i for i in range(21) if i != 15]


def test_the_manifest_equals_what_rfkits_writer_writes(tmp_path, capsys):
    write_set(tmp_path, scaling_factor=2.0, shift_factor=0.5)
    written = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").unlink()
    run_index(capsys, f"--shards={tmp_path}", "--scaling_factor=2.0", "--shift_factor=0.5")
    assert json.loads((tmp_path / "dataset.json").read_text()) == written


def test_the_vae_gives_the_scaling_and_provenance(tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, scaling_factor=0.5)
    vae.register_to_config(shift_factor=0.25)
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    foreign_shard(tmp_path / "shards.tar", 0, 4)
    report, _ = run_index(capsys, f"--shards={tmp_path}", f"--vae={tmp_path / 'pipeline'}")
    assert (report["scaling_factor"], report["shift_factor"]) == (0.5, 0.25)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["vae"]["path"] == str(tmp_path / "pipeline" / "vae")


def test_bad_input_is_refused_with_what_to_do(tmp_path, capsys):
    foreign_shard(tmp_path / "a.tar", 0, 3)
    run_index(capsys, f"--shards={tmp_path}")
    with pytest.raises(SystemExit, match="exists; pass --overwrite true"):
        main(["index", f"--shards={tmp_path}"])
    odd = tmp_path / "odd"
    odd.mkdir()
    with open(odd / "x.tar", "wb") as f, TarWriter(f, encoder=False) as tar:
        tar.write({"__key__": "s0", "latents.pt": b"pickled"})
    with pytest.raises(SystemExit, match=r"\['latents.pt'\] that rfkit does not read; rfkit's members are"):
        main(["index", f"--shards={odd}"])
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["index", f"--shards={tmp_path / 'missing'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"holds no \.tar shards"):
        main(["index", f"--shards={tmp_path / 'empty'}"])
