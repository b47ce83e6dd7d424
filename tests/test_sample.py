"""`rfkit sample`: files, reproducibility, conditioning, refusal of foreign checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_TOY = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=4",
    "--data.init_args.batches_per_epoch=4",
    "--data.init_args.val_size=64",
    "--model.sample_steps=2",
]
TINY_DIGITS = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--model.model.init_args.width=32",
    "--model.model.init_args.depth=1",
    "--data.init_args.batch_size=16",
    "--model.sample_steps=2",
]


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("toy")
    main(["fit", f"--config={ROOT / 'configs/toy2d.yaml'}", f"--trainer.default_root_dir={run}", *TINY_TOY])
    return run / "checkpoints" / "last.ckpt"


def test_sample_writes_its_files_and_is_reproducible(toy_ckpt, tmp_path, capsys):
    main(
        [
            "sample",
            f"--ckpt={toy_ckpt}",
            f"--out={tmp_path / 'a'}",
            "--num_samples=50",
            "--solver=Heun",
            "--num_steps=3",
            "--seed=7",
            "--diagnostics_steps=20",
        ]
    )
    printed = capsys.readouterr().out
    assert "straightness:" in printed and "nfe: 6" in printed
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["noise.npy", "samples.npy", "samples.png", "stats.json"]
    x, noise = np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "a" / "noise.npy")
    assert x.shape == noise.shape == (50, 2) and np.isfinite(x).all()
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["solver"] == "Heun()" and stats["nfe"] == 6 and stats["straightness"] >= 0
    # same seed, same samples; the samples are the solver applied to the stored noise
    main(
        [
            "sample",
            f"--ckpt={toy_ckpt}",
            f"--out={tmp_path / 'b'}",
            "--num_samples=50",
            "--solver=Heun",
            "--num_steps=3",
            "--seed=7",
            "--diagnostics_steps=0",
        ]
    )
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "samples.npy"), x)
    import rfkit
    from rfkit.solvers import Heun

    flow = rfkit.load_checkpoint(toy_ckpt)
    again = flow.sample(torch.from_numpy(noise), {}, num_steps=3, solver=Heun())
    np.testing.assert_allclose(again.numpy(), x, rtol=1e-6, atol=1e-6)
    assert "straightness" not in json.loads((tmp_path / "b" / "stats.json").read_text())


def test_sample_class_conditional_needs_labels(tmp_path):
    run = tmp_path / "digits"
    main(["fit", f"--config={ROOT / 'configs/digits.yaml'}", f"--trainer.default_root_dir={run}", *TINY_DIGITS])
    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit, match=r"needs conditioning \['cls'\]"):
        main(["sample", f"--ckpt={ckpt}", f"--out={tmp_path / 'x'}"])
    main(
        [
            "sample",
            f"--ckpt={ckpt}",
            f"--out={tmp_path / 'y'}",
            "--labels=[3, 5]",
            "--num_samples=4",
            "--num_steps=2",
            "--cfg_scale=3.0",
            "--diagnostics_steps=0",
        ]
    )
    stats = json.loads((tmp_path / "y" / "stats.json").read_text())
    assert stats["cfg_scale"] == 3.0 and stats["nfe"] == 4  # guidance doubles the evaluations
    assert np.load(tmp_path / "y" / "samples.npy").shape == (4, 1, 8, 8)


def test_sample_refuses_a_foreign_checkpoint(tmp_path):
    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    with pytest.raises(SystemExit, match="not an rfkit checkpoint"):
        main(["sample", f"--ckpt={bad}", f"--out={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["sample", f"--ckpt={tmp_path / 'nope.ckpt'}", f"--out={tmp_path / 'o'}"])
    assert not (tmp_path / "o" / "samples.npy").exists()
