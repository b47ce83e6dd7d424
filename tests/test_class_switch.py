"""Switching a component's class gives it its own defaults plus exactly what the user wrote for it.

Each case is checked on the resolved config (what ``--print_config`` and the run's ``config.yaml``
show) and on the objects the CLI builds (what trains).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import _typehints
from scale_fixtures import child_env

import rfkit
from rfkit.class_switch import class_switch_resets
from rfkit.cli import RFKitCLI, main
from rfkit.couplings import Coupling
from rfkit.timesteps import ModeSampler

ROOT = Path(__file__).resolve().parents[1]
TOY2D, DIGITS = f"--config={ROOT / 'configs/toy2d.yaml'}", f"--config={ROOT / 'configs/digits.yaml'}"


def built(*args: str) -> RFKitCLI:
    return RFKitCLI(args=list(args), run=False)


def printed(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)["model"]


def optimizer_of_module(module) -> torch.optim.Optimizer:
    return module.configure_optimizers()  # the configs without a scheduler return the optimizer itself


def optimizer_of(cli: RFKitCLI) -> torch.optim.Optimizer:
    return optimizer_of_module(cli.model)


def test_adam_in_a_yaml_does_not_inherit_adamw_weight_decay(capsys):
    # configs/toy2d.yaml names torch.optim.Adam with lr only; the module's default optimizer is AdamW (wd 0.01)
    resolved = printed(capsys, TOY2D)["optimizer"]
    assert resolved["class_path"] == "torch.optim.Adam"
    assert resolved["init_args"]["lr"] == 0.001 and resolved["init_args"]["weight_decay"] == 0.0
    opt = optimizer_of(built(TOY2D))
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["lr"] == 0.001


def test_optimizer_switch_on_the_command_line(capsys):
    # digits.yaml names AdamW with lr 0.001; Adamax's own default lr is 0.002, and that is what it gets
    args = (DIGITS, "--model.optimizer=Adamax", "--model.optimizer.eps=1e-6")
    resolved = printed(capsys, *args)["optimizer"]
    assert resolved["class_path"] == "torch.optim.Adamax"
    assert resolved["init_args"]["lr"] == 0.002 and resolved["init_args"]["eps"] == 1e-6
    opt = built(*args).model.configure_optimizers()["optimizer"]  # (digits.yaml has a scheduler)
    assert type(opt) is torch.optim.Adamax
    assert opt.defaults["lr"] == 0.002 and opt.defaults["eps"] == 1e-6


def test_mode_sampler_on_the_command_line_gets_its_own_scale(capsys):
    # digits.yaml has LogitNormal(loc=0, scale=1); ModeSampler's default scale is 1.29
    resolved = printed(capsys, DIGITS, "--model.timesteps=ModeSampler")["timesteps"]
    assert resolved == {"class_path": "rfkit.timesteps.ModeSampler", "init_args": {"scale": 1.29}}
    sampler = built(DIGITS, "--model.timesteps=ModeSampler").model.timesteps
    assert type(sampler) is ModeSampler and sampler.scale == 1.29
    # what the user writes after the switch is kept
    sampler = built(DIGITS, "--model.timesteps=ModeSampler", "--model.timesteps.scale=0.5").model.timesteps
    assert sampler.scale == 0.5


def test_mode_sampler_in_a_second_yaml(capsys, tmp_path):
    over = tmp_path / "over.yaml"
    over.write_text("model:\n  timesteps:\n    class_path: rfkit.timesteps.ModeSampler\n")
    resolved = printed(capsys, DIGITS, f"--config={over}")["timesteps"]
    assert resolved["init_args"] == {"scale": 1.29}
    assert built(DIGITS, f"--config={over}").model.timesteps.scale == 1.29


def test_data_and_coupling_switches_start_from_the_new_defaults(capsys):
    cfg = built(TOY2D, "--data=rfkit.data.Digits", "--model.coupling=Independent")
    data = cfg.config.data
    assert data.class_path == "rfkit.data.Digits"
    assert data.init_args.batch_size == 128  # Digits' default, not toy2d.yaml's 256
    assert cfg.datamodule.batch_size == 128
    assert isinstance(cfg.model.coupling, Coupling) and type(cfg.model.coupling).__name__ == "Independent"


def test_an_argument_the_new_class_does_not_take_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["fit", DIGITS, "--model.timesteps=Uniform", "--model.timesteps.scale=1.5"])
    assert "rfkit.timesteps.Uniform has no argument 'scale': it takes no arguments." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", TOY2D, "--model.optimizer.momentum=0.9"])
    err = capsys.readouterr().err
    assert "torch.optim.Adam has no argument 'momentum'" in err and "weight_decay" in err


def test_the_run_config_and_the_stepped_optimizer_match_the_yaml(tmp_path):
    cli = RFKitCLI(
        args=["fit", TOY2D, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
              "--data.init_args.batches_per_epoch=2", "--data.init_args.val_size=64", "--model.sample_steps=2",
              "--trainer.val_check_interval=2"]
    )  # fmt: skip
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["optimizer"]
    assert saved["class_path"] == "torch.optim.Adam" and saved["init_args"]["weight_decay"] == 0.0
    (stepped,) = cli.trainer.optimizers
    assert type(stepped) is torch.optim.Adam
    assert [g["weight_decay"] for g in stepped.param_groups] == [0.0]
    assert all(s["step"] == 2 for s in stepped.state.values())  # it is the one that trained
    # and the checkpoint rebuilds the same recipe
    rebuilt = optimizer_of_module(rfkit.load_checkpoint(tmp_path / "checkpoints/last.ckpt"))
    assert type(rebuilt) is torch.optim.Adam and rebuilt.defaults["weight_decay"] == 0.0


def test_same_class_under_another_import_path_keeps_its_arguments(capsys):
    # AdamW -> torch.optim.adamw.AdamW is no switch: digits.yaml's weight_decay 0.0 stays
    resolved = printed(capsys, DIGITS, "--model.optimizer=torch.optim.adamw.AdamW")["optimizer"]
    assert resolved["init_args"]["weight_decay"] == 0.0


def test_ambiguous_short_names_are_refused(tmp_path):
    # a plugin package with a class named like a built-in makes the short name ambiguous: refused, never a guess
    (tmp_path / "dup_plugin.py").write_text(
        "from rfkit.timesteps import Uniform\n\n\nclass CosMap(Uniform):\n    pass\n"
    )
    code = f"import dup_plugin; from rfkit.cli import main; main(['fit', {DIGITS!r}, '--model.timesteps=CosMap'])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**child_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{child_env()['PYTHONPATH']}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Multiple subclasses with name CosMap" in done.stderr and "dup_plugin.CosMap" in done.stderr


def test_the_replaced_jsonargparse_hook_exists_and_is_restored():
    original = _typehints.discard_init_args_on_class_path_change
    with class_switch_resets():
        assert _typehints.discard_init_args_on_class_path_change is not original
    assert _typehints.discard_init_args_on_class_path_change is original
