"""Training throughput on GPUs: rfkit vs a plain PyTorch loop, DiT-S/2 to XL/2 and an MMDiT, with MFU.

    torchrun --nproc_per_node=gpu tools/bench_gpu.py     # every visible GPU; writes tools/results/bench_gpu.md
    python tools/bench_gpu.py --tiny                     # CPU, tiny models, a minute; tools/results/bench_gpu_tiny.md

For each model and configuration, the same model is trained twice on the same in-memory batches:
by rfkit (``RectifiedFlow`` under a Lightning ``Trainer``: rfkit's per-row draws, loss meter and
hooks included) and by a plain PyTorch loop (draw noise and t, interpolate, MSE, AdamW step), both
in bf16-mixed precision (autocast, fp32 weights), with the same per-block transforms
(``rfkit.parallel.parallelize``: activation checkpointing, ``torch.compile``, FSDP2 ``fully_shard``)
and the same data parallelism (DDP or FSDP2 over every rank ``torchrun`` starts; one rank without
it). Both start from the same weights; the run refuses to compare models that differ.

Measured between the end of step ``--warmup`` and the end of the last step (device synchronised at
both): images/s and image tokens/s over all ranks; model TFLOP/s per GPU and MFU, the model FLOPs
of a step divided by the device's dense bf16 peak (``PEAK_BF16_TFLOPS``, from NVIDIA's datasheets;
``--peak-tflops`` overrides); peak memory allocated on rank 0 (``torch.cuda.max_memory_allocated``).

Model FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one
forward and backward of the model at the per-GPU batch, on the meta device (no memory, no time),
once per model. It counts matrix multiplies and attention (``2 m n k`` per matmul), not
element-wise work, and the model as written, so the recomputation activation checkpointing adds is
not counted (MFU's usual definition). For DiT-XL/2 it is 712 GFLOP per image per training step:
6 x (per-token weights 446 M) x 256 tokens + attention; the adaLN weights act once per image, not
per token, so 6 x all parameters x tokens would overstate it by 45 %.

``--tiny`` shrinks every model (4x8x8 latents, width 32-64, depth 1-2), runs a few steps on the CPU
with gloo and skips the ``torch.compile`` rows (inductor builds C++ kernels for minutes on a CPU);
its numbers say the script works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from rfkit.data.batches import BatchLoader, TensorBatches
from rfkit.models import DiT, MMDiT
from rfkit.module import COND_KEYS, RectifiedFlow
from rfkit.parallel import parallelize
from rfkit.strategies import FSDP2

OUT = Path(__file__).parent / "results"

# Dense (no sparsity) bf16 tensor-core peak of one GPU, TFLOP/s; the first name contained in
# torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_BF16_TFLOPS: dict[str, tuple[float, str]] = {
    "H100 PCIe": (756.0, "NVIDIA H100 datasheet, PCIe: 1,513 with sparsity"),
    "H100 NVL": (835.0, "NVIDIA H100 datasheet, NVL: 1,671 with sparsity"),
    "H100": (989.0, "NVIDIA H100 datasheet, SXM5: 1,979 with sparsity"),
    "H200 NVL": (835.0, "NVIDIA H200 datasheet, NVL: 1,671 with sparsity"),
    "H200": (989.0, "NVIDIA H200 datasheet, SXM: 1,979 with sparsity (the H100 SXM's compute)"),
    "A100": (312.0, "NVIDIA A100 datasheet: 624 with sparsity"),
    "L40S": (362.0, "NVIDIA L40S datasheet: 733 with sparsity"),
}

OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0)
"""One optimizer for both sides (a partial, so rfkit and the loop build the very same one)."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A model to benchmark: its builder, per-GPU batch, latent shape and conditioning."""

    name: str
    build: Callable[[], nn.Module]
    batch: int
    latent: tuple[int, int, int]
    text: tuple[int, int] | None = None  # MMDiT: (tokens L, width) of the text embeddings
    classes: int = 0  # DiT: class-conditional on this many labels

    def data(self, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """``rows`` random samples in rfkit's batch layout (``latent`` and the conditioning keys)."""
        g = torch.Generator().manual_seed(seed)
        out = {"latent": torch.randn(rows, *self.latent, generator=g)}
        if self.classes:
            out["cls"] = torch.randint(0, self.classes, (rows,), generator=g)
        if self.text:
            out["text"] = torch.randn(rows, *self.text, generator=g)
            out["pooled"] = torch.randn(rows, self.text[1], generator=g)
        return out


def dit(width: int, depth: int, heads: int, side: int = 32, classes: int = 1000) -> Callable[[], nn.Module]:
    return lambda: DiT(4, side, 2, width, depth, heads, num_classes=classes)


def mmdit(width: int, depth: int, heads: int, text: int, side: int = 32) -> Callable[[], nn.Module]:
    return lambda: MMDiT(4, side, 2, text_dim=text, pooled_dim=text, width=width, depth=depth, heads=heads)


# DiT presets (Peebles & Xie 2023, Table 1) on 4x32x32 latents (256x256 images through the SD VAE),
# ImageNet's 1000 classes. The MMDiT is sized like DiT-XL/2: width 1152 and 14 joint blocks, each
# two streams, so 28 streams as XL has 28 blocks (about XL's parameters), reading 77 text tokens of
# 768 (CLIP-L's shape). Per-GPU batches fit an 80 GB GPU without activation checkpointing (AdamW
# states in fp32: 16 bytes per parameter, 11 GB for XL) with room to spare; --batch changes them.
MODELS = [
    Spec("DiT-S/2", dit(384, 12, 6), 256, (4, 32, 32), classes=1000),
    Spec("DiT-B/2", dit(768, 12, 12), 256, (4, 32, 32), classes=1000),
    Spec("DiT-L/2", dit(1024, 24, 16), 128, (4, 32, 32), classes=1000),
    Spec("DiT-XL/2", dit(1152, 28, 16), 64, (4, 32, 32), classes=1000),
    Spec("MMDiT-XL/2", mmdit(1152, 14, 16, 768), 64, (4, 32, 32), text=(77, 768)),
]
TINY = [
    Spec("DiT-S/2 tiny", dit(32, 2, 2, side=8, classes=10), 4, (4, 8, 8), classes=10),
    Spec("DiT-B/2 tiny", dit(48, 2, 2, side=8, classes=10), 4, (4, 8, 8), classes=10),
    Spec("DiT-L/2 tiny", dit(64, 2, 4, side=8, classes=10), 4, (4, 8, 8), classes=10),
    Spec("DiT-XL/2 tiny", dit(64, 3, 4, side=8, classes=10), 4, (4, 8, 8), classes=10),
    Spec("MMDiT-XL/2 tiny", mmdit(32, 1, 2, 16, side=8), 4, (4, 8, 8), text=(4, 16)),
]


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    strategy: str  # "ddp" or "fsdp2"
    compile: bool = False
    checkpointing: bool = False


CONFIGS = [
    Config("DDP", "ddp"),
    Config("DDP + compile", "ddp", compile=True),
    Config("DDP + act. ckpt", "ddp", checkpointing=True),
    Config("FSDP2", "fsdp2"),
    Config("FSDP2 + compile", "fsdp2", compile=True),
]


def step_flops(spec: Spec, batch: int) -> int:
    """Model FLOPs of one training step (forward + backward) at ``batch``, counted on the meta device."""
    data = {k: v.to("meta") for k, v in spec.data(batch).items()}
    cond = {k: data[k] for k in COND_KEYS if k in data}
    with torch.device("meta"):
        model = spec.build()
        with FlopCounterMode(display=False) as counter:
            model(data["latent"], torch.rand(batch), cond).float().pow(2).mean().backward()
    return counter.get_total_flops()


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s of one device or None, where the figure comes from)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, (value, source) in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, source
    return None, f"{name} is not in PEAK_BF16_TFLOPS; pass --peak-tflops"


