"""Timestep samplers on real data: Uniform, LogitNormal(0, 1), ModeSampler(1.29), CosMap on the digits.

    python tools/bench_digits.py            # ~25 minutes on 2 CPU cores; writes tools/results/bench_digits.{md,png}
    python tools/bench_digits.py --quick    # smoke run (~2 minutes): 2 seeds, 30 steps, width 32, writes nothing

Does SD3's ordering (Esser et al. 2024, Table 1: logit-normal best, uniform worst) hold for a small
class-conditional DiT on scikit-learn's 8x8 digits? Each (sampler, seed) trains the recipe of
configs/digits.yaml (AdamW 1e-3 with a 200-step warm-up, 10% label dropout, EMA 0.998) through
``RectifiedFlow`` and a Lightning ``Trainer`` for the same number of steps; only the timestep
sampler differs. Before training, the script checks that each module it builds is the one
``rfkit fit --config configs/digits.yaml --model.timesteps=<sampler> --model.model.init_args.width=96``
builds (``benchconfig.check_same_recipe``: model, plugins, optimizer, schedule, label dropout).
The DiT is the config's (depth 4, 4 heads, patch 2) at width 96 instead of 128 (0.72M instead
of 1.27M parameters), to fit 12 runs of 1,000 steps in the budget. Within a seed
every sampler starts from the same weights, sees the same batches and noise (rfkit draws them
from (seed, step)) and is scored on the same 1,000 starting points: a paired comparison.

Score: ``rfkit.metrics.digits_fid`` (Frechet distance in the feature space of a small digits
classifier) of 1,000 samples (100 per class, Euler, no guidance, clamped to [-1, 1]) to all 1,797
real digits (training and held-out), for the last (raw) weights and the EMA weights. Bands are
80% confidence intervals of the mean over seeds (Student t: its 10% and 90% quantiles), for each
sampler and for its paired difference to Uniform.

One torch thread by default: on a shared 2-core machine two OpenMP threads stall whenever another
job holds a core (a 60-step run took 150-300 s instead of 7 s); uncontested, two threads are
~1.5x faster (``--threads 2``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import torch
import yaml
from benchconfig import check_same_recipe
from benchstats import mean_interval
from lightning.pytorch.callbacks import EMAWeightAveraging
from sklearn.datasets import load_digits

from rfkit.data import Digits
from rfkit.metrics import digits_fid
from rfkit.models import DiT
from rfkit.module import RectifiedFlow
from rfkit.timesteps import CosMap, LogitNormal, ModeSampler, TimestepSampler, Uniform

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
SAMPLERS = {"Uniform": Uniform, "LogitNormal(0, 1)": LogitNormal, "ModeSampler(1.29)": ModeSampler, "CosMap": CosMap}
EULER_STEPS = (4, 16)
N_GEN = 1000


def dit_kwargs(width: int | None, depth: int | None) -> dict:
    """The DiT of configs/digits.yaml, optionally narrower or shallower."""
    kwargs = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())["model"]["model"]["init_args"]
    return kwargs | {k: v for k, v in (("width", width), ("depth", depth)) if v is not None}


class RawWeights(pl.Callback):
    """Keeps the trained weights before EMAWeightAveraging (listed after it) copies the average over them."""

    state: dict | None = None

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def build(sampler: TimestepSampler, dit: dict) -> RectifiedFlow:
    """configs/digits.yaml's module with ``sampler`` and the DiT ``dit`` (checked against the config in main)."""
    return RectifiedFlow(
        DiT(**dit),
        timesteps=sampler,
        cond_dropout=0.1,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=200),
    )


def config_overrides(name: str, dit: dict) -> list[str]:
    """What a user types to run ``build(SAMPLERS[name](), dit)`` with ``rfkit fit --config configs/digits.yaml``."""
    sampler = f"--model.timesteps={SAMPLERS[name].__name__}"
    return [sampler, *(f"--model.model.init_args.{k}={v}" for k, v in dit.items())]


