"""The seed's claim, measured: OT couplings and reflow straighten flows, so few Euler steps suffice.

    python tools/demo_reflow.py            # ~40 minutes on 2 CPU cores; tools/results/demo_reflow.{md,png}
    python tools/demo_reflow.py --quick    # a smoke run of the whole pipeline (~2 minutes)
    python tools/demo_reflow.py --parts 2d # rerun one part; the other's table is kept from the last run

A rerun into the same folder resumes each `rfkit fit` from its last checkpoint (as any `rfkit fit`
does), so an interrupted demo picks up where it stopped.

Everything runs through the `rfkit` command a user types, in tools/results/demo_reflow/:

- 2-D, N(0, I) -> moons and -> 8gaussians: 1-RF (independent coupling), minibatch OT (exact), and
  2-RF (`rfkit reflow` on the 1-RF model, then configs/toy2d_reflow.yaml, initialised from it):
  the commands of the configs' comments, in one folder per target.
  W2 (exact, 2,000 samples vs 2,000 fresh data points) after 1, 2, 4, 8 and 100 Euler steps;
  straightness and transport cost of the flow from 2,000 noise draws (100 Euler steps); each the
  mean over the 5 evaluation draws of tools/benchstats.py, which tools/bench_toy2d.py also uses.
- Digits: configs/digits.yaml (1-RF, the teacher) and configs/digits_reflow.yaml (2-RF on 20,000
  teacher pairs); the FID-like score (rfkit.metrics.digits_fid) of 1,000 samples (100 per class)
  against the 1,797 real digits, after 1, 4 and 16 Euler steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from benchstats import EVAL_DRAWS, eval_draw, w2

import rfkit
from rfkit.data import Digits, EightGaussians, Moons
from rfkit.diagnostics import flow_stats
from rfkit.metrics import digits_fid
from rfkit.sampling import guided_velocity
from rfkit.solvers import Euler

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
RFKIT = str(Path(sys.executable).with_name("rfkit"))
STEPS_2D, STEPS_DIGITS = (1, 2, 4, 8, 100), (1, 4, 16)


def rfkit_cmd(*args: str, cwd: Path) -> None:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    done = subprocess.run([RFKIT, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"rfkit {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def toy(work: Path, target: str, steps: int, pairs: int) -> list[dict]:
    """The README's three commands in ``work``, for 1-RF, OT and 2-RF on one target; one row each."""
    work.mkdir(parents=True, exist_ok=True)
    every = [f"--trainer.max_steps={steps}", "--trainer.val_check_interval=1000000"]
    config, reflow_config = str(ROOT / "configs/toy2d.yaml"), str(ROOT / "configs/toy2d_reflow.yaml")
    data = f"--data.init_args.target={target}"
    rfkit_cmd("fit", f"--config={config}", "--model.coupling=Independent", "--trainer.default_root_dir=runs/toy2d_1rf",
              data, *every, cwd=work)  # fmt: skip
    rfkit_cmd("fit", f"--config={config}", data, *every, cwd=work)  # minibatch OT, into runs/toy2d
    reflow = ["reflow", "--ckpt=runs/toy2d_1rf/checkpoints/last.ckpt", "--out=data/toy2d_reflow", "--num_steps=100"]
    rfkit_cmd(*reflow, f"--num_pairs={pairs}", "--num_val_pairs=2000", "--samples_per_shard=10000", cwd=work)
    rfkit_cmd("fit", f"--config={reflow_config}", *every, cwd=work)
    distribution = Moons() if target == "Moons" else EightGaussians()
    runs = {"1-RF (independent)": "runs/toy2d_1rf", "minibatch OT": "runs/toy2d", "2-RF (reflow)": "runs/toy2d_2rf"}
    rows = []
    for method, run in runs.items():
        flow = rfkit.load_checkpoint(work / run / "checkpoints/last.ckpt")
        rows.append({"data": work.name, "method": method} | score_2d(flow, distribution))
    return rows


def score_2d(flow, target) -> dict:
    """W2 after each Euler step count in STEPS_2D, straightness and transport cost (100 Euler steps),
    each the mean over benchstats' EVAL_DRAWS evaluation draws (one draw alone is too noisy to rank by)."""
    scores = []
    for draw in range(EVAL_DRAWS):
        x0, data = eval_draw(target, draw)
        row = {f"W2@{k}": w2(flow.sample(x0, {}, num_steps=k, solver=Euler()), data) for k in STEPS_2D}
        stats = flow_stats(guided_velocity(flow.model, {}), x0, 100)
        scores.append(row | {"straightness": stats.straightness, "transport cost": stats.transport_cost})
    return {key: statistics.mean(score[key] for score in scores) for key in scores[0]}


