"""The latent path with a real VAE, embedded: the shipped digits AutoencoderKL reconstructs held-out
digits; encode -> LatentShards -> configs/digits_latent.yaml -> decoded validation grids and
``rfkit sample`` images that equal the VAE's decoding of the sampled latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from latent_fixtures import DIGITS_VAE, write_digits_latent_shards

from rfkit.cli import main
from rfkit.data.digits import digit_pixels, split
from rfkit.images import sample_image
from rfkit.metrics import to_digits_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(DIGITS_VAE, local_files_only=True).eval()


def test_shipped_vae_reconstructs_held_out_digits(vae):
    """On the 180 digits it never saw: mean squared error < 0.001 (pixels in [-1, 1]; measured 0.00031
    by tools/train_digits_vae.py), against 0.18 for predicting the mean image."""
    pixels = torch.from_numpy(digit_pixels(16)[0]).float().div(127.5).sub(1).unsqueeze(1)
    train, val = split(len(pixels), 0.1, 0)
    x = pixels[val]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample.clamp(-1, 1)
    assert z.shape == (180, 4, 8, 8)
    baseline = (pixels[train].mean(0) - x).pow(2).mean()
    assert baseline > 0.15
    assert (y - x).pow(2).mean() < 0.001
    # the manifest scaling makes the training latents about unit variance
    cfg = vae.config
    assert abs(float(((z - cfg.shift_factor) * cfg.scaling_factor).std()) - 1) < 0.15


def test_to_digits_size_undoes_the_upsampling_of_the_digits():
    """The 16x16 digits export_images writes come back to the 8x8 digits (up to uint8 rounding), and
    to any 8x8 image upsampled the same way (PIL bilinear, float), where block averaging would blur."""
    x8 = torch.from_numpy(digit_pixels(8)[0]).float().div(127.5).sub(1).unsqueeze(1)
    x16 = torch.from_numpy(digit_pixels(16)[0]).float().div(127.5).sub(1).unsqueeze(1)
    assert (to_digits_size(x16) - x8).abs().max() < 0.01
    assert (x16.reshape(-1, 1, 8, 2, 8, 2).mean((3, 5)) - x8).abs().max() > 0.2  # why averaging is not enough
    from PIL import Image

    z = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    up = np.asarray(Image.fromarray(z, mode="F").resize((32, 32), Image.Resampling.BILINEAR))
    torch.testing.assert_close(to_digits_size(torch.from_numpy(up.copy())[None, None]), torch.from_numpy(z)[None, None])
    torch.testing.assert_close(to_digits_size(x8), x8)


def test_latent_path_end_to_end(vae, tmp_path):
    data = write_digits_latent_shards(tmp_path / "data")
    manifest = json.loads((data / "train" / "dataset.json").read_text())
    assert manifest["vae"]["path"] == str(DIGITS_VAE) and manifest["scaling_factor"] == vae.config.scaling_factor
    run = tmp_path / "run"
    main(
        ["fit", f"--config={ROOT / 'configs' / 'digits_latent.yaml'}", f"--trainer.default_root_dir={run}",
         "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
         f"--data.init_args.shards={data / 'train'}", f"--data.init_args.val_shards={data / 'val'}",
         "--data.init_args.batch_size=32", "--data.init_args.batches_per_epoch=3",
         "--model.model.init_args.width=32", "--model.model.init_args.depth=1", "--model.sample_steps=2",
         "--trainer.logger=false"]  # W&B with this config: tests/test_cli.py
    )  # fmt: skip
    # the validation grid shows 20 decoded 16x16 digits (drawn at 2x), not 8x8 latents
    (grid,) = (run / "samples").glob("*.png")
    from PIL import Image

    assert Image.open(grid).size == sample_image(torch.zeros(20, 1, 16, 16), upscale=2).size
    out = tmp_path / "samples"
    main(["sample", f"--ckpt={run / 'checkpoints' / 'last.ckpt'}", f"--out={out}", "--num_samples=6",
          "--labels=[0,1,2]", "--diagnostics_steps=0"])  # fmt: skip
    assert json.loads((out / "stats.json").read_text())["decoded_by_vae"] is True
    latents, images = np.load(out / "samples.npy"), np.load(out / "images.npy")
    assert latents.shape == (6, 4, 8, 8) and images.shape == (6, 1, 16, 16)
    with torch.no_grad():  # the VAE's own decoding of the unscaled latents
        z = torch.from_numpy(latents) / vae.config.scaling_factor + vae.config.shift_factor
        expected = vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(torch.from_numpy(images), expected)