def checksum(model: nn.Module) -> float:
    """Sum of every parameter in float64, full tensors under FSDP2 (a collective: every rank calls it)."""
    total = 0.0
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(full.detach().double().sum())
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time from the end of step ``warmup`` to the end of step ``steps``; first and last loss."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.start = self.end = 0.0
        self.losses: list[float] = []

    def tick(self, step: int, loss: torch.Tensor) -> None:
        if step in (1, self.steps):  # .item() syncs: only at the first and the last step
            self.losses.append(float(loss.detach()))
        if step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
        if step == self.steps:
            sync(self.device)
            self.end = time.perf_counter()

    def steps_per_second(self) -> float:
        return (self.steps - self.warmup) / (self.end - self.start)


class ClockCallback(pl.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick(trainer.global_step, outputs["loss"])


def train_rfkit(model, cfg: Config, loader, clock: Clock, device: torch.device) -> nn.Module:
    """Train with rfkit's RectifiedFlow under Lightning; returns the trained velocity model."""
    module = RectifiedFlow(model, optimizer=OPTIMIZER, activation_checkpointing=cfg.checkpointing, compile=cfg.compile)
    strategy = DDPStrategy() if cfg.strategy == "ddp" else FSDP2()
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        num_nodes=int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=clock.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        callbacks=[ClockCallback(clock)],
    )
    trainer.fit(module, train_dataloaders=loader)
    return module.model


