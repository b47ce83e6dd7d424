"""Can the shard loader feed training? Loader throughput beside a DiT-S step's appetite, one run.

Writes latent shards (SD-VAE-like 4x32x32 float16 latents with labels, i.e. 256-pixel images) to a
temporary directory, then measures on this machine:

- ``LatentShards`` throughput in samples/s with 0 and 2 DataLoader workers (stream mode, shuffle
  buffer on, after the buffer has filled);
- the samples/s a DiT-S/2 training step consumes (``RectifiedFlow.velocity_loss`` + backward +
  AdamW step, batch ``--batch-size``);

and prints each loader rate as a ratio to the step's rate: above 1 the loader keeps up.

    .venv/bin/python tools/bench_data.py                    # CPU
    .venv/bin/python tools/bench_data.py --device cuda --bf16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from rfkit.data import LatentShards, LatentShardWriter
from rfkit.models import DiT
from rfkit.module import RectifiedFlow


def write_shards(root: str, samples: int, per_shard: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    with LatentShardWriter(root, per_shard, {"scaling_factor": 0.18215}) as out:
        for i in range(samples):
            out.write({"latent": rng.standard_normal(shape).astype(np.float16) * 5, "cls": i % 1000})


def loader_rate(root: str, workers: int, batch_size: int, batches: int) -> float:
    """Samples/s over ``batches`` batches, timed from the first batch (buffer filled, workers up)."""
    dm = LatentShards(root, batch_size=batch_size, batches_per_epoch=batches + 1, num_workers=workers,
                      shuffle_buffer=4 * batch_size)  # fmt: skip
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    start = time.perf_counter()
    n = sum(len(b["cls"]) for b in it)
    return n / (time.perf_counter() - start)


def step_rate(shape: tuple[int, ...], batch_size: int, steps: int, device: str, bf16: bool) -> float:
    """Samples/s a DiT-S/2 training step consumes (after one warm-up step)."""
    torch.manual_seed(0)
    model = DiT(in_channels=shape[0], input_size=shape[1], patch_size=2, width=384, depth=12, heads=6, num_classes=1000)
    flow = RectifiedFlow(model).to(device).train()
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    batch = {"latent": torch.randn(batch_size, *shape, device=device), "cls": torch.randint(0, 1000, (batch_size,))}
    batch["cls"] = batch["cls"].to(device)

    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow.velocity_loss(batch)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="samples written (default 4096)")
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch, loader and step (default 32)")
    p.add_argument("--loader-batches", type=int, default=60, help="batches timed per loader setting")
    p.add_argument("--steps", type=int, default=3, help="training steps timed (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the training step")
    args = p.parse_args()
    shape = tuple(args.latent)
    with tempfile.TemporaryDirectory() as root:
        write_shards(root, args.samples, args.per_shard, shape)
        loaders = {w: loader_rate(root, w, args.batch_size, args.loader_batches) for w in (0, 2)}
    train = step_rate(shape, args.batch_size, args.steps, args.device, args.bf16)
    print(f"latents {shape} float16, batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    print(f"DiT-S/2 training step on {args.device}{' bf16' if args.bf16 else ''}: {train:10.1f} samples/s")
    for w, rate in loaders.items():
        print(f"LatentShards, {w} workers:{'':15}{rate:10.1f} samples/s = {rate / train:8.2f} x the step's need")


if __name__ == "__main__":
    main()
