"""What a run tells W&B about itself: the resolved config, the recipe, the git revision, and under a
sweep a name and group that say which settings it tried.

Every run logs, as its W&B config, the whole resolved config (``config.*``: every default filled
in, as the run's ``config.yaml``), the git revision, and ``recipe.*``: the components that trained,
as they print (``recipe.timesteps = "Shifted(base=Uniform(), shift=3.0)"``). Runs are compared in
the W&B UI by those, whatever the command line that made them.

Under a W&B sweep (the agent sets ``WANDB_SWEEP_ID`` and writes the run's parameters to
``WANDB_SWEEP_PARAM_PATH``), a run named in the config (``digits-dit``) would give every run of the
sweep the same name. rfkit appends the swept settings as resolved (``digits-dit base=Uniform
shift=3.0``) and, unless the config names a group, groups the runs by sweep (``sweep-<id>``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

__all__ = ["LogConfig", "git_revision", "recipe", "sweep_run_name"]


def git_revision(cwd: str | Path = ".") -> dict[str, str | bool]:
    """The commit the run's code came from, and whether the tree had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        return {"git_revision": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_revision": "unknown", "git_dirty": False}


def recipe(module) -> dict[str, str]:
    """The components a RectifiedFlow trains with, as they print (plugins print as their constructor call)."""
    parts = {"model": type(module.model).__name__}
    for name in ("timesteps", "coupling", "weighting", "objective", "sample_solver"):
        if getattr(module, name, None) is not None:
            parts[name] = repr(getattr(module, name))
    return parts


def _short(value: Any) -> str:
    """A resolved config value in a few characters: a class by its name and arguments, a number as itself."""
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={_short(v)}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path'].rpartition('.')[2]}({args})" if args else value["class_path"].rpartition(".")[2]
    return str(value)


def sweep_run_name(name: str | None, resolved: dict) -> str | None:
    """``name`` plus the swept settings as resolved, under a W&B sweep agent; ``name`` otherwise."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not os.environ.get("WANDB_SWEEP_ID") or not path or not Path(path).is_file():
        return name
    swept = yaml.safe_load(Path(path).read_text()) or {}
    parts = []
    for key in swept:
        if key.startswith(("wandb_", "_wandb")):  # the file's own bookkeeping (wandb_version)
            continue
        value: Any = resolved
        for part in key.split("."):  # "model.timesteps.init_args.shift" in the resolved config
            value = value.get(part) if isinstance(value, dict) else None
        parts.append(f"{key.rpartition('.')[2]}={_short(value)}")
    return " ".join([name or "", *parts]).strip()


class LogConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory; sends the config, recipe and git revision to the loggers."""

    @override
    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config, "recipe": recipe(pl_module), **git_revision()})