def train_plain(model, cfg: Config, loader, clock: Clock, device: torch.device) -> nn.Module:
    """What a user writes by hand: the same transforms, DDP or FSDP2, autocast, MSE to x1 - x0, AdamW."""
    model = model.to(device)
    mesh = None
    if cfg.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    parallelize(model, mesh, cfg.checkpointing, cfg.compile)
    wrapped = model
    if cfg.strategy == "ddp":
        ids = [device] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = OPTIMIZER(model.parameters())
    for step, batch in enumerate(loader, start=1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        x1 = batch["latent"]
        cond = {k: batch[k] for k in COND_KEYS if k in batch}
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=device)
        te = t.view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = wrapped((1 - te) * x0 + te * x1, t, cond)
        loss = (v.float() - (x1 - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.tick(step, loss)
        if step == clock.steps:
            break
    return model


def measure(spec: Spec, cfg: Config, impl: str, args, device: torch.device, flops: int, peak: float | None) -> dict:
    """One training run; its row of the results."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = spec.build()
    params = sum(p.numel() for p in model.parameters())
    initial = checksum(model)
    data = TensorBatches(spec.data(2 * spec.batch * world), spec.batch, num_batches=args.steps)
    clock = Clock(device, args.warmup, args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = train_rfkit if impl == "rfkit" else train_plain
    trained = train(model, cfg, BatchLoader(data), clock, device)
    final = checksum(trained)
    rate = clock.steps_per_second()
    images = rate * spec.batch * world
    tflops = flops * rate / 1e12  # per GPU: flops is one rank's step
    row = {
        "model": spec.name,
        "config": cfg.name,
        "impl": impl,
        "params": params,
        "world": world,
        "batch_per_gpu": spec.batch,
        "images_per_s": images,
        "tokens_per_s": images * trained.num_tokens(spec.latent),
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "initial_checksum": initial,
        "final_checksum": final,
        "first_loss": clock.losses[0],
        "last_loss": clock.losses[-1],
    }
    del trained, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def setup_distributed(tiny: bool) -> torch.device:
    """One process group for every run (Lightning reuses it); a world of one outside torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    cuda = torch.cuda.is_available() and not tiny
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = ["model", "params", "config", "run", "images/s", "tokens/s", "TFLOP/s per GPU", "MFU", "peak mem GiB"]
    header.append("rfkit / plain")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    plain = {(r["model"], r["config"]): r for r in rows if r["impl"] == "plain"}
    for r in rows:
        other = plain.get((r["model"], r["config"])) if r["impl"] == "rfkit" else None
        ratio = f"{r['images_per_s'] / other['images_per_s']:.3f}" if other else ""
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['config']} | {r['impl']} | {r['images_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['tflops_per_gpu']:.3g} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['peak_mem_gib'], '.2f')} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, compile rows skipped")
    parser.add_argument("--models", nargs="+", help="model names to run (default: all), e.g. DiT-XL/2")
    parser.add_argument("--configs", nargs="+", help=f"configs to run (default: all): {[c.name for c in CONFIGS]}")
    parser.add_argument("--steps", type=int, help="steps per run (default 40, tiny 5)")
    parser.add_argument("--warmup", type=int, help="steps before the clock starts (default 15, tiny 2)")
    parser.add_argument("--batch", type=int, help="per-GPU batch for every model (default: each model's own)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of one device, if not in the table")
    parser.add_argument("--out", type=Path, help="results file (.md; a .json beside it holds every number)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.tiny else 40)
    args.warmup = args.warmup or (2 if args.tiny else 15)
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"--warmup must lie in [1, --steps), got {args.warmup} and {args.steps}")
    out = args.out or OUT / ("bench_gpu_tiny.md" if args.tiny else "bench_gpu.md")
    models = [m for m in (TINY if args.tiny else MODELS) if not args.models or m.name in args.models]
    configs = [c for c in CONFIGS if not args.configs or c.name in args.configs]
    skipped = [c.name for c in configs if c.compile] if args.tiny else []
    configs = [c for c in configs if c.name not in skipped]
    if not models or not configs:
        raise SystemExit("no model or config left to run: check --models and --configs against the names in --help")

    device = setup_distributed(args.tiny)
    peak, source = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    label = "CPU tiny (tiny models, a few steps): the script works; not GPU results" if args.tiny else name
    notes = [
        f"{label}; {dist.get_world_size()} rank(s), bf16-mixed, AdamW, {args.steps} steps, timed after {args.warmup}.",
        f"MFU peak: {fmt(peak, '.0f')} TFLOP/s dense bf16 per device ({source}). Model FLOPs: "
        "FlopCounterMode, one forward + backward per model (tools/bench_gpu.py docstring).",
    ]
    if skipped:
        notes.append(f"Skipped in --tiny: {', '.join(skipped)} (inductor compiles C++ for minutes on a CPU).")
    rows: list[dict] = []
    for spec in models:
        spec = dataclasses.replace(spec, batch=args.batch or spec.batch)
        flops = step_flops(spec, spec.batch)
        for cfg in configs:
            try:
                pair = [measure(spec, cfg, impl, args, device, flops, peak) for impl in ("rfkit", "plain")]
            except torch.OutOfMemoryError:  # the other rows are still worth having
                gc.collect()
                torch.cuda.empty_cache()
                notes.append(f"{spec.name} {cfg.name}: out of memory at batch {spec.batch} per GPU (try --batch).")
                continue
            if pair[0]["params"] != pair[1]["params"] or pair[0]["initial_checksum"] != pair[1]["initial_checksum"]:
                raise SystemExit(f"{spec.name} {cfg.name}: rfkit and the plain loop did not start from the same model")
            rows += pair
            if dist.get_rank() == 0:  # after every pair, so an interrupted run keeps what it measured
                print("\n".join(table(pair).splitlines()[2:]), flush=True)
                write(out, rows, notes, label, peak)
    if dist.get_rank() == 0:
        print(write(out, rows, notes, label, peak))
    dist.destroy_process_group()


def write(out: Path, rows: list[dict], notes: list[str], label: str, peak: float | None) -> str:
    """Write the table and notes to ``out`` and every number to ``out`` with .json; returns the text."""
    ratios = [r["images_per_s"] / p["images_per_s"] for r, p in zip(rows[::2], rows[1::2], strict=True)]
    summary = f"rfkit / plain (images/s): median {statistics.median(ratios):.3f}." if ratios else "No row measured."
    text = table(rows) + "\n\n" + "\n".join([*notes, summary]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"label": label, "peak": peak, "rows": rows}, indent=1) + "\n")
    return text


if __name__ == "__main__":
    main()
