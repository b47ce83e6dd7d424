"""Digits FID of the images an ``rfkit sample`` run wrote, pixel-space or decoded by a VAE.

    rfkit sample --ckpt runs/digits_latent/checkpoints/last.ckpt --out runs/digits_latent/fid \\
        --num_samples 1000 --labels [0,1,2,3,4,5,6,7,8,9]
    python tools/digits_fid.py runs/digits_latent/fid [--vae rfkit/assets/digits_vae]

Reads ``images.npy`` (decoded by the VAE the shards' manifest names) or, for pixel-space runs,
``samples.npy``; images larger than 8x8 are brought back to 8x8 (``rfkit.metrics.to_digits_size``),
then scored by ``rfkit.metrics.digits_fid`` against all 1,797 digits (as tools/bench_digits.py).
With ``--vae``, also prints the floor of the latent path: the FID of the real digits (16x16, as
``rfkit encode`` saw them) after encode -> decode -> 8x8, and of the up/down-sampling alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from rfkit.data.digits import digit_pixels
from rfkit.metrics import digits_fid, to_digits_size


def fid_to_digits(images: torch.Tensor) -> float:
    """digits FID of (N, 1, H, W) images in [-1, 1] (H, W multiples of 8) against all 1,797 digits."""
    fid = digits_fid()
    fid.update(torch.from_numpy(digit_pixels(8)[0]).float().div(127.5).sub(1).unsqueeze(1), real=True)
    fid.update(to_digits_size(images).clamp(-1, 1), real=False)
    return float(fid.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", type=Path, help="an rfkit sample --out folder")
    parser.add_argument("--vae", type=Path, help="also score the real digits through this VAE (the floor)")
    args = parser.parse_args()
    decoded = args.samples / "images.npy"
    images = torch.from_numpy(np.load(decoded if decoded.exists() else args.samples / "samples.npy"))
    print(f"{args.samples}: FID {fid_to_digits(images):.3f} of {len(images)} {tuple(images.shape[1:])} samples")
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).eval()
        real16 = torch.from_numpy(digit_pixels(16)[0]).float().div(127.5).sub(1).unsqueeze(1)
        with torch.no_grad():
            recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mean).sample for x in real16.split(256)])
        floor, through = fid_to_digits(real16), fid_to_digits(recon)
        print(f"floor: real digits 16x16 -> 8x8 {floor:.3f}; through the VAE too {through:.3f}")


if __name__ == "__main__":
    main()
