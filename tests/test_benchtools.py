"""The benchmarks' shared pieces (tools/benchconfig.py, tools/benchstats.py) and bench_onestep's 2-RF
pipeline: what they train is what the configs build, and every 2-D benchmark scores the same points."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_onestep  # noqa: E402  (scripts in tools/, importable once tools/ is on the path)
import benchconfig  # noqa: E402
import benchstats  # noqa: E402

from rfkit.callbacks import InitFromCheckpoint  # noqa: E402
from rfkit.cli import RFKitCLI  # noqa: E402
from rfkit.data import EightGaussians  # noqa: E402
from rfkit.ema import EMA  # noqa: E402


def test_build_run_hands_over_the_callbacks_that_change_training_and_only_those():
    _, _, reflow = benchconfig.build_run("toy2d_reflow.yaml")
    assert [type(c) for c in reflow] == [InitFromCheckpoint]
    assert reflow[0].path == "runs/toy2d_1rf/checkpoints/last.ckpt"  # the config's teacher, relative to the run
    assert [type(c) for c in benchconfig.build_run("digits.yaml")[2]] == [EMA]
    assert benchconfig.build_run("toy2d.yaml")[2] == []  # plots, W&B and checkpoints stay out of timed runs


def test_config_steps_is_what_rfkit_fit_would_run():
    for config in ("toy2d.yaml", "digits_meanflow.yaml"):
        cli = RFKitCLI(args=[f"--config={benchconfig.CONFIGS / config}", "--trainer.logger=false"], run=False)
        assert benchconfig.config_steps(config) == cli.trainer.max_steps


def test_evaluation_draws_are_fixed_per_index_and_differ_between_indices():
    noise, data = benchstats.eval_draw(EightGaussians(), 3)
    again = benchstats.eval_draw(EightGaussians(), 3)
    assert noise.shape == data.shape == (benchstats.N_EVAL, 2)
    assert torch.equal(noise, again[0]) and torch.equal(data, again[1])
    assert not torch.equal(data, benchstats.eval_draw(EightGaussians(), 4)[1])
    assert benchstats.w2(data, data) < 1e-6 < benchstats.w2(data + 1.0, data)


def test_two_rf_trains_the_student_from_its_teacher_on_its_pairs_and_charges_all_three(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_onestep, "WORK", tmp_path)
    monkeypatch.setattr(bench_onestep, "PAIRS_2D", ["--num_pairs=512", "--num_val_pairs=256", "--num_steps=4"])
    run = bench_onestep.two_rf("Moons", steps=100, seed=0)
    work = tmp_path / "2d" / "Moons_seed0"
    assert run["steps"] == 200 and run["seconds"] > 0
    assert sorted((work / "data/toy2d_reflow").glob("shard-*.tar"))  # the pairs, on disk
    teacher = torch.load(work / "runs/toy2d_1rf/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    student = run["flow"].state_dict()
    init = benchconfig.from_config("toy2d_reflow.yaml", "--seed_everything=0")[0].state_dict()  # teacher's init too

    def gap(a: dict, b: dict) -> float:
        return max(float((a[n] - b[n]).abs().max()) for n in init)

    # started from the teacher (InitFromCheckpoint): 100 steps at lr 3e-4 stay close to it, while the
    # teacher's 100 steps at lr 1e-3 moved it well away from the shared random init
    assert gap(student, teacher) < 0.5 * gap(student, init)
