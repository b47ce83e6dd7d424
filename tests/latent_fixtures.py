"""What tools/digits_latent.sh makes, smaller: 16x16 digits encoded by the shipped VAE into latent shards."""

from __future__ import annotations

from pathlib import Path

import rfkit
from rfkit.cli import main
from rfkit.data.digits import export_images

DIGITS_VAE = Path(rfkit.__file__).parent / "assets" / "digits_vae"


def write_digits_latent_shards(root: Path, limit: int = 64, val_limit: int = 20) -> Path:
    """``root/{train,val}``: ``limit`` training and ``val_limit`` held-out digits as (4, 8, 8) latents.

    The manifest names the VAE by its absolute path, so the shards decode from any directory."""
    images = export_images(root / "images", size=16, limit=limit)
    for split, n in (("train", limit), ("val", val_limit)):
        source = images / split
        for extra in sorted(source.glob("*.png"))[n:]:  # the val split gets its own, smaller limit
            for sidecar in (extra, extra.with_suffix(".txt"), extra.with_suffix(".cls")):
                sidecar.unlink()
        main(
            ["encode", f"--source={source}", f"--out={root / split}", f"--vae={DIGITS_VAE}", "--resolution=16",
             "--grayscale=true", "--samples_per_shard=32", "--device=cpu"]
        )  # fmt: skip
    return root
