"""Resume that loses nothing: real runs killed with SIGKILL or stopped with SIGTERM, then resumed by
running the same command again, end with exactly the weights of an uninterrupted run.

Deterministic mode; the timestep sampler draws from the global torch RNG (so the RNG state must be
restored), the model keeps an EMA (rfkit.ema.EMA; so must its average), the data stream is mid-epoch at every
interruption (so must its position), and training ends at step 7, where no ModelCheckpoint writes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scale_fixtures import child_env

from rfkit.cli import main
from rfkit.resume import AtomicCheckpointIO, NonFiniteLossError, _rng_state, _set_rng_state, find_last_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    f"--config={ROOT / 'configs/digits.yaml'}",
    "--model.model.init_args.width=32",
    "--model.model.init_args.depth=1",
    "--data.init_args.batch_size=32",
    "--data.init_args.batches_per_epoch=5",  # interruptions at steps 2-3 are mid-epoch; step 7 is in epoch 2
    "--model.sample_steps=2",
    "--model.timesteps=scale_fixtures.GlobalRNGUniform",
    "--trainer.max_steps=7",
    "--trainer.val_check_interval=3",
    "--trainer.log_every_n_steps=2",
    "--trainer.deterministic=true",
    "--trainer.enable_progress_bar=false",
    "--trainer.callbacks.every_n_train_steps=2",  # the config's ModelCheckpoint: steps 2, 4, 6
    "--trainer.callbacks.save_top_k=-1",
]


def fit(run_dir: Path, *extra: str) -> None:
    main(["fit", *ARGS, f"--trainer.default_root_dir={run_dir}", *extra])


def start(run_dir: Path, hang_at: int) -> tuple[subprocess.Popen, Path]:
    """The same command as a real process that stops after step ``hang_at`` and waits to be signalled."""
    marker = run_dir / "hanging"
    hang = ["--trainer.callbacks+=scale_fixtures.HangAt", f"--trainer.callbacks.step={hang_at}"]
    cmd = [sys.executable, "-m", "rfkit.cli", "fit", *ARGS, f"--trainer.default_root_dir={run_dir}", *hang]
    proc = subprocess.Popen(
        [*cmd, f"--trainer.callbacks.marker={marker}"], env=child_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the step it should hang at"
        time.sleep(0.1)
    return proc, marker


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    fit(run_dir)
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)


def assert_same_run(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == 7
    # the trained weights and their EMA average (rfkit.ema.EMA: ema/<name>)
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name in reference["state_dict"]:
        assert torch.equal(resumed["state_dict"][name], reference["state_dict"][name]), name
    # the average is not the trained weights (so comparing it says something), and stays apart from them
    # in checkpoints written after training ended, or mid-validation (SIGTERM) with the average swapped in
    name = "model.final.proj.weight"
    assert not torch.equal(reference["state_dict"][name], reference["state_dict"][f"ema/{name}"])
    moments = [s["exp_avg_sq"] for s in reference["optimizer_states"][0]["state"].values()]
    resumed_moments = [s["exp_avg_sq"] for s in resumed["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, resumed_moments, strict=True))


def wandb_ids(run_dir: Path) -> list[str]:
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, uninterrupted):
    proc, _ = start(tmp_path, hang_at=3)  # checkpoints at step 2; step 3 is lost with the process
    proc.kill()
    proc.wait()
    proc.stderr.close()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    # a crash in the middle of writing: a truncated newer checkpoint and a leftover temporary file
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "epoch=0-step=3.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / "last.ckpt.partial").write_bytes(data[:100])
    with pytest.warns(UserWarning, match=r"skipping .*step=3.ckpt: it is incomplete"):
        fit(tmp_path)  # the same command: resumes from step 2
    assert_same_run(torch.load(ckpts / "last.ckpt", weights_only=True), uninterrupted)
    ids = wandb_ids(tmp_path)
    assert len(ids) == 2 and ids[0] == ids[1]  # one W&B run, continued


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, uninterrupted):
    # the signal arrives after step 3, before its validation: Lightning stops after the first validation
    # batch, with the EMA average swapped in, and the checkpoint must still hold the trained weights
    proc, _ = start(tmp_path, hang_at=3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # the step in flight was finished and saved
    fit(tmp_path)
    assert_same_run(torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True), uninterrupted)


def test_a_resumed_run_overwrites_the_last_checkpoint_that_sigterm_wrote(tmp_path):
    # stopped at step 1, before the config's ModelCheckpoint ever saved: Resume writes last.ckpt alone
    proc, _ = start(tmp_path, hang_at=1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 1
    fit(tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]  # no last-v1
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 7


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*Last good checkpoint: .*last.ckpt"):
        fit(
            tmp_path,
            "--trainer.max_steps=6",
            "--model.weighting=scale_fixtures.NaNOnLastRank",
            "--model.weighting.call=5",
        )
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - a write that fails half-way (an unpicklable object)
        io.save_checkpoint({"global_step": 2, "w": torch.ones(3), "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert (tmp_path / "last.ckpt.partial").exists()  # what was half-written is left aside, never picked
    assert find_last_checkpoint([tmp_path]) == path.resolve()
    (tmp_path / "sharded.ckpt").mkdir()  # a sharded checkpoint folder without its .metadata: incomplete
    with pytest.warns(UserWarning, match="sharded.ckpt"):
        assert find_last_checkpoint([tmp_path]) == path.resolve()
    assert find_last_checkpoint([tmp_path / "missing"]) is None
    # after a NaN loss the last *good* checkpoint is wanted: one with NaN weights is complete, not good
    nan = tmp_path / "nan.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.tensor([1.0, float("nan")])}}, nan)
    assert find_last_checkpoint([tmp_path]) == nan.resolve()
    with pytest.warns(UserWarning, match="nan.ckpt"):
        assert find_last_checkpoint([tmp_path], finite=True) == path.resolve()


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.save({"rng": _rng_state()}, tmp_path / "rng.pt")
    expected = torch.rand(3), np.random.rand(3), random.random()
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_a_run_shorter_than_the_checkpoint_interval_leaves_one_last_checkpoint(tmp_path):
    # ModelCheckpoint(save_last=True) writes last.ckpt when training ends if it saved nothing before;
    # Resume must not write it first, or Lightning versions the file to last-v1.ckpt
    fit(tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 1
