"""The one-step league table on the 2-D toys: W2 at 1, 2 and 4 network evaluations, and the many-step floor.

    python tools/bench_onestep.py            # 3 seeds x 5,000 steps -> results/bench_onestep.md (not yet run)
    python tools/bench_onestep.py --quick    # 1 seed x 400 steps (minutes); writes bench_onestep_quick.md

Each method is the config a user would run, fitted by a bare Lightning ``Trainer`` (logger,
checkpoints and validation off) for the same number of steps with the same batch (256), network
size (MLP 2-64x3-2) and optimiser (Adam 1e-3):

- 1-RF: ``configs/toy2d.yaml --model.coupling=Independent`` (flow matching, independent pairs).
- OT: ``configs/toy2d.yaml`` (flow matching, exact minibatch OT).
- MeanFlow: ``configs/toy2d_meanflow.yaml`` (one JVP per step: about twice a step's compute).
- Shortcut: ``configs/toy2d_shortcut.yaml`` (a no-grad target pass on a quarter of the rows).

Samples come from each objective's own sampler (``RectifiedFlow.sample``): K Euler steps of the
velocity for flow matching, K jumps for MeanFlow and Shortcut, K network evaluations either way;
the floor is K = 100. W2 is exact OT between 2,000 samples from fixed noise and 2,000 fresh data
points. Paired by seed, the table gives each method's W2 at 1 NFE minus OT's, with a 95 % Student-t
interval over seeds (one seed: no interval). Not here yet: 2-RF (reflow on the 1-RF teacher) and
the digits; see the note at the end of the written table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from benchconfig import from_config
from benchstats import mean_interval

from rfkit.metrics import Wasserstein2

OUT = Path(__file__).parent / "results"
TARGETS = ("Moons", "EightGaussians")
METHODS = {
    "1-RF": ("toy2d.yaml", ["--model.coupling=Independent"]),
    "OT": ("toy2d.yaml", []),
    "MeanFlow": ("toy2d_meanflow.yaml", []),
    "Shortcut": ("toy2d_shortcut.yaml", []),
}
NFE = (1, 2, 4, 100)
N_EVAL = 2000


def train(method: str, target: str, steps: int, seed: int) -> tuple:
    """(module, seconds per step) of ``method`` fitted on ``target``."""
    config, extra = METHODS[method]
    overrides = [f"--seed_everything={seed}", f"--data.init_args.target={target}", f"--data.init_args.seed={seed}"]
    flow, data = from_config(config, *overrides, f"--data.init_args.batches_per_epoch={steps}", *extra)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(flow, datamodule=data)
    return flow.eval(), (time.perf_counter() - start) / steps


@torch.no_grad()
def evaluate(flow, target: str, seed: int) -> dict[int, float]:
    """W2 after K network evaluations of the objective's sampler, for K in NFE."""
    from rfkit.data import toy2d

    x0 = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(10_000 + seed))
    real = getattr(toy2d, target)()(N_EVAL, torch.Generator().manual_seed(20_000 + seed))
    out = {}
    for k in NFE:
        assert flow.nfe(k) == k
        metric = Wasserstein2()
        metric.update(flow.sample(x0, {}, num_steps=k), real=False)
        metric.update(real, real=True)
        out[k] = float(metric.compute())
    return out


def report(results: dict, seconds: dict, steps: int, seeds: int, minutes: float) -> str:
    lines = [
        "# One-step league table (2-D toys)",
        "",
        f"`python tools/bench_onestep.py{' --quick' if steps < 5000 else ''}`: {seeds} seed(s) x {steps} steps, "
        f"batch 256, MLP 2-64x3-2, Adam 1e-3; {minutes:.1f} minutes on a shared 2-core CPU. W2 (lower is "
        "better) at K network evaluations of each objective's own sampler; 100 is the floor.",
        "",
        "| target | method | s/step | " + " | ".join(f"W2 @ {k}" for k in NFE) + " | 1-NFE minus OT (95 % CI) |",
        "|---|---|---|" + "---|" * len(NFE) + "---|",
    ]
    for target in TARGETS:
        for method in METHODS:
            runs = results[target, method]
            cells = [f"{mean_interval([r[k] for r in runs], 0.95)[0]:.3f}" for k in NFE]
            diff = [r[1] - o[1] for r, o in zip(runs, results[target, "OT"], strict=True)]
            mean, lo, hi = mean_interval(diff, 0.95)
            paired = "-" if method == "OT" else (f"{mean:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if seeds > 1 else ""))
            lines.append(
                f"| {target} | {method} | {seconds[target, method]:.4f} | " + " | ".join(cells) + f" | {paired} |"
            )
    lines += [
        "",
        "Equal steps are not equal compute: a MeanFlow step carries a forward-mode JVP (about 2x), a shortcut",
        "step a no-grad target pass on a quarter of the rows; s/step says what each cost here. Not measured yet:",
        "2-RF (teacher + pairs + student, to be charged its whole budget) and the digits FID; the issue's",
        "targets (MeanFlow's 1-NFE W2 <= OT's, within 1.5x of its own floor) are read off this table.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed x 400 steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 5000, quick 400)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, quick 1)")
    args = parser.parse_args()
    steps = args.steps or (400 if args.quick else 5000)
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(1)  # a 2-D MLP gains nothing from two threads on a shared machine
    start = time.perf_counter()
    results: dict = {}
    seconds: dict = {}
    for target in TARGETS:
        for method in METHODS:
            runs, times = [], []
            for seed in range(seeds):
                flow, per_step = train(method, target, steps, seed)
                runs.append(evaluate(flow, target, seed))
                times.append(per_step)
                print(target, method, seed, runs[-1], f"{per_step:.4f} s/step", flush=True)
            results[target, method], seconds[target, method] = runs, sum(times) / len(times)
    text = report(results, seconds, steps, seeds, (time.perf_counter() - start) / 60)
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_onestep{'_quick' if args.quick else ''}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
