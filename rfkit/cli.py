"""``rfkit``: the command line. A LightningCLI: ``rfkit fit|validate|test|predict --config FILE``; ``rfkit encode``
turns images into latent shards (``rfkit encode --help``).

Every component is named in YAML by ``class_path`` (a full dotted path) or by its short class name
when the class is importable: rfkit's built-ins, and classes of any package that declares the
entry-point group ``rfkit.plugins`` (those modules are imported before parsing)::

    [project.entry-points."rfkit.plugins"]
    mypkg = "mypkg.plugins"

One run directory, ``trainer.default_root_dir``, holds everything a run writes: ``config.yaml``,
``samples/``, ``loss_by_t.csv``, ``checkpoints/`` and ``wandb/`` (unless a config places the
logger or the checkpoints elsewhere). Runs log to Weights & Biases, offline unless the config says
``offline: false``; the resolved config and the git revision go with the run and into every
checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

# imported so that their classes resolve by short name in configs and on the command line
import rfkit.callbacks
import rfkit.couplings
import rfkit.data
import rfkit.models
import rfkit.solvers
import rfkit.timesteps
import rfkit.weightings  # noqa: F401
from rfkit.hints import HintingParser
from rfkit.module import RectifiedFlow

PLUGIN_GROUP = "rfkit.plugins"
DEFAULT_ROOT = "runs/default"


def load_plugins() -> list[str]:
    """Import every module declared in the entry-point group ``rfkit.plugins``; return their names."""
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as err:  # one broken plugin must not take the whole CLI down
            warnings.warn(f"rfkit plugin {ep.name!r} ({ep.value}) failed to import: {err!r}", stacklevel=2)
        else:
            loaded.append(ep.name)
    return loaded


def git_revision(cwd: str | Path = ".") -> dict[str, str | bool]:
    """The commit the run's code came from, and whether the tree had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        return {"git_revision": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_revision": "unknown", "git_dirty": False}


class LogConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory; sends the config and git revision to the loggers."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config, **git_revision()})


def _entries(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


class RFKitCLI(LightningCLI):
    """LightningCLI with rfkit's defaults: the RectifiedFlow module, any LightningDataModule, W&B."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            RectifiedFlow,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=LogConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module takes optimizer / scheduler callables
            parser_class=HintingParser,
            parser_kwargs={"description": __doc__.split("\n\n")[0]},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "trainer.default_root_dir": DEFAULT_ROOT,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "rfkit", "offline": True},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        # one run directory: loggers and checkpoints left at their defaults go inside it
        for logger in _entries(config.trainer.logger):
            args = getattr(logger, "init_args", None)
            if args is not None and args.get("save_dir") in (None, ".", "./"):
                args.save_dir = root
        for callback in _entries(config.trainer.callbacks):
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(Path(root) / "checkpoints")

    def after_instantiate_classes(self) -> None:
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        self.model.run_config = {"config": dumped[self.subcommand] if self.subcommand else dumped, **git_revision()}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rfkit`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["encode"]:  # not a LightningCLI subcommand: images -> latent shards
        from rfkit.encode import main as encode

        return encode(argv[1:])
    load_plugins()
    try:
        RFKitCLI(args=args)
    finally:
        # one command, one W&B run: close it so its files are complete, and so a later command in
        # the same process (a notebook, a test) does not append to it
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()


if __name__ == "__main__":
    sys.exit(main())