def digits(work: Path, steps: int, pairs: int) -> list[dict]:
    work = work / "digits"
    work.mkdir(parents=True, exist_ok=True)
    rfkit_cmd("fit", f"--config={ROOT / 'configs/digits.yaml'}", f"--trainer.max_steps={steps}", cwd=work)
    reflow = ["reflow", "--ckpt=runs/digits/checkpoints/last.ckpt", "--out=data/digits_reflow", "--solver=Heun"]
    rfkit_cmd(
        *reflow, f"--num_pairs={pairs}", "--num_val_pairs=500", "--num_steps=32", "--samples_per_shard=5000", cwd=work
    )
    rfkit_cmd("fit", f"--config={ROOT / 'configs/digits_reflow.yaml'}", f"--trainer.max_steps={steps}", cwd=work)
    rows = []
    for method, run in (("1-RF (teacher)", "runs/digits"), ("2-RF (reflow)", "runs/digits_2rf")):
        flow = rfkit.load_checkpoint(work / run / "checkpoints/last.ckpt")
        rows.append({"data": "digits", "method": method} | score_digits(flow))
    return rows


def score_digits(flow, steps=STEPS_DIGITS) -> dict:
    """The digits score (rfkit.metrics.digits_fid, 1,000 samples: 100 per class, fixed noise, against
    all 1,797 digits) after each number of network evaluations in ``steps``, of the objective's own
    sampler (Euler steps for flow matching), and the straightness of the guided velocity field."""
    real = Digits(val_fraction=0.1)
    real.setup()
    images = torch.cat([real.train_set["latent"], real.val_set["latent"]])
    labels = torch.arange(1000) % 10
    x0 = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    row = {"cfg": flow.cfg_scale}
    for k in steps:
        fid = digits_fid()
        fid.update(images, real=True)
        fid.update(flow.sample(x0, {"cls": labels}, num_steps=k, solver=Euler()), real=False)
        row[f"FID@{k}"] = float(fid.compute())
    row["straightness"] = flow_stats(guided_velocity(flow.model, {"cls": labels}, flow.cfg_scale), x0, 100).straightness
    return row


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["data"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
    for ax, name in zip(axes if len(names) > 1 else [axes], names, strict=True):
        for r in (r for r in rows if r["data"] == name):
            ax.plot(STEPS_2D, [r[f"W2@{k}"] for k in STEPS_2D], marker="o", label=r["method"])
        ax.set(xscale="log", xlabel="Euler steps", ylabel="W2 to data", title=f"N(0, I) -> {name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the pipeline, not the claim")
    parser.add_argument(
        "--parts", nargs="+", choices=["2d", "digits"], default=["2d", "digits"],
        help="what to run; a part left out keeps its table from the last demo_reflow.md, marked as such",
    )  # fmt: skip
    args = parser.parse_args()
    work = OUT / "demo_reflow"
    work.mkdir(parents=True, exist_ok=True)
    toy_steps, toy_pairs, digit_steps, digit_pairs = (
        (200, 2000, 50, 500) if args.quick else (5000, 50_000, 2000, 20_000)
    )
    previous = kept_sections(OUT / "demo_reflow.md")
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    stamp = f" (run at {revision.strip()})" if revision.strip() else ""
    sections = []
    if "2d" in args.parts:
        rows = toy(work / "moons", "Moons", toy_steps, toy_pairs) + toy(
            work / "8gaussians", "EightGaussians", toy_steps, toy_pairs
        )
        plot(rows, OUT / "demo_reflow.png")
        heading = f"2-D: {toy_steps} training steps each, batch 256; 2-RF on {toy_pairs} pairs (100 Euler steps each)"
        sections.append(f"{heading}{stamp}.\n\n{table(rows)}")
    else:
        sections.append(previous[0] + "\n\n(kept from an earlier run: not rerun this time)")
    if "digits" in args.parts:
        digit_rows = digits(work, digit_steps, digit_pairs)
        heading = f"Digits: {digit_steps} training steps each; 2-RF on {digit_pairs} pairs (Heun, 32 steps, CFG 2)"
        sections.append(f"{heading}{stamp}.\n\n{table(digit_rows)}")
    else:
        sections.append(previous[1] + "\n\n(kept from an earlier run: not rerun this time)")
    text = "\n\n".join(sections) + "\n"
    print(text)
    (OUT / "demo_reflow.md").write_text(text)


def kept_sections(path: Path) -> list[str]:
    """The 2-D and digits sections of an earlier demo_reflow.md (heading and table each), without
    earlier "kept" notes."""
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run every part once (no --parts)")
    text = path.read_text().replace("\n\n(kept from an earlier run: not rerun this time)", "")
    start = text.index("Digits:")
    return [text[:start].strip(), text[start:].strip()]


if __name__ == "__main__":
    main()
