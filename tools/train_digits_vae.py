"""Trains the small diffusers AutoencoderKL shipped as ``rfkit/assets/digits_vae``, configs/digits_latent.yaml's VAE.

    python tools/train_digits_vae.py              # ~2 min on 2 busy CPU cores; writes rfkit/assets/digits_vae/

Images: scikit-learn's digits upsampled to 16x16 grey exactly as ``rfkit.data.digits.export_images``
writes them (PIL bilinear), in [-1, 1]. Latents: (4, 8, 8) (one 2x downsampling, 4 channels, like
SD's VAE at a smaller factor). Trained on the training split of ``rfkit.data.Digits`` (seed 0) only,
so the held-out split measures it; the loss is the KL-VAE's

    L = mean (decode(z) - x)^2 + beta * KL(q(z|x) || N(0, I)) / dim(z),   z ~ q(z|x)

(no perceptual or adversarial terms: 16x16 digits do not need them). After training, the config
gets ``shift_factor`` = mean and ``scaling_factor`` = 1 / std of the training latents' means (SD3's
convention ``z = (latent - shift) * scale``), so the flow sees latents of about unit variance.
Deterministic: seeded, one thread. Prints the held-out reconstruction error and the wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from rfkit.data.digits import digit_pixels, split

OUT = Path(__file__).resolve().parent.parent / "rfkit" / "assets" / "digits_vae"
SIZE = 16


def build() -> AutoencoderKL:
    """~54k parameters (215 KB in float32): two blocks of 16 channels, no attention."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) 16x16 digits in [-1, 1], (N, 1, 16, 16), split as rfkit.data.Digits(seed=0)."""
    pixels = torch.from_numpy(digit_pixels(SIZE)[0]).float().div(127.5).sub(1.0).unsqueeze(1)
    train, val = split(len(pixels), 0.1, 0)
    return pixels[train], pixels[val]


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, x: torch.Tensor) -> tuple[float, float]:
    """(mean squared error, max absolute error) of decode(mean of q(z|x)), pixels in [-1, 1]."""
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((y - x).pow(2).mean()), float((y - x).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900, help="Adam steps")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--beta", type=float, default=1e-3, help="weight of the per-dimension KL")
    parser.add_argument("--max_minutes", type=float, default=9.0, help="stop early past this wall time")
    parser.add_argument("--out", type=Path, default=OUT, help="save_pretrained folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small convolutions: threads cost more than they give on a shared machine
    train, val = images()
    vae = build()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(0)
    tick = time.perf_counter()
    for step in range(args.steps):
        x = train[torch.randint(len(train), (args.batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=g)
        recon = (vae.decode(z).sample - x).pow(2).mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = recon + args.beta * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step}: recon {recon.item():.5f} kl/dim {kl.item():.4f}", flush=True)
        if time.perf_counter() - tick > 60 * args.max_minutes:
            print(f"stopped at step {step + 1}: past {args.max_minutes} minutes")
            break
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(part).latent_dist.mean for part in train.split(256)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1 / means.std()))
    mse, worst = reconstruction_error(vae, val)
    print(f"held-out reconstruction: mse {mse:.5f}, max |error| {worst:.3f} on {len(val)} images (pixels in [-1, 1])")
    print(f"latents: shift {vae.config.shift_factor:.4f}, scale {vae.config.scaling_factor:.4f}")
    print(f"wall time {time.perf_counter() - tick:.0f} s")
    vae.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
