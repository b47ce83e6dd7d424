#!/usr/bin/env bash
# Installs rfkit into .venv if needed, then runs the rfkit CLI with the given arguments.
# Example: tools/rfkit.sh fit --config configs/digits.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/rfkit ] || tools/install.sh
exec .venv/bin/rfkit "$@"
