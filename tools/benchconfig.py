"""Benchmarks train what users run: the objects a shipped config builds (imported as ``benchconfig``).

``from_config`` builds a recipe exactly as ``rfkit fit --config configs/<name>.yaml ...overrides`` does
(the same parser, class switches and defaults), without training it, so a benchmark can time or
score the module and data module of a real config. A benchmark that must build its objects by
hand (a hand-written loop, a narrower model) calls ``check_same_recipe`` once against the config
instead: the optimizer, scheduler and every plugin must be the config's, class and arguments.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule

from rfkit.callbacks import InitFromCheckpoint
from rfkit.cli import RFKitCLI
from rfkit.ema import EMA
from rfkit.module import RectifiedFlow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_CALLBACKS = (InitFromCheckpoint, EMA)


def from_config(config: str, *overrides: str) -> tuple[RectifiedFlow, LightningDataModule]:
    """(module, data module) of ``configs/<config>`` with command-line ``overrides``; seeds as the CLI does."""
    return build_run(config, *overrides)[:2]


def build_run(config: str, *overrides: str) -> tuple[RectifiedFlow, LightningDataModule, list[Callback]]:
    """``from_config`` plus the config's callbacks that change what is trained (``TRAINING_CALLBACKS``:
    initialisation from a checkpoint, the EMA), to hand to a bare ``Trainer``; the logging and plotting
    ones stay out of a timed run. Relative paths in the config resolve against the working directory."""
    cli = RFKitCLI(args=[f"--config={CONFIGS / config}", "--trainer.logger=false", *overrides], run=False)
    return cli.model, cli.datamodule, [c for c in cli.trainer.callbacks if isinstance(c, TRAINING_CALLBACKS)]


def config_steps(config: str) -> int:
    """``trainer.max_steps`` of ``configs/<config>``: a benchmark trains as long as ``rfkit fit`` would."""
    return yaml.safe_load((CONFIGS / config).read_text())["trainer"]["max_steps"]


def _plugin(obj) -> tuple:
    return type(obj), {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def optimizer_recipe(factory) -> tuple:
    """(class, defaults) of the optimizer ``factory`` builds."""
    opt = factory([torch.nn.Parameter(torch.zeros(1))])
    return type(opt), opt.defaults


def _scheduler(factory) -> tuple | None:
    if factory is None:
        return None
    sched = factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    return type(sched), {k: v for k, v in sched.state_dict().items() if not k.startswith("_")}


def recipe(module: RectifiedFlow) -> dict:
    """What decides how a module trains: model class and parameter shapes, the plugins (class and
    attributes), the optimizer (class and ``defaults``), the LR schedule (class and state), label dropout."""
    return {
        "model": (type(module.model), {k: tuple(v.shape) for k, v in module.model.state_dict().items()}),
        "timesteps": _plugin(module.timesteps),
        "coupling": _plugin(module.coupling),
        "weighting": _plugin(module.weighting),
        "optimizer": optimizer_recipe(module.optimizer_factory),
        "lr_scheduler": _scheduler(module.lr_scheduler_factory),
        "cond_dropout": module.cond_dropout,
    }


def check_same_recipe(ours: RectifiedFlow, config: str, *overrides: str) -> None:
    """Raise ``SystemExit`` naming the difference unless ``ours`` trains as ``configs/<config>`` would."""
    got, expected = recipe(ours), recipe(from_config(config, *overrides)[0])
    for key, value in got.items():
        if value != expected[key]:
            raise SystemExit(
                f"this benchmark's {key} is not what configs/{config} {' '.join(overrides)} builds:\n"
                f"  benchmark: {value}\n  config:    {expected[key]}"
            )
