"""2-D quality vs torchcfm, side by side: N(0, I) -> moons and -> 8gaussians, rfkit and torchcfm.

    python tools/bench_toy2d.py            # ~20 minutes on 2 CPU cores; writes tools/results/bench_toy2d.{md,png}
    python tools/bench_toy2d.py --quick    # smoke run (~1 minute): 2 seeds, 150 steps, writes nothing

For each target, coupling (independent, exact minibatch OT) and seed, one network is trained by
each framework in the same run, alternating which goes first (so machine load hits both alike):

- rfkit through the path users take: the module and data module that ``rfkit fit --config
  configs/toy2d.yaml`` builds (MLP(2, 64, 3), Adam 1e-3, batch 256, its 5,000 steps; ``--model.coupling=Independent``
  for the independent coupling, ``--data.init_args.target=...`` for the target), fitted by a bare
  Lightning ``Trainer`` (logger, checkpoints, validation and progress bar off: the same for both).
- torchcfm's own 2-D recipe, as its README and examples write it: x0 ~ N(0, I), x1 ~ target,
  ``t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)`` with ``ConditionalFlowMatcher(0)`` or
  ``ExactOptimalTransportConditionalFlowMatcher(0)``, ``vt = model(cat([xt, t]))``, MSE, Adam(1e-3),
  on torchcfm's ``MLP(dim=2, w=64, time_varying=True)``.

Both nets start from the same weights (same seed, same architecture: checked). Data: rfkit's
``Moons``/``EightGaussians``, which are torchcfm's definitions (torchcfm.utils needs torchdyn).
Evaluation is the same for both: Euler on 2,000 fixed noise points, W2 (exact OT) to 2,000 fresh
data points, straightness and transport cost (``rfkit.diagnostics.flow_stats``, 100 Euler steps).
Time per training step runs from the end of step ``steps // 10`` to the last step (no start-up).

One torch thread by default: the MLP gains nothing from two, and on a shared 2-core machine two
OpenMP threads stall at every parallel op whenever another job holds a core (``torch.cdist`` of
256 x 2 points took 31 ms with 2 threads and 0.07 ms with 1 while another job ran).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import matplotlib.ticker
import torch
from benchconfig import config_steps, from_config, optimizer_recipe, recipe
from benchstats import N_EVAL, eval_draw, mean_interval, w2
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher
from torchcfm.models.models import MLP as CFMMLP

from rfkit.data import EightGaussians, Moons, ToyDistribution
from rfkit.diagnostics import flow_stats
from rfkit.models import MLP
from rfkit.solvers import Euler, time_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).parent / "results"
TARGETS = {"moons": Moons, "8gaussians": EightGaussians}
COUPLINGS = ("independent", "exact OT")
STEPS = (1, 2, 4, 8, 20, 100)  # Euler steps at which W2 is measured
BATCH = 256


def toy2d_config(target: ToyDistribution, coupling: str, steps: int, seed: int) -> tuple:
    """(module, data module) of ``rfkit fit --config configs/toy2d.yaml`` for this target, coupling and seed."""
    overrides = [
        f"--seed_everything={seed}",
        f"--data.init_args.target={type(target).__name__}",
        f"--data.init_args.batches_per_epoch={steps}",
        f"--data.init_args.seed={seed}",
    ]
    if coupling == "independent":  # the config's own coupling is exact minibatch OT
        overrides.append("--model.coupling=Independent")
    return from_config("toy2d.yaml", *overrides)


def torchcfm_matcher(name: str) -> ConditionalFlowMatcher:
    if name == "independent":
        return ConditionalFlowMatcher(sigma=0.0)
    return ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


# ---------------------------------------------------------------------------- training


class StepClock(pl.Callback):
    """Seconds per training step between the end of step ``warmup`` and the end of the last one."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1
        self.end = time.perf_counter()
        if self.steps == self.warmup:
            self.start = self.end

    def per_step(self) -> float:
        return (self.end - self.start) / (self.steps - self.warmup)


