"""EMA under FSDP2 on 2 real processes (gloo): a run killed with SIGKILL (every rank at once, as when
a node dies) and resumed by the same command ends bit-identical to an uninterrupted run, weights,
EMA average and optimizer moments alike (deterministic mode). The average is held sharded like the
weights and read back shard by shard. (FSDP2's EMA against one process: tests/test_scale.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scale_fixtures import child_env
from test_scale import TINY, weights

from rfkit.ema import PREFIX

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    f"--config={ROOT / 'configs/digits_fsdp.yaml'}",
    *TINY,
    "--trainer.max_steps=5",
    "--trainer.deterministic=true",
    "--trainer.callbacks.every_n_train_steps=2",  # the config's ModelCheckpoint: steps 2 and 4
    "--trainer.callbacks.save_top_k=-1",
]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rfkit.cli", "fit", *ARGS, f"--trainer.default_root_dir={run_dir}", *extra]


def run(run_dir: Path) -> None:
    done = subprocess.run(command(run_dir), env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # several minutes of 2-process runs: tools/test.sh -m slow
def test_fsdp2_ema_survives_sigkill_and_resumes_bit_identically(tmp_path):
    run(tmp_path / "uninterrupted")
    # the same run, killed after step 3 (the checkpoint of step 2 is on disk), every rank at once
    killed, marker = tmp_path / "killed", tmp_path / "hanging"
    hang = ["--trainer.callbacks+=scale_fixtures.HangAt", "--trainer.callbacks.step=3"]
    proc = subprocess.Popen(
        [*command(killed, *hang), f"--trainer.callbacks.marker={marker}"],
        env=child_env(), stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched
    proc.wait()
    proc.stderr.close()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    run(killed)  # the same command again: resumes from step 2
    resumed = weights(killed / "checkpoints/last.ckpt")
    reference = weights(tmp_path / "uninterrupted/checkpoints/last.ckpt")
    averages = [k for k in reference if k.startswith(PREFIX)]
    assert len(averages) == len([k for k in reference if k.startswith("model.")])  # every weight is trainable here
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    # the average moved away from the weights (decay 0.998 over 5 updates), so comparing it was not vacuous
    name = "model.final.proj.weight"
    assert not torch.equal(reference[name], reference[PREFIX + name])
    # and the optimizer's moments
    resumed, reference = (
        weights(d / "checkpoints/last.ckpt", "optimizer_0")["state"] for d in (killed, tmp_path / "uninterrupted")
    )
    assert resumed.keys() == reference.keys()
    for name, state in reference.items():
        assert torch.equal(resumed[name]["exp_avg_sq"], state["exp_avg_sq"]), name
