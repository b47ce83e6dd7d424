#!/usr/bin/env bash
# Installs rfkit into .venv (if needed), then lints and runs the whole test suite, W&B offline.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
WANDB_MODE=offline .venv/bin/python -m pytest -q "$@"