def train_rfkit(target: ToyDistribution, coupling: str, steps: int, seed: int) -> tuple:
    """(velocity fn, s/step): configs/toy2d.yaml's module and data fitted by a bare Lightning Trainer."""
    flow, data = toy2d_config(target, coupling, steps, seed)
    clock = StepClock(warmup=steps // 10)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(flow, datamodule=data)
    net = flow.model.eval()
    return (lambda x, t: net(x, t, {})), clock.per_step()


def train_torchcfm(target: ToyDistribution, coupling: str, steps: int, seed: int) -> tuple:
    """(velocity fn, s/step): torchcfm's 2-D training loop, as its README writes it (data from ``target``)."""
    pl.seed_everything(seed, verbose=False)  # torch and numpy (torchcfm's OT draws its pairs with numpy)
    model = CFMMLP(dim=2, w=64, time_varying=True)
    optimizer, FM = adam(model.parameters()), torchcfm_matcher(coupling)
    g, warmup, start = torch.Generator().manual_seed(seed), steps // 10, 0.0
    for k in range(1, steps + 1):
        optimizer.zero_grad()
        x0 = torch.randn(BATCH, 2)
        x1 = target(BATCH, g)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        vt = model(torch.cat([xt, t[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()
        if k == warmup:
            start = time.perf_counter()
    model.eval()
    return (lambda x, t: model(torch.cat([x, t[:, None]], dim=-1))), (time.perf_counter() - start) / (steps - warmup)


def train_rfkit_plain(target: ToyDistribution, coupling: str, steps: int, seed: int) -> tuple:
    """(None, s/step) of rfkit's own step (``RectifiedFlow.training_step``, backward, Adam) without Lightning."""
    flow, data = toy2d_config(target, coupling, steps, seed)
    optimizer, warmup, start = flow.configure_optimizers(), steps // 10, 0.0
    data.setup("fit")
    for k, batch in enumerate(data.train_dataloader()):
        optimizer.zero_grad()
        flow.training_step(batch, k).backward()
        optimizer.step()
        if k + 1 == warmup:
            start = time.perf_counter()
    return None, (time.perf_counter() - start) / (steps - warmup)


TRAIN = {"rfkit": train_rfkit, "torchcfm": train_torchcfm, "rfkit, no Lightning": train_rfkit_plain}


def same_recipe(seed: int) -> str | None:
    """Why the two sides would not train alike, or None: the config's MLP and torchcfm's MLP(2, w=64) start
    from the same weights for the same seed, with the same optimizer and batch size."""
    flow, data = toy2d_config(Moons(), "independent", 10, seed)
    torch.manual_seed(seed)
    theirs = list(CFMMLP(dim=2, w=64, time_varying=True).parameters())
    ours = list(flow.model.parameters())
    if type(flow.model) is not MLP or not (
        len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    ):
        return "configs/toy2d.yaml's model and torchcfm's MLP(2, w=64) do not start from the same weights"
    if recipe(flow)["optimizer"] != optimizer_recipe(adam):
        return f"configs/toy2d.yaml's optimizer {recipe(flow)['optimizer']} is not torchcfm's {optimizer_recipe(adam)}"
    if data.batch_size != BATCH:
        return f"configs/toy2d.yaml's batch size {data.batch_size} is not {BATCH}"
    return None


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(v, target: ToyDistribution, seed: int) -> dict:
    """W2 after each Euler step count, straightness S and transport cost C, on evaluation draw ``seed``."""
    x0, real = eval_draw(target, seed)
    out = {f"w2@{k}": w2(Euler()(v, x0, time_grid(k)), real) for k in STEPS}
    stats = flow_stats(v, x0, num_steps=100)
    return out | {"straightness": stats.straightness, "cost": stats.transport_cost}


def decompose(steps: int, rounds: int) -> str:
    """Where rfkit's time per step goes, on moons: torchcfm's loop, rfkit's step alone, rfkit under Lightning."""
    lines = [
        "| coupling | torchcfm loop | rfkit step, no Lightning | rfkit under Lightning | Lightning's share |",
        "|---|---|---|---|---|",
    ]
    names = list(TRAIN)
    for coupling in COUPLINGS:
        times: dict = {name: [] for name in names}
        for r in range(rounds):  # rotate the order each round
            for name in names[r % 3 :] + names[: r % 3]:
                times[name].append(TRAIN[name](Moons(), coupling, steps, r)[1] * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        plain, light = med["rfkit, no Lightning"], med["rfkit"]
        lines.append(f"| {coupling} | {med['torchcfm']:.2f} | {plain:.2f} | {light:.2f} | {light - plain:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report


def fmt(values: list[float], digits: int = 3) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def order(key: tuple) -> tuple:
    """Table order of a (target, coupling, framework) key."""
    return list(TARGETS).index(key[0]), COUPLINGS.index(key[1]), key[2] != "rfkit"


def report(results: dict, floor: dict, steps: int, seeds: int, minutes: float) -> str:
    lines = [
        f"{steps} training steps at batch {BATCH}, Adam 1e-3, {seeds} seeds (mean ± std over seeds); W2 of "
        f"{N_EVAL} Euler samples to {N_EVAL} fresh data points; S and C from 100 Euler steps; {minutes:.1f} min.",
        "",
        "| target | coupling | trained by | " + " | ".join(f"W2 @{k}" for k in STEPS) + " | straightness S | "
        "transport cost C | ms / step |",
        "|---|---|---|" + "---|" * (len(STEPS) + 3),
    ]
    ratios = ["| target | coupling | ms per step, rfkit / torchcfm: median (per seed) |", "|---|---|---|"]
    for (target, coupling, fw), rows in sorted(results.items(), key=lambda kv: order(kv[0])):
        cells = [fmt([r[f"w2@{k}"] for r in rows]) for k in STEPS]
        cells += [fmt([r["straightness"] for r in rows]), fmt([r["cost"] for r in rows], 2)]
        cells.append(f"{statistics.median(r['ms_per_step'] for r in rows):.2f}")
        lines.append(f"| {target} | {coupling} | {fw} | " + " | ".join(cells) + " |")
        if fw == "torchcfm":
            ours = results[(target, coupling, "rfkit")]
            pair = [a["ms_per_step"] / b["ms_per_step"] for a, b in zip(ours, rows, strict=True)]
            each = ", ".join(f"{r:.2f}" for r in pair)
            ratios.append(f"| {target} | {coupling} | {statistics.median(pair):.2f} ({each}) |")
    floors = ", ".join(f"{t} {v:.3f}" for t, v in floor.items())
    lines += ["", f"W2 between two independent draws of {N_EVAL} data points (the floor): {floors}.", ""]
    lines += [*paired(results), "", *ratios]
    return "\n".join(lines)


def paired(results: dict) -> list[str]:
    """W2 of rfkit minus torchcfm, seed by seed (same start weights, noise and reference points)."""
    lines = [
        "Paired difference W2(rfkit) - W2(torchcfm): mean [90% interval of the mean over seeds]; "
        "negative means rfkit is closer to the data. * where the interval excludes 0.",
        "",
        "| target | coupling | " + " | ".join(f"@{k}" for k in STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for target in TARGETS:
        for coupling in COUPLINGS:
            ours, theirs = results[(target, coupling, "rfkit")], results[(target, coupling, "torchcfm")]
            cells = []
            for k in STEPS:
                diff = [a[f"w2@{k}"] - b[f"w2@{k}"] for a, b in zip(ours, theirs, strict=True)]
                mean, lo, hi = mean_interval(diff, level=0.9)
                cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{'*' if lo > 0 or hi < 0 else ''}")
            lines.append(f"| {target} | {coupling} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, floor: dict, path: Path) -> None:
    """W2 against Euler steps; colour = coupling, solid = rfkit, dashed = torchcfm; bars = std over seeds."""
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(5 * len(TARGETS), 3.8))
    for ax, target in zip(axes, TARGETS, strict=True):
        for key in sorted(results, key=order):
            t, coupling, fw = key
            if t == target:
                ys = [[r[f"w2@{k}"] for r in results[key]] for k in STEPS]
                err = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
                ax.errorbar(STEPS, [statistics.mean(y) for y in ys], yerr=err, ls="-" if fw == "rfkit" else "--",
                            color=f"C{COUPLINGS.index(coupling)}", marker="o" if fw == "rfkit" else "s", ms=3,
                            capsize=2, label=f"{fw}, {coupling}")  # fmt: skip
        ax.axhline(floor[target], color="grey", lw=0.8, ls=":", label="data vs data")
        ax.set(xscale="log", yscale="log", xlabel="Euler steps", ylabel="W2 (log scale)", title=f"N(0, I) -> {target}")
        ax.set_xticks(STEPS, [str(k) for k in STEPS])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks([0.1, 0.2, 0.5, 1, 2, 5])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=config_steps("toy2d.yaml"), help="training steps per run (default: the config's)"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 150 steps")
    parser.add_argument("--out", type=Path, help="folder for the .md and .png (default tools/results; --quick: none)")
    args = parser.parse_args()
    steps, seeds = (150, 2) if args.quick else (args.steps, args.seeds)
    out = args.out if args.out is not None or args.quick else OUT
    torch.set_num_threads(args.threads)
    mismatch = same_recipe(0)
    if mismatch:
        raise SystemExit(mismatch)
    results: dict = {}  # (target, coupling, framework) -> one dict per seed
    started, order = time.perf_counter(), ["rfkit", "torchcfm"]
    for tname, target_cls in TARGETS.items():
        for coupling in COUPLINGS:
            for seed in range(seeds):
                order.reverse()  # alternate which framework goes first
                for fw in order:
                    v, per_step = TRAIN[fw](target_cls(), coupling, steps, seed)
                    row = evaluate(v, target_cls(), seed) | {"ms_per_step": per_step * 1e3}
                    results.setdefault((tname, coupling, fw), []).append(row)
                    print(f"{tname} {coupling} {fw} seed {seed}: {row}", flush=True)
    floor = {t: w2(c()(N_EVAL, torch.Generator().manual_seed(1)), c()(N_EVAL, torch.Generator().manual_seed(2)))
             for t, c in TARGETS.items()}  # fmt: skip
    table = report(results, floor, steps, seeds, (time.perf_counter() - started) / 60)
    table += "\n\nWhere rfkit's time per step goes (moons; ms per step, medians of 3 runs in rotating order):\n\n"
    table += decompose(steps=200 if args.quick else 600, rounds=3)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_toy2d.md").write_text(table + "\n")
        plot(results, floor, out / "bench_toy2d.png")


if __name__ == "__main__":
    main()
