#!/usr/bin/env bash
# Makes the shards configs/digits_latent.yaml trains on: the digits as 16x16 grey PNGs with labels
# (bilinear from 8x8), then `rfkit encode --vae rfkit/assets/digits_vae` (the small AutoencoderKL that
# tools/train_digits_vae.py trained) into data/digits_latent/{train,val}: (4, 8, 8) latents, the VAE's
# path and scaling in dataset.json. Paths are relative to the repository root, where rfkit fit and
# rfkit sample then run (they load the VAE from the manifest's path to decode). Reruns resume.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
.venv/bin/python -c "from rfkit.data.digits import export_images; export_images('data/digits_images16', size=16)"
for split in train:256 val:64; do
  .venv/bin/rfkit encode --source "data/digits_images16/${split%:*}" --out "data/digits_latent/${split%:*}" \
    --vae rfkit/assets/digits_vae --resolution 16 --grayscale true --samples_per_shard "${split#*:}" --device cpu
done
