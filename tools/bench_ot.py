"""Exact minibatch OT: rfkit's MinibatchOT vs torchcfm's OTPlanSampler("exact"), side by side.

    python tools/bench_ot.py            # ~2 minutes on 2 CPU cores; writes tools/results/bench_ot.{md,png}

For each batch size and sample shape, both couplings run on the same random batches, alternating
which goes first; times are medians over repeats. Costs are mean squared pair distances: rfkit's
must equal the optimum (checked against scipy's solver), torchcfm's are pairs drawn from the plan
with replacement (so some noise rows repeat and others are dropped: "unique" is the fraction kept).
The DiT-S/2 training step (AdamW, fp32) is timed at a small batch on this CPU and scaled linearly
to the OT batch, to put the OT time in proportion.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchcfm.optimal_transport import OTPlanSampler

from rfkit.couplings import MinibatchOT
from rfkit.models import DiT

OUT = Path(__file__).parent / "results"


def pair_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    return float((x0 - x1).flatten(1).double().pow(2).sum(1).mean())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_case(n: int, shape: tuple[int, ...], repeats: int, seed: int) -> dict:
    ours, theirs = MinibatchOT("exact"), OTPlanSampler(method="exact")
    g = torch.Generator().manual_seed(seed)
    t_ours, t_theirs, c_ours, c_theirs, c_opt, unique = [], [], [], [], [], []
    for r in range(repeats):
        x0 = torch.randn(n, *shape, generator=g)
        x1 = torch.randn(n, *shape, generator=g) * 0.5 + 1.0  # data away from the noise, as real data are
        runs = [("ours", lambda a=x0, b=x1: ours(a, b)), ("theirs", lambda a=x0, b=x1: theirs.sample_plan(a, b))]
        for name, fn in runs if r % 2 == 0 else runs[::-1]:
            dt, out = timed(fn)
            if name == "ours":
                t_ours.append(dt)
                c_ours.append(pair_cost(out[0], x1))
            else:
                t_theirs.append(dt)
                c_theirs.append(pair_cost(out[0], out[1]))
                unique.append(len({tuple(row.flatten()[:8].tolist()) for row in out[0]}) / n)
        if r < 2:  # the optimum, from an independent solver
            m = torch.cdist(x1.flatten(1).double(), x0.flatten(1).double()).pow(2).numpy()
            rows, cols = linear_sum_assignment(m)
            c_opt.append(float(m[rows, cols].mean()))
    return {
        "n": n,
        "shape": "x".join(map(str, shape)),
        "ours_ms": statistics.median(t_ours) * 1e3,
        "torchcfm_ms": statistics.median(t_theirs) * 1e3,
        "speedup": statistics.median(t_theirs) / statistics.median(t_ours),
        "ours_cost": statistics.mean(c_ours),
        "ours_optimal": all(abs(a - b) <= 1e-6 * b for a, b in zip(c_ours[:2], c_opt, strict=True)),
        "torchcfm_cost": statistics.mean(c_theirs),
        "torchcfm_unique": statistics.mean(unique),
    }


def dit_step_seconds(batch: int, repeats: int = 3) -> float:
    """Seconds of one DiT-S/2 training step (4x32x32 latents) at ``batch`` on this machine."""
    torch.manual_seed(0)
    model = DiT(in_channels=4, input_size=32, patch_size=2, width=384, depth=12, heads=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 4, 32, 32), torch.rand(batch)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = (model(x, t, {}) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="batches per case (alternating order)")
    parser.add_argument("--dit-batch", type=int, default=8, help="batch at which the DiT-S step is timed")
    args = parser.parse_args()
    cases = [(256, (2,)), (1024, (2,)), (256, (4, 32, 32)), (1024, (4, 32, 32))]
    rows = [bench_case(n, shape, args.repeats, seed=i) for i, (n, shape) in enumerate(cases)]
    per_sample = dit_step_seconds(args.dit_batch) / args.dit_batch
    header = ["batch", "sample", "rfkit ms", "torchcfm ms", "speed-up", "rfkit cost (optimal?)", "torchcfm cost"]
    header += ["torchcfm unique noise", "OT / DiT-S step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        frac = r["ours_ms"] / 1e3 / (per_sample * r["n"]) if r["shape"] != "2" else float("nan")
        lines.append(
            f"| {r['n']} | {r['shape']} | {r['ours_ms']:.1f} | {r['torchcfm_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r['ours_cost']:.4f} ({'yes' if r['ours_optimal'] else 'NO'}) | {r['torchcfm_cost']:.4f} | "
            f"{r['torchcfm_unique']:.0%} | {'-' if frac != frac else f'{frac:.2%}'} |"
        )
    table = "\n".join(lines)
    note = (
        f"\nDiT-S/2 step (4x32x32, AdamW, fp32) timed at batch {args.dit_batch}: "
        f"{per_sample * 1e3:.1f} ms per sample on this CPU, scaled linearly to each batch.\n"
    )
    print(table + note)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_ot.md").write_text(table + "\n" + note)
    plot(rows, OUT / "bench_ot.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n']}\n{r['shape']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [r["ours_ms"] for r in rows], 0.4, label="rfkit MinibatchOT (exact)")
    ax.bar(x + 0.2, [r["torchcfm_ms"] for r in rows], 0.4, label="torchcfm OTPlanSampler (exact)")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per batch (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
