"""The one-step league table: 1-RF, minibatch OT, 2-RF, MeanFlow and Shortcut at 1, 2 and 4 network
evaluations and at the many-step floor, each trained by the config a user runs.

    python tools/bench_onestep.py           # 2-D, 3 seeds x the configs' 5,000 steps: results/bench_onestep.*
    python tools/bench_onestep.py --quick   # 2-D, 1 seed x 400 steps (minutes): results/bench_onestep_quick.md
    python tools/bench_onestep.py --digits  # digits, 1 seed of the digits configs: results/bench_onestep_digits.*

2-D (moons, 8gaussians). Each method is the config a user would run, fitted by a bare Lightning
``Trainer`` (logger, checkpoints, validation off; the config's initialisation and EMA callbacks on,
``benchconfig.build_run``) for the config's steps, batch 256, MLP 2-64x3-2, Adam:

- 1-RF: ``configs/toy2d.yaml --model.coupling=Independent`` (flow matching, independent pairs).
- OT: ``configs/toy2d.yaml`` (flow matching, exact minibatch OT).
- 2-RF: ``configs/toy2d_reflow.yaml``, started from this seed's 1-RF (the teacher) and trained on
  ``rfkit reflow`` pairs of it (50,000 pairs, 100 Euler steps), as the config's comment says. Its
  budget is the teacher's, the pairs' and its own: steps and seconds count all three.
- MeanFlow: ``configs/toy2d_meanflow.yaml`` (one JVP per step: about twice a step's compute).
- Shortcut: ``configs/toy2d_shortcut.yaml`` (a no-grad target pass on a quarter of the rows).
- MeanFlow + OT: ``configs/toy2d_meanflow.yaml --model.coupling=MinibatchOT --model.coupling.method=exact``:
  the two compose; MeanFlow then learns the average velocity of the straighter OT flow.

Samples come from each objective's own sampler (``RectifiedFlow.sample``): K Euler steps of the
velocity for flow matching, K jumps for MeanFlow and Shortcut, K network evaluations either way; the
floor is K = 100. W2 is exact OT between 2,000 samples and 2,000 data points of evaluation draw
``seed`` (``benchstats.eval_draw``, the draws tools/bench_toy2d.py uses). Paired by seed, the table
gives each method's 1-NFE W2 minus OT's with a 95 % Student-t interval over seeds.

Digits (``--digits``). Everything runs through the ``rfkit`` command, in
tools/results/bench_onestep/digits/seed<N>/: ``configs/digits.yaml`` (1-RF, the teacher), ``rfkit
reflow`` (20,000 pairs, Heun 32 steps, CFG 2) and ``configs/digits_reflow.yaml`` (2-RF), then
``configs/digits_meanflow.yaml`` and ``configs/digits_shortcut.yaml``, and MeanFlow again with uniform
(t, r) (``--model.timesteps=Uniform``). Scored as tools/demo_reflow.py scores digits (``score_digits``:
1,000 samples from fixed noise, 100 per class). A rerun resumes: finished runs are scored, not
retrained. Seconds: each command's wall time, measured here (start-up and validation included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import torch
from benchconfig import build_run, config_steps
from benchstats import eval_draw, mean_interval, w2
from demo_reflow import rfkit_cmd, score_digits

import rfkit
from rfkit.data import toy2d

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).parent / "results"
WORK = OUT / "bench_onestep"
TARGETS = ("Moons", "EightGaussians")
METHODS = {  # method -> (config, overrides); 2-RF also needs its teacher (see two_rf)
    "1-RF": ("toy2d.yaml", ["--model.coupling=Independent"]),
    "OT": ("toy2d.yaml", []),
    "2-RF": ("toy2d_reflow.yaml", []),
    "MeanFlow": ("toy2d_meanflow.yaml", []),
    "Shortcut": ("toy2d_shortcut.yaml", []),
    "MeanFlow + OT": ("toy2d_meanflow.yaml", ["--model.coupling=MinibatchOT", "--model.coupling.method=exact"]),
}
NFE = (1, 2, 4, 100)
PAIRS_2D = ["--num_pairs=50000", "--num_val_pairs=2000", "--num_steps=100", "--samples_per_shard=10000"]


@contextmanager
def working_directory(path: Path):
    """Run in ``path``: the reflow config names its teacher and shards relative to the run folder."""
    path.mkdir(parents=True, exist_ok=True)
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# ---------------------------------------------------------------------------- 2-D


def train(config: str, overrides: list[str], steps: int, seed: int, save: Path | None = None) -> tuple:
    """(module, seconds) of ``configs/<config>`` fitted for ``steps``; ``save``: also write its checkpoint."""
    seeds = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
    flow, data, callbacks = build_run(config, *seeds, f"--data.init_args.batches_per_epoch={steps}", *overrides)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(flow, datamodule=data)
    seconds = time.perf_counter() - start
    if save is not None:
        trainer.save_checkpoint(save)
    return flow.eval(), seconds


def two_rf(target: str, steps: int, seed: int) -> dict:
    """1-RF teacher, ``rfkit reflow`` pairs, 2-RF student, in the folders configs/toy2d_reflow.yaml names."""
    work = WORK / "2d" / f"{target}_seed{seed}"
    shutil.rmtree(work, ignore_errors=True)  # rfkit reflow keeps finished shards: a stale teacher's would stay
    with working_directory(work):
        teacher = Path("runs/toy2d_1rf/checkpoints/last.ckpt")
        teacher.parent.mkdir(parents=True, exist_ok=True)
        _, teacher_seconds = train("toy2d.yaml", [*METHODS["1-RF"][1], f"--data.init_args.target={target}"],
                                   steps, seed, save=teacher)  # fmt: skip
        start = time.perf_counter()
        reflow = ["reflow", f"--ckpt={teacher}", "--out=data/toy2d_reflow", f"--seed={seed}", *PAIRS_2D]
        rfkit_cmd(*reflow, cwd=work)
        pair_seconds = time.perf_counter() - start
        student, seconds = train(*METHODS["2-RF"], steps, seed)
    return {"flow": student, "steps": 2 * steps, "seconds": teacher_seconds + pair_seconds + seconds}


def run_2d(method: str, target: str, steps: int, seed: int) -> dict:
    if method == "2-RF":
        return two_rf(target, steps, seed)
    config, overrides = METHODS[method]
    flow, seconds = train(config, [*overrides, f"--data.init_args.target={target}"], steps, seed)
    return {"flow": flow, "steps": steps, "seconds": seconds}


@torch.no_grad()
def evaluate(flow, target: str, seed: int) -> dict[int, float]:
    """W2 after K network evaluations of the objective's sampler, for K in NFE, on evaluation draw ``seed``."""
    x0, data = eval_draw(getattr(toy2d, target)(), seed)
    out = {}
    for k in NFE:
        assert flow.nfe(k) == k, "the 2-D configs use no guidance: one evaluation per step"
        out[k] = w2(flow.sample(x0, {}, num_steps=k), data)
    return out


