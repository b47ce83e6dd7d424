"""The out-of-tree example package (plugins/), installed: its entry point makes every plugin a short name.

Both commands run the real ``rfkit`` console script in a fresh process, where nothing but the
``rfkit.plugins`` entry point imports ``rfkit_example_plugins``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

import rfkit
from rfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
RFKIT = Path(sys.executable).with_name("rfkit")
PLUGINS = {
    "timesteps": "rfkit_example_plugins.Beta",
    "coupling": "rfkit_example_plugins.WithinClassOT",
    "weighting": "rfkit_example_plugins.P2Weight",
    "sample_solver": "rfkit_example_plugins.RK3",
}


def rfkit_cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([RFKIT, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_package_declares_the_entry_point():
    (ep,) = [ep for ep in entry_points(group="rfkit.plugins") if ep.name == "example"]
    assert ep.value == "rfkit_example_plugins" and ep.dist.name == "rfkit-example-plugins"


def test_fit_help_lists_the_plugins(tmp_path):
    out = " ".join(rfkit_cli("fit", "--help", cwd=tmp_path).split())  # help text wraps at any space
    for key, class_path in PLUGINS.items():
        option = out.rindex(f"--model.{key} {key.upper()}")  # the option's entry, after the usage line
        assert class_path in out[option : out.index("--model.", option + 10)], key


def test_fit_by_short_names_through_the_console_script(tmp_path):
    run = tmp_path / "run"
    rfkit_cli(
        "fit",
        f"--config={ROOT / 'configs' / 'digits.yaml'}",
        f"--trainer.default_root_dir={run}",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=2",
        "--model.model.init_args.width=32",
        "--model.model.init_args.depth=1",
        "--data.init_args.batch_size=32",
        "--data.init_args.batches_per_epoch=4",
        "--model.sample_steps=2",
        # the four plugins, by short name only
        "--model.timesteps=Beta",
        "--model.timesteps.b=1.5",
        "--model.coupling=WithinClassOT",  # refuses batches without labels: it really got cond["cls"]
        "--model.weighting=P2Weight",
        "--model.weighting.gamma=0.5",
        "--model.sample_solver=RK3",
        cwd=tmp_path,
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert {key: saved[key]["class_path"] for key in PLUGINS} == PLUGINS
    assert saved["timesteps"]["init_args"] == {"a": 2.0, "b": 1.5}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    # the checkpoint rebuilds the plugins from their class paths
    module = rfkit.load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert repr(module.timesteps) == "Beta(a=2.0, b=1.5)" and repr(module.weighting) == "P2Weight(gamma=0.5, k=1.0)"
    assert type(module.coupling).__name__ == "WithinClassOT" and type(module.sample_solver).__name__ == "RK3"


def test_a_misspelt_plugin_name_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={ROOT / 'configs' / 'digits.yaml'}", "--model.coupling=WithinClasOT"])
    assert exit_.value.code == 2
    assert "did you mean WithinClassOT?" in capsys.readouterr().err
