#!/usr/bin/env bash
# Creates .venv (if missing) and installs rfkit into it, editable, with the test tools and the
# example plugin package of plugins/.
# torch is installed first and pinned: an unpinned `torch` requirement on a machine without torch
# pulls a multi-GB CUDA build. Set RFKIT_TORCH to choose another (e.g. RFKIT_TORCH="torch==2.9.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${RFKIT_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# torchcfm, the baseline of tools/bench_toy2d.py and bench_ot.py; --no-deps: its core needs only torch, numpy
# and pot, and its full dependency list pulls torchvision, which replaces the pinned torch
.venv/bin/pip install --no-deps torchcfm==1.0.7
# the out-of-tree example plugin package; it depends on rfkit only, so this installs no torch
.venv/bin/python -m pip install -q -e plugins/