def report_2d(results: dict, steps: int, seeds: int, minutes: float, quick: bool) -> str:
    lines = [
        "# One-step league table (2-D toys)",
        "",
        f"`python tools/bench_onestep.py{' --quick' if quick else ''}`: {seeds} seed(s), {steps} steps per "
        f"training run, batch 256, MLP 2-64x3-2; {minutes:.1f} minutes on a shared 2-core CPU. W2 (lower is "
        "better; mean over seeds) after K network evaluations of each objective's own sampler; K = 100 is the "
        "floor. Budget: optimizer steps and seconds of training, 2-RF's including its teacher and pairs.",
        "",
        "| target | method | steps | seconds | " + " | ".join(f"W2 @ {k}" for k in NFE)
        + " | W2 @ 1 / floor | 1-NFE minus OT (95 % CI) |",
        "|---|---|---|---|" + "---|" * len(NFE) + "---|---|",
    ]  # fmt: skip
    for target in TARGETS:
        for method in METHODS:
            runs = results[target, method]
            mean = {k: sum(r[k] for r in runs) / len(runs) for k in NFE}
            diff = [r[1] - o[1] for r, o in zip(runs, results[target, "OT"], strict=True)]
            d, lo, hi = mean_interval(diff, 0.95)
            paired = "-" if method == "OT" else f"{d:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if seeds > 1 else "")
            seconds = sum(r["seconds"] for r in runs) / len(runs)
            lines.append(
                f"| {target} | {method} | {runs[0]['steps']} | {seconds:.1f} | "
                + " | ".join(f"{mean[k]:.3f}" for k in NFE) + f" | {mean[1] / mean[100]:.2f} | {paired} |"
            )  # fmt: skip
    lines += ["", "Targets of issue 12 (MeanFlow's 1-NFE W2 at most OT's, and within 1.5x of its own floor):", ""]
    for target in TARGETS:
        for method in (m for m in METHODS if m.startswith("MeanFlow")):
            mf, ot = results[target, method], results[target, "OT"]
            d, lo, hi = mean_interval([m[1] - o[1] for m, o in zip(mf, ot, strict=True)], 0.95)
            ratio = sum(r[1] for r in mf) / sum(r[100] for r in mf)
            level = "at most OT's" if d <= 0 else "level with OT's (the interval holds 0)" if lo <= 0 else "above OT's"
            if ratio > 1.5 or lo > 0:
                verdict = "missed"
            else:  # the mean at or below OT's meets "at most"; an interval holding 0 only fails to tell them apart
                verdict = "met" if d <= 0 else f"not met, nor told apart from OT with {len(mf)} seeds"
            lines.append(
                f"- {target}, {method}: 1-NFE W2 minus OT's {d:+.3f} [{lo:+.3f}, {hi:+.3f}], {level}; "
                f"1-NFE / own floor {ratio:.2f}: {verdict}."
            )
    return "\n".join(lines) + "\n"


