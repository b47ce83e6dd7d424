"""``rfkit``: the command line. ``rfkit fit|validate|test|predict --config FILE`` (a LightningCLI);
``rfkit sample`` draws from a checkpoint, ``rfkit reflow`` makes (noise, sample) pairs for k-rectified
flow, ``rfkit encode`` turns images into latent shards, ``rfkit index`` writes the manifest of
shards another tool wrote and ``rfkit export`` writes a fine-tuned SD3 / Flux transformer (or its LoRA)
as a folder diffusers loads (each has ``--help``).

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

``rfkit fit`` run again on a run directory that holds checkpoints resumes from the last complete
one (``--resume.auto false`` starts over; ``--ckpt_path`` picks one), and continues the same W&B
run. See :mod:`rfkit.resume` for what is restored.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

# imported so that their classes resolve by short name in configs and on the command line
import rfkit.callbacks
import rfkit.couplings
import rfkit.data
import rfkit.models
import rfkit.models.pretrained
import rfkit.objectives
import rfkit.solvers
import rfkit.strategies
import rfkit.timesteps
import rfkit.weightings  # noqa: F401
from rfkit.class_switch import class_switch_resets
from rfkit.data.batches import global_batch_split
from rfkit.hints import HintingParser, refused_value_hint
from rfkit.module import RectifiedFlow
from rfkit.resume import AtomicCheckpointIO, Resume, find_last_checkpoint, saved_wandb_run_id
from rfkit.runs import LogConfig, git_revision, sweep_run_name

PLUGIN_GROUP = "rfkit.plugins"
DEFAULT_ROOT = "runs/default"


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that do not apply to rfkit runs (for the command's duration only:
    ``main`` scopes them with ``warnings.catch_warnings``, so a notebook's own filters are untouched)."""
    # an IterableDataset's __len__ may be wrong with several workers; LatentShards' is exact
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)
    # RectifiedFlow.configure_model is idempotent and refuses sharding under EMA: the generic
    # "WeightAveraging doesn't support sharding model layers" warning says nothing for rfkit runs
    warnings.filterwarnings(
        "ignore", message=".*WeightAveraging callback with a model that overrides the configure_model"
    )


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

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Resume, "resume")  # always on: RNG states, SIGTERM, auto-resume
        parser.set_defaults(
            {
                "trainer.default_root_dir": DEFAULT_ROOT,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "rfkit", "offline": True},
                },
            }
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        with class_switch_resets():  # a component whose class changes starts from that class's defaults
            super().parse_arguments(parser, args)

    @override
    def before_instantiate_classes(self) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        # one run directory: loggers and checkpoints left at their defaults go inside it
        for logger in _entries(config.trainer.logger):
            args = getattr(logger, "init_args", None)
            if args is not None and args.get("save_dir") in (None, ".", "./"):
                args.save_dir = root
            if args is not None and logger.class_path.endswith("WandbLogger") and os.environ.get("WANDB_SWEEP_ID"):
                self._name_sweep_run(logger, config)
        dirs = [Path(root) / "checkpoints", Path(root)]  # Path(root): SLURM's hpc_ckpt_*.ckpt
        for callback in _entries(config.trainer.callbacks):
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(Path(root) / "checkpoints")
            if callback.class_path.endswith("ModelCheckpoint"):
                dirs.append(Path(callback.init_args.dirpath))
        if self.subcommand == "fit" and config.resume.auto and config.ckpt_path is None:
            self._resume_from(config, dirs)
        # Lightning's default bar redraws every step, ~0.2 ms: as much as a small model's step on a CPU
        callbacks = _entries(config.trainer.callbacks)
        if config.trainer.enable_progress_bar is not False and not any(
            "ProgressBar" in c.class_path for c in callbacks
        ):
            bar = Namespace(
                class_path="lightning.pytorch.callbacks.TQDMProgressBar", init_args=Namespace(refresh_rate=10)
            )
            config.trainer.callbacks = [*callbacks, bar]

    @staticmethod
    def _name_sweep_run(logger, config) -> None:
        """Under a W&B sweep agent: the swept settings in the run's name, the sweep as its group (rfkit.runs)."""
        logger.init_args.name = sweep_run_name(logger.init_args.get("name"), config.as_dict())
        extra = dict(logger.get("dict_kwargs") or {})
        extra.setdefault("group", f"sweep-{os.environ['WANDB_SWEEP_ID']}")
        logger.dict_kwargs = extra

    def _resume_from(self, config, dirs: list[Path]) -> None:
        """Point ``ckpt_path`` at the last complete checkpoint, and the W&B logger at the run it logged to."""
        last = find_last_checkpoint(dirs)
        if last is None:
            return
        rank_zero_info(f"rfkit: resuming from {last} (the last complete checkpoint; --resume.auto false starts over)")
        config.ckpt_path = str(last)
        run_id = saved_wandb_run_id(last)
        for logger in _entries(config.trainer.logger):
            args = getattr(logger, "init_args", None)
            if run_id and logger.class_path.endswith("WandbLogger") and not (args.get("id") or args.get("version")):
                args.id = run_id  # WandbLogger resumes a run it is given the id of

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a constructor refused a value: a config error, reported as one
            config = self.config[self.subcommand] if self.subcommand else self.config
            self.parser.error(f"a config value was refused: {err}\n{refused_value_hint(str(err), config)}".strip())

    @override
    def after_instantiate_classes(self) -> None:
        trainer = self.trainer
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # (a plugin from the config is kept)
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        global_batch = getattr(self.datamodule, "global_batch_size", None)
        if global_batch is not None:  # checked here, before any process is launched
            world = trainer.num_nodes * trainer.num_devices
            try:
                global_batch_split(global_batch, 0, world, trainer.accumulate_grad_batches)
            except ValueError as err:
                self.parser.error(str(err))
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        self.model.run_config = {"config": dumped[self.subcommand] if self.subcommand else dumped, **git_revision()}


