"""Minibatch OT at large global batches: the full exact plan vs exact-within-chunks vs entropic, on the CPU.

    python tools/bench_ot_scale.py      # ~15 minutes on 2 busy CPU cores; writes tools/results/bench_ot_scale.md

What ``MinibatchOT(across_ranks=True)`` solves each step, at global batches of 2048, 4096 and 8192
latents of 4x32x32 (noise N(0, I), data N(1, 0.25 I), as tools/bench_ot.py). Timed in one process,
so the figures are the solve alone: the all-gathers (and the broadcast or all-reduce) that
``across_ranks=True`` adds on several ranks are not in them, and the chunked solves, which several
ranks share out, all run here on one. Each option is timed ``--repeats`` times (median; the options
in rotating order, round by round, so load bursts on the shared machine hit all alike), except the
full exact plan at batches above ``--exact-repeat-max`` and the entropic solver (``--sinkhorn-repeats``),
timed once. Quality: the mean squared pair distance against the full exact plan on the same batch
(``rfkit.couplings.OTGap``): the relative cost gap, and the share of OT's cost reduction over the
independent coupling that the option keeps. Entropic draws come from the plan with replacement, so
some noise rows repeat and others go unused ("noise rows used"); the exact options use every row
once. The entropic solver runs only up to ``--sinkhorn-max`` rows: on this CPU its n^2 log-sum-exp
iterations are the slowest option of all; it is meant for an accelerator.

The step it competes with: one DiT-S/2 training step (AdamW, fp32) timed at a small batch on this
same CPU in the same run and scaled linearly to the global batch, as if one device trained it all.
On N data-parallel ranks the step shrinks about N-fold while a full-plan solve (on rank 0) does not.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_ot import dit_step_seconds  # the same DiT-S/2 step as bench_ot.md's

from rfkit.couplings import MinibatchOT, OTGap, pair_cost

OUT = Path(__file__).parent / "results"
SHAPE = (4, 32, 32)


def timed_in_rounds(options: dict[str, tuple[MinibatchOT, int]], x0, x1) -> dict[str, tuple[float, torch.Tensor]]:
    """name -> (median seconds, paired noise) of ``coupling(x0, x1)`` over its repeats.

    Options run in rounds, the order rotated every round, so a burst of load on the shared machine
    falls on all of them alike rather than on whichever ran then.
    """
    times: dict[str, list[float]] = {name: [] for name in options}
    paired: dict[str, torch.Tensor] = {}
    names = list(options)
    for r in range(max(reps for _, reps in options.values())):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            coupling, reps = options[name]
            if r < reps:
                start = time.perf_counter()
                paired[name], _ = coupling(x0, x1, generator=torch.Generator().manual_seed(0))
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), paired[name]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2048, 4096, 8192], help="global batch sizes")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048], help="chunk sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per option (median)")
    parser.add_argument("--exact-repeat-max", type=int, default=4096, help="above this batch, time the full plan once")
    parser.add_argument("--sinkhorn-max", type=int, default=2048, help="largest batch for the entropic solver")
    parser.add_argument("--sinkhorn-repeats", type=int, default=1, help="timed calls per entropic option")
    parser.add_argument("--regs", type=float, nargs="+", default=[0.05, 0.001], help="entropic regularisations")
    parser.add_argument("--dit-batch", type=int, default=8, help="batch at which the DiT-S/2 step is timed")
    args = parser.parse_args()

    per_sample = dit_step_seconds(args.dit_batch) / args.dit_batch
    print(f"DiT-S/2 step: {per_sample * 1e3:.1f} ms per sample", flush=True)
    header = [
        "global batch",
        "option",
        "solve s",
        "speed-up",
        "cost gap",
        "OT gain kept",
        "noise rows used",
        "share of step",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, n in enumerate(args.batches):
        g = torch.Generator().manual_seed(i)
        x0 = torch.randn(n, *SHAPE, generator=g)
        x1 = torch.randn(n, *SHAPE, generator=g) * 0.5 + 1.0
        full = "exact, full plan" + ("" if n <= args.exact_repeat_max else " (timed once)")
        options = {full: (MinibatchOT(across_ranks=True), args.repeats if n <= args.exact_repeat_max else 1)}
        for c in (c for c in args.chunks if c < n):
            options[f"exact, chunk_size={c}"] = (MinibatchOT(across_ranks=True, chunk_size=c), args.repeats)
        for reg in args.regs if n <= args.sinkhorn_max else []:
            sinkhorn = MinibatchOT("sinkhorn", reg=reg, max_iter=1000, across_ranks=True)
            options[f"sinkhorn, reg={reg}"] = (sinkhorn, args.sinkhorn_repeats)
        results = timed_in_rounds(options, x0, x1)
        t_exact, exact = results[full]
        optimal, independent = pair_cost(exact, x1), pair_cost(x0, x1)
        step = per_sample * n
        for name, (seconds, paired) in results.items():
            gap = OTGap(pair_cost(paired, x1), optimal, independent)
            used = len({tuple(row[:8].tolist()) for row in paired.flatten(1)}) / n  # entropic draws repeat rows
            lines.append(
                f"| {n} | {name} | {seconds:.2f} | {t_exact / seconds:.1f}x | {gap.relative:+.3%} | "
                f"{gap.gain_kept:.1%} | {used:.0%} | {seconds / (seconds + step):.2%} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    note = (
        f"\nCPU figures (2 shared cores), not a GPU result. Cost gap: mean squared pair distance over the full "
        f"exact plan's, minus 1; OT gain kept: (independent - option) / (independent - full exact). Share of step: "
        f"solve / (solve + one DiT-S/2 training step on the whole global batch), the step timed at batch "
        f"{args.dit_batch} on this CPU ({per_sample * 1e3:.1f} ms per sample, AdamW, fp32) and scaled linearly.\n"
    )
    print(note)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_ot_scale.md").write_text(table + "\n" + note)


if __name__ == "__main__":
    main()