def plot_2d(results: dict, path: Path) -> None:
    """W2 against network evaluations, one panel per target; bars: std over seeds."""
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(5 * len(TARGETS), 4))
    for ax, target in zip(axes, TARGETS, strict=True):
        for method in METHODS:
            values = torch.tensor([[r[k] for k in NFE] for r in results[target, method]])
            std = values.std(0) if len(values) > 1 else torch.zeros(len(NFE))
            ax.errorbar(NFE, values.mean(0), yerr=std, marker="o", capsize=3, label=method)
        ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="W2 (log scale)", title=target)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_2d(steps: int, seeds: int, quick: bool) -> None:
    start = time.perf_counter()
    rows = []
    for target in TARGETS:
        for seed in range(seeds):
            for method in METHODS:
                run = run_2d(method, target, steps, seed)
                scores = evaluate(run.pop("flow"), target, seed)
                rows.append({"target": target, "method": method, "seed": seed, "w2": scores} | run)
                print(rows[-1], flush=True)
    name = f"bench_onestep{'_quick' if quick else ''}"
    raw = {"steps": steps, "seeds": seeds, "minutes": (time.perf_counter() - start) / 60, "quick": quick, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(raw, indent=1))
    write_2d(OUT / f"{name}.json")


def write_2d(raw_path: Path) -> None:
    """The table (and, for a full run, the plot) of a 2-D run's raw scores, beside them."""
    raw = json.loads(raw_path.read_text())
    results: dict = {}
    for row in raw["rows"]:
        scores = {int(k): v for k, v in row["w2"].items()}
        results.setdefault((row["target"], row["method"]), []).append(
            scores | {"steps": row["steps"], "seconds": row["seconds"]}
        )
    text = report_2d(results, raw["steps"], raw["seeds"], raw["minutes"], raw["quick"])
    raw_path.with_suffix(".md").write_text(text)
    if not raw["quick"]:
        plot_2d(results, raw_path.with_suffix(".png"))
    print(text)


# ---------------------------------------------------------------------------- digits

DIGITS = {  # method -> (config, run folder, steps, overrides); 2-RF's teacher and pairs come first
    "1-RF": ("digits.yaml", "runs/digits", 2000, []),
    "2-RF": ("digits_reflow.yaml", "runs/digits_2rf", 2000, []),
    "MeanFlow": ("digits_meanflow.yaml", "runs/digits_meanflow", 2000, []),
    "Shortcut": ("digits_shortcut.yaml", "runs/digits_shortcut", 2000, []),
    # the 1-jump interval h = 1 is all but never drawn from the config's logit-normal (t, r); uniform draws it
    "MeanFlow, uniform (t, r)": (
        "digits_meanflow.yaml",
        "runs/digits_meanflow_uniform",
        2000,
        ["--model.timesteps=Uniform"],
    ),
}
PAIRS_DIGITS = ["--num_pairs=20000", "--num_val_pairs=500", "--num_steps=32", "--samples_per_shard=5000"]
STEPS_DIGITS = (1, 2, 4, 16)


def runtime(run: Path) -> float:
    """Seconds the ``rfkit fit`` of a run folder took (written by ``fit_timed``)."""
    return float((run / "seconds.txt").read_text())