def train(sampler: TimestepSampler, seed: int, steps: int, batch: int, dit: dict) -> dict[str, RectifiedFlow]:
    """The digits recipe with ``sampler``: {"EMA": module with the EMA weights, "raw": with the last weights}."""
    pl.seed_everything(seed, verbose=False)
    flow = build(sampler, dit)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[raw := RawWeights(), EMAWeightAveraging(decay=0.998)],
    )  # fmt: skip
    trainer.fit(flow, datamodule=Digits(batch_size=batch, batches_per_epoch=steps, seed=seed))
    last = copy.deepcopy(flow)
    last.load_state_dict(raw.state)
    return {"raw": last.eval(), "EMA": flow.eval()}  # EMAWeightAveraging copied the average into `flow`


def real_digits() -> torch.Tensor:
    """All 1,797 digits as (N, 1, 8, 8) in [-1, 1], scaled as rfkit.data.Digits scales them."""
    return torch.from_numpy(load_digits().images).float().div(8.0).sub(1.0).unsqueeze(1)


def fid_metric(real: torch.Tensor):
    fid = digits_fid()
    fid.reset_real_features = False  # the real statistics are computed once
    fid.update(real, real=True)
    return fid


@torch.no_grad()
def score(flows: dict[str, RectifiedFlow], fid, seed: int) -> dict[tuple[str, int], float]:
    """FID of N_GEN Euler samples (100 per class, fixed noise per seed), by (weights, step count)."""
    x0 = torch.randn(N_GEN, 1, 8, 8, generator=torch.Generator().manual_seed(50_000 + seed))
    cls = torch.arange(N_GEN) % 10
    out = {}
    for weights, flow in flows.items():
        for k in EULER_STEPS:
            fid.reset()
            fid.update(flow.sample(x0, {"cls": cls}, num_steps=k, cfg_scale=1.0).clamp(-1, 1), real=False)
            out[(weights, k)] = float(fid.compute())
    return out


