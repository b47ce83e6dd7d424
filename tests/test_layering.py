"""docs/design.md §4: the core math imports neither Lightning nor any I/O library; `import rfkit` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("lightning", "pytorch_lightning", "webdataset", "wandb", "jsonargparse", "torchmetrics", "PIL")


CORE = (
    "rfkit.timesteps rfkit.couplings rfkit.weightings rfkit.paths rfkit.solvers rfkit.diagnostics rfkit.draws rfkit.ot "
    "rfkit.objectives"
)


@pytest.mark.parametrize("modules", ["rfkit", CORE])
def test_core_math_does_not_import_lightning_or_io(modules):
    code = f"import sys; import {', '.join(modules.split())}; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_ot_solvers_packages_load_only_when_a_solve_needs_them():
    code = (
        "import sys, torch; import rfkit.couplings; from rfkit.ot import exact_assignment\n"
        "before = [m for m in ('lap', 'ot', 'scipy') if m in sys.modules]\n"
        "exact_assignment(torch.randn(8, 2), torch.randn(8, 2))\n"  # 2-D: the network simplex (POT)
        "print(before, 'ot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] True"