def fit_timed(work: Path, config: str, run: str, args: list[str]) -> None:
    """``rfkit fit`` of one table entry, timed end to end (start-up and validation included, alike for
    all); a run already timed is finished and left alone."""
    if (work / run / "seconds.txt").exists():
        return
    start = time.perf_counter()
    configs = Path(__file__).resolve().parents[1] / "configs"
    rfkit_cmd("fit", f"--config={configs / config}", *args, f"--trainer.default_root_dir={run}", cwd=work)
    (work / run / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def run_digits(seed: int) -> list[dict]:
    work = WORK / "digits" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    pairs_time = work / "data/digits_reflow/seconds.txt"
    for method, (config, run, steps, overrides) in DIGITS.items():
        if method == "2-RF" and not pairs_time.exists():
            start = time.perf_counter()
            reflow = ["reflow", "--ckpt=runs/digits/checkpoints/last.ckpt", "--out=data/digits_reflow"]
            rfkit_cmd(*reflow, "--solver=Heun", f"--seed={seed}", *PAIRS_DIGITS, cwd=work)
            pairs_time.write_text(f"{time.perf_counter() - start:.1f}\n")
        args = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--trainer.max_steps={steps}"]
        fit_timed(work, config, run, [*args, *overrides])
    rows = []
    for method, (_, run, steps, _) in DIGITS.items():
        flow = rfkit.load_checkpoint(work / run / "checkpoints/last.ckpt")
        seconds = runtime(work / run)
        if method == "2-RF":
            teacher = DIGITS["1-RF"]
            seconds += runtime(work / teacher[1]) + float(pairs_time.read_text())
            steps += teacher[2]
        row = {
            "method": method,
            "seed": seed,
            "steps": steps,
            "seconds": seconds,
            "nfe/step": flow.nfe(1, conditional=True),
        }
        rows.append(row | score_digits(flow, STEPS_DIGITS))
        print(rows[-1], flush=True)
    return rows


def report_digits(rows: list[dict]) -> str:
    cols = ["method", "seed", "steps", "seconds", "nfe/step", *(f"FID@{k}" for k in STEPS_DIGITS), "straightness"]
    lines = [
        "# One-step league table (digits)",
        "",
        "`python tools/bench_onestep.py --digits`: each config as shipped, through `rfkit fit`, on a shared",
        "2-core CPU. FID@K: digits FID (rfkit.metrics.digits_fid) of 1,000 samples after K steps or jumps of",
        "the objective's sampler; nfe/step: network evaluations per step (2 with classifier-free guidance at",
        "sampling; MeanFlow and Shortcut fold the guidance into training). 2-RF's steps and seconds include",
        "its teacher's and its 20,000 pairs'.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        cells = [
            f"{row[c]:.0f}" if c == "seconds" else f"{row[c]:.3f}" if isinstance(row[c], float) else row[c]
            for c in cols
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot_digits(rows: list[dict], path: Path) -> None:
    """Digits FID against steps (or jumps) of each method's sampler, one line per method and seed."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in rows:
        label = row["method"] + (f" (seed {row['seed']})" if row["seed"] else "")
        ax.plot(STEPS_DIGITS, [row[f"FID@{k}"] for k in STEPS_DIGITS], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sampler steps (jumps)", ylabel="digits FID (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-D: 1 seed x 400 steps")
    parser.add_argument("--digits", action="store_true", help="the digits table instead of the 2-D one")
    parser.add_argument("--steps", type=int, default=None, help="2-D training steps per run (default: the configs')")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default: 2-D 3, quick 1, digits 1)")
    parser.add_argument("--report", type=Path, help="rewrite the table and plot of a 2-D run's .json; train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 2-D MLP gains nothing from two threads on a shared machine
    if args.report:
        write_2d(args.report)
        return
    if args.digits:
        rows = [row for seed in range(args.seeds or 1) for row in run_digits(seed)]
        text = report_digits(rows)
        (OUT / "bench_onestep_digits.md").write_text(text)
        plot_digits(rows, OUT / "bench_onestep_digits.png")
        print(text)
        return
    steps = args.steps or (400 if args.quick else config_steps("toy2d.yaml"))
    main_2d(steps, args.seeds or (1 if args.quick else 3), args.quick)


if __name__ == "__main__":
    main()
