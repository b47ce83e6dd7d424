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


def test_sample_decodes_with_the_vae_the_data_names(tmp_path):
    from diffusers import AutoencoderKL

    from rfkit.data import LatentShardWriter

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae")
    manifest = {"scaling_factor": 0.5, "shift_factor": 0.1, "vae": {"path": str(tmp_path / "vae")}}
    for split, n in (("train", 64), ("val", 16)):
        with LatentShardWriter(tmp_path / split, 32, manifest) as writer:
            for _ in range(n):
                writer.write({"latent": np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float32)})
    run = tmp_path / "run"
    data = ["--data=rfkit.data.LatentShards", f"--data.shards={tmp_path / 'train'}", "--data.num_workers=0"]
    data += [f"--data.val_shards={tmp_path / 'val'}", "--data.batch_size=16"]
    dit = ["--model.model.init_args.in_channels=4", "--model.model.init_args.num_classes=0"]
    dit += ["--model.model.init_args.width=32", "--model.model.init_args.depth=1", "--model.cfg_scale=1.0"]
    quiet = ["--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--trainer.callbacks+=ModelCheckpoint"]
    quiet += ["--trainer.callbacks.save_last=true", "--trainer.max_steps=2"]
    main(["fit", f"--config={ROOT / 'configs/digits.yaml'}", f"--trainer.default_root_dir={run}", *data, *dit, *quiet])
    main(["sample", f"--ckpt={run / 'checkpoints/last.ckpt'}", f"--out={tmp_path / 's'}", "--num_samples=4",
          "--num_steps=2", "--diagnostics_steps=0"])  # fmt: skip
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["decoded_by_vae"] is True
    assert np.load(tmp_path / "s" / "samples.npy").shape == (4, 4, 8, 8)  # raw latents are kept
    from PIL import Image

    grid = Image.open(tmp_path / "s" / "samples.png")
    # 2x2 decoded 16x16 images (this VAE upsamples by 2), enlarged 4x for display, 1 px gaps
    assert grid.size == (2 * 64 + 3, 2 * 64 + 3)
