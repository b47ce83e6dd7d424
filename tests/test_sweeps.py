"""A W&B sweep runs `rfkit fit` the way the agent does; each run says in its name, group and config
which settings it tried, as resolved (offline: the agent's command rendering is wandb's own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from scale_fixtures import child_env
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib import config_util
from wandb_log import run_info

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs/sweeps/digits_samplers.yaml"
TINY = [
    "--model.model.init_args.width=32",
    "--model.model.init_args.depth=1",
    "--data.init_args.batch_size=32",
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--model.sample_steps=2",
    "--trainer.logger.init_args.offline=true",  # the test has no W&B server
]


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command line the W&B agent runs for ``params``, rendered by wandb's own sweep utilities."""
    command = {"args": {k: {"value": v} for k, v in params.items()}, "run_id": "run0001", "program": sweep["program"]}
    variables = sweep_utils.create_sweep_command_args(command)
    variables["env"] = []  # the agent prepends /usr/bin/env
    out = []
    for item in sweep_utils.create_sweep_command(sweep["command"]):
        out += variables.get(item[2:-1], []) if item.startswith("${") else [item]
    return out


def test_a_sweep_run_names_what_it_tried_and_logs_the_resolved_recipe(tmp_path):
    sweep = yaml.safe_load(SWEEP.read_text())
    grid = sweep["parameters"]
    params = {"model.timesteps.init_args.base": "CosMap", "model.timesteps.init_args.shift": 3.0}
    assert all(v in grid[k]["values"] for k, v in params.items())
    argv = agent_command(sweep, params)
    assert argv[:2] == ["rfkit", "fit"] and argv[-2:] == [f"--{k}={v}" for k, v in params.items()]
    param_file = tmp_path / "sweep-params.yaml"
    config_util.save_config_file_from_dict(str(param_file), {k: {"value": v} for k, v in params.items()})
    env = {
        **child_env(),
        "WANDB_SWEEP_ID": "swp42",
        "WANDB_RUN_ID": "run0001",
        "WANDB_SWEEP_PARAM_PATH": str(param_file),
    }
    run = [sys.executable, "-m", "rfkit.cli", *argv[1:], f"--trainer.default_root_dir={tmp_path}", *TINY]
    done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-run0001")
    info = run_info(run_dir)
    assert info["name"] == "digits-dit-sweep base=CosMap shift=3.0"
    assert info["group"] == "sweep-swp42" and info["sweep"] == "swp42"
    config = {k: json.loads(v) for k, v in info["config"].items()}
    assert config["recipe"]["timesteps"] == "Shifted(base=CosMap(), shift=3.0)"
    assert config["config"]["model"]["timesteps"] == {
        "class_path": "rfkit.timesteps.Shifted",
        "init_args": {"base": {"class_path": "rfkit.timesteps.CosMap"}, "shift": 3.0},
    }
    assert len(config["git_revision"]) == 40 or config["git_revision"] == "unknown"


def test_outside_a_sweep_the_name_is_the_configs(tmp_path, monkeypatch):
    from rfkit.runs import sweep_run_name

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert sweep_run_name("digits-dit", {"model": {}}) == "digits-dit"