COMMANDS = {
    "sample": "rfkit.commands.sample:sample",
    "reflow": "rfkit.commands.reflow:reflow",
    "encode": "rfkit.commands.encode:encode",
    "index": "rfkit.commands.index:index",
    "export": "rfkit.commands.export:export",
}
"""The commands besides LightningCLI's fit/validate/test/predict: functions whose signatures are
their options (jsonargparse), imported when run so that ``rfkit fit`` does not pay for them."""


SPACE_SEPARATED = ("--prompts",)
"""List options that also take shell-style values, ``--prompts "a cat" "a dog"`` (jsonargparse wants
``--prompts '["a cat", "a dog"]'``, which still works)."""


def gather_values(args: list[str]) -> list[str]:
    """``--prompts a b --seed 1`` -> ``--prompts=["a", "b"] --seed 1`` for the options of :data:`SPACE_SEPARATED`."""
    out, i = [], 0
    while i < len(args):
        if args[i] not in SPACE_SEPARATED:
            out.append(args[i])
            i += 1
            continue
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        values = args[i + 1 : j]
        single_json = len(values) == 1 and values[0].lstrip().startswith("[")
        out.append(f"{args[i]}={values[0] if single_json else json.dumps(values)}")
        i = j
    return out


def run_command(name: str, args: list[str]) -> None:
    """``rfkit sample|reflow|encode|index|export ...``: parse the options, run, print the returned report."""
    from jsonargparse import auto_cli

    module, function = COMMANDS[name].split(":")
    command = getattr(importlib.import_module(module), function)
    try:
        with class_switch_resets():
            result = auto_cli(command, args=gather_values(args), as_positional=False, prog=f"rfkit {name}")
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:  # bad input: say what, no traceback
        sys.exit(f"rfkit {name}: error: {err}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        print(yaml.safe_dump(result, sort_keys=False).rstrip())


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rfkit`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    load_plugins()
    if argv and argv[0] in COMMANDS:
        run_command(argv[0], argv[1:])
        return
    try:
        with warnings.catch_warnings():
            quiet_known_warnings()
            RFKitCLI(args=args)
    finally:
        # one command, one W&B run: close it so its files are complete, and so a later command in
        # the same process (a notebook, a test) does not append to it
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()


if __name__ == "__main__":
    sys.exit(main())
