"""Framework overhead: `rfkit fit` vs a hand-written PyTorch loop, same model, batches, optimizer and math.

    python tools/bench_overhead.py        # ~3 minutes on 2 CPU cores; writes tools/results/bench_overhead.md

Two workloads: the 2-D MLP of configs/toy2d.yaml (batch 256) and the small DiT of configs/digits.yaml
(batch 128). rfkit runs through its real CLI entry point in-process (W&B offline logger, progress
bar redrawn every 10 steps as in the configs, metrics every 50 steps; no validation, EMA or
checkpoints, which the loop does not do either); the
loop is what a user writes by hand: fetch batch, draw noise and t, interpolate, MSE, step. Runs
alternate (rfkit, loop, rfkit, loop, ...) so machine load hits both alike; steps/s is measured
between the first and last timed step, excluding start-up and the first `warmup` steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from benchconfig import from_config, optimizer_recipe

from rfkit.cli import main as rfkit_main
from rfkit.data import Digits, Toy2D
from rfkit.models import MLP, DiT
from rfkit.paths import straight_path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"

WORKLOADS = {
    "MLP 2-D (batch 256)": {
        "config": "toy2d.yaml",
        "overrides": ["--model.coupling=Independent", "--data.init_args.batches_per_epoch=100000"],
        "model": lambda: MLP(dim=2, width=64, depth=3),
        "data": lambda: Toy2D(batch_size=256, batches_per_epoch=100000),
        "optimizer": lambda p: torch.optim.Adam(p, lr=1e-3),
        "cond": False,
    },
    "DiT digits (batch 128)": {
        "config": "digits.yaml",
        "overrides": ["--model.cond_dropout=0.0", "--model.timesteps=Uniform", "--model.lr_scheduler=null"],
        "model": lambda: DiT(in_channels=1, input_size=8, patch_size=2, width=128, depth=4, heads=4, num_classes=10),
        "data": lambda: Digits(batch_size=128, batches_per_epoch=100000),
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
        "cond": True,
    },
}


class StepClock(pl.Callback):
    """Wall time between the end of step `warmup` and the end of the last step; the CLI builds it."""

    last: StepClock | None = None

    def __init__(self, warmup: int = 10) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0
        StepClock.last = self

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def run_rfkit(spec: dict, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        rfkit_main(
            [
                "fit",
                f"--config={ROOT / 'configs' / spec['config']}",
                f"--trainer.default_root_dir={run_dir}",
                f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0",
                "--trainer.callbacks=[]",
                "--trainer.callbacks+=TQDMProgressBar",
                "--trainer.callbacks.refresh_rate=10",
                "--trainer.callbacks+=__main__.StepClock",
                f"--trainer.callbacks.warmup={warmup}",
                "--trainer.enable_checkpointing=false",
                "--trainer.log_every_n_steps=50",
                *spec["overrides"],
            ]
        )
    clock = StepClock.last
    return (clock.steps - clock.warmup) / (clock.end - clock.start)


def run_loop(spec: dict, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = spec["model"]()
    opt = spec["optimizer"](model.parameters())
    data = spec["data"]()
    data.setup("fit")
    start = None
    for done, batch in enumerate(data.train_dataloader(), start=1):
        x1 = batch["latent"]
        cond = {"cls": batch["cls"]} if spec["cond"] else {}
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0])
        path = straight_path(x0, x1, t)
        loss = (model(path.x_t, t, cond) - path.u).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if done == warmup:
            start = time.perf_counter()
        if done == steps:
            break
    return (steps - warmup) / (time.perf_counter() - start)


def check_same_recipe(spec: dict) -> None:
    """The hand loop trains the config's model with the config's optimizer, or the comparison means nothing."""
    module, _ = from_config(spec["config"], *spec["overrides"])
    torch.manual_seed(0)
    mine = spec["model"]()
    same_model = type(mine) is type(module.model) and [p.shape for p in mine.parameters()] == [
        p.shape for p in module.model.parameters()
    ]
    if not same_model or optimizer_recipe(spec["optimizer"]) != optimizer_recipe(module.optimizer_factory):
        raise SystemExit(f"the hand loop's model or optimizer is not what configs/{spec['config']} builds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rfkit/loop rounds per workload")
    parser.add_argument("--steps", type=int, default=600, help="steps per run (MLP); the DiT runs a quarter")
    args = parser.parse_args()
    lines = ["| workload | rfkit steps/s | hand loop steps/s | ratio (rfkit / loop) |", "|---|---|---|---|"]
    for name, spec in WORKLOADS.items():
        check_same_recipe(spec)
        steps = args.steps if "MLP" in name else args.steps // 4
        warmup = steps // 10
        ours, loop = [], []
        for _ in range(args.rounds):
            ours.append(run_rfkit(spec, steps, warmup))
            loop.append(run_loop(spec, steps, warmup))
        ratios = [a / b for a, b in zip(ours, loop, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(ours):.1f} | {statistics.median(loop):.1f} | "
            f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}) |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_overhead.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