def floor(real: torch.Tensor) -> float:
    """FID between two disjoint random halves of the real digits: the score of perfect samples at this size."""
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    fid = digits_fid()
    fid.update(real[perm[: len(real) // 2]], real=True)
    fid.update(real[perm[len(real) // 2 :]], real=False)
    return float(fid.compute())


def band(values: list[float]) -> tuple[float, float, float]:
    """(mean, 10% and 90% bounds of the mean): an 80% Student-t interval over seeds."""
    return mean_interval(values, level=0.8)


WEIGHTS = ("raw", "EMA")  # raw first: after 1,000 steps an EMA of 0.998 still holds 0.998^1000 = 14% of the start


def table(scores: dict, weights: str) -> list[str]:
    """Per sampler: FID at each step count and its paired difference to Uniform, mean [10%, 90%]."""
    lines = [
        f"| sampler ({weights} weights) | " + " | ".join(f"FID @{k} steps" for k in EULER_STEPS) + " | "
        + " | ".join(f"minus Uniform @{k}" for k in EULER_STEPS) + " |",
        "|---|" + "---|" * (2 * len(EULER_STEPS)),
    ]  # fmt: skip
    for name in SAMPLERS:
        cells = ["{:.2f} [{:.2f}, {:.2f}]".format(*band([s[weights, k] for s in scores[name]])) for k in EULER_STEPS]
        for k in EULER_STEPS:
            diff = [a[weights, k] - b[weights, k] for a, b in zip(scores[name], scores["Uniform"], strict=True)]
            cells.append("-" if name == "Uniform" else "{:+.2f} [{:+.2f}, {:+.2f}]".format(*band(diff)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(scores: dict, seeds: int, steps: int, batch: int, dit: dict, real_floor: float, minutes: float) -> str:
    lines = [
        f"{seeds} seeds x {len(SAMPLERS)} samplers, {steps} steps at batch {batch}, DiT width {dit['width']}, "
        f"depth {dit['depth']}, heads {dit['heads']}, patch {dit['patch_size']}; FID of {N_GEN} samples vs all "
        f"1,797 digits, mean [10%, 90%] over seeds (lower is better); {minutes:.1f} min in all.",
    ]
    for weights in WEIGHTS:
        lines += ["", *table(scores, weights)]
    lines += ["", f"Two disjoint halves of the real digits (898 vs 899) score {real_floor:.2f}.", ""]
    for weights in WEIGHTS:
        for k in EULER_STEPS:
            ranked = sorted(SAMPLERS, key=lambda n: statistics.mean(s[weights, k] for s in scores[n]))
            verdict = "holds" if ranked[0] == "LogitNormal(0, 1)" and ranked[-1] == "Uniform" else "does not hold"
            lines.append(f"- {weights}, {k} steps, best to worst: {' < '.join(ranked)}; SD3's ordering {verdict}.")
    lines += ["", "Per seed, FID " + ", ".join(f"{w} @{k}" for w in WEIGHTS for k in EULER_STEPS) + ":", ""]
    for name in SAMPLERS:
        each = "; ".join("/".join(f"{s[w, k]:.2f}" for w in WEIGHTS for k in EULER_STEPS) for s in scores[name])
        lines.append(f"- {name}: {each}")
    return "\n".join(lines)


def plot(scores: dict, real_floor: float, path: Path) -> None:
    fig, axes = plt.subplots(len(WEIGHTS), len(EULER_STEPS), figsize=(4.5 * len(EULER_STEPS), 3.4 * len(WEIGHTS)))
    for row, weights in zip(axes, WEIGHTS, strict=True):
        for ax, k in zip(row, EULER_STEPS, strict=True):
            for i, name in enumerate(SAMPLERS):
                values = [s[weights, k] for s in scores[name]]
                mean, lo, hi = band(values)
                ax.errorbar([i], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4, color=f"C{i}")
                ax.scatter([i + 0.12] * len(values), values, s=10, color=f"C{i}", alpha=0.5)
            ax.axhline(real_floor, color="grey", lw=0.8, ls=":", label="real vs real")
            ax.set_xticks(range(len(SAMPLERS)), list(SAMPLERS), rotation=15, fontsize=8)
            ax.set(ylabel="digits FID", title=f"{weights} weights, {k} Euler steps")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean and 80% band over seeds (dots: seeds); lower is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=96, help="DiT width (configs/digits.yaml: 128)")
    parser.add_argument("--depth", type=int, help="DiT depth (default: configs/digits.yaml's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 30 steps, width 32")
    parser.add_argument("--out", type=Path, help="folder for the .md and .png (default tools/results; --quick: none)")
    args = parser.parse_args()
    steps, seeds = (30, 2) if args.quick else (args.steps, args.seeds)
    out = args.out if args.out is not None or args.quick else OUT
    torch.set_num_threads(args.threads)
    dit = dit_kwargs(32 if args.quick else args.width, args.depth)
    for name, sampler in SAMPLERS.items():  # what trains here is what the config trains
        check_same_recipe(build(sampler(), dit), "digits.yaml", *config_overrides(name, dit))
    real, started = real_digits(), time.perf_counter()
    fid, scores = fid_metric(real), {name: [] for name in SAMPLERS}
    for seed in range(seeds):
        for name, sampler in SAMPLERS.items():
            tick = time.perf_counter()
            scores[name].append(score(train(sampler(), seed, steps, args.batch, dit), fid, seed))
            fids = ", ".join(f"{w} @{k} {v:.2f}" for (w, k), v in scores[name][-1].items())
            print(f"seed {seed} {name}: FID {fids} ({time.perf_counter() - tick:.0f} s)", flush=True)
    real_floor = floor(real)
    text = report(scores, seeds, steps, args.batch, dit, real_floor, (time.perf_counter() - started) / 60)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_digits.md").write_text(text + "\n")
        plot(scores, real_floor, out / "bench_digits.png")


if __name__ == "__main__":
    main()
