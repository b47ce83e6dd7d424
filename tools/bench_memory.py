"""Memory of DDP vs FSDP2 per rank, and of a training step with and without activation checkpointing.

    python tools/bench_memory.py                      # DiT width 256, depth 8, 2 ranks (gloo on CPUs)
    python tools/bench_memory.py --width 384 --depth 12 --heads 6

1. State per rank: 2 real processes each build the same DiT, wrap it with DDP or with FSDP2
   (``rfkit.parallel.parallelize``, one ``fully_shard`` per block), take one AdamW step, and count
   the bytes of the parameters, gradients and optimizer state each rank holds. FSDP2 should hold
   about 1/2 of DDP's (the root's few small unsharded leftovers aside).
2. Activations: one process per setting runs one forward + backward on a batch and reports the peak
   above what it held before (CUDA: ``max_memory_allocated``; CPU: peak resident set size, with
   glibc told to map every allocation over 64 KiB so freed memory leaves the process).

Not counted: DDP's reducer buckets (one more copy of the gradients unless
``gradient_as_bucket_view=True``) and FSDP2's transient all-gathered block during forward/backward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from rfkit.models import DiT
from rfkit.parallel import parallelize

MB = 2**20


def build(args) -> DiT:
    torch.manual_seed(0)
    return DiT(4, args.size, 2, args.width, args.depth, args.heads, num_classes=10)


def batch(args, device) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device)
    return x, torch.rand(args.batch, generator=g).to(device), {"cls": torch.randint(0, 10, (args.batch,)).to(device)}


def local_bytes(tensors) -> int:
    """Bytes this rank stores: the local shard of a DTensor, the whole of a plain tensor."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def state_worker(rank: int, args, kind: str, init: str, out: str) -> None:
    cuda = torch.cuda.device_count() >= args.ranks
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=args.ranks)
    model = build(args).to(device)
    if kind == "ddp":
        wrapped = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    else:
        wrapped = parallelize(model, init_device_mesh(device.type, (args.ranks,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wrapped(*batch(args, device)).square().mean().backward()
    optimizer.step()
    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    sizes = {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params), "adam": local_bytes(moments)}
    Path(f"{out}/{kind}{rank}.json").write_text(json.dumps(sizes))
    dist.destroy_process_group()


def peak_step(args, checkpointing: bool) -> float:
    """MB above the starting point at the peak of one forward + backward (run in this process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = parallelize(build(args).to(device), activation_checkpointing=checkpointing)
    inputs = batch(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/statm") as f:
            start = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    model(*inputs).square().mean().backward()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - start) / MB
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="latent side (4 channels, patch 2)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the activation measurement")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--peak-only", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_only:  # a fresh process per setting, so one measurement cannot inherit the other's peak
        print(peak_step(args, args.peak_only == "checkpointed"))
        return

    params = sum(p.numel() for p in build(args).parameters())
    print(f"DiT width {args.width}, depth {args.depth}: {params / 1e6:.2f}M parameters, {args.ranks} ranks")
    with tempfile.TemporaryDirectory() as out:
        for kind in ("ddp", "fsdp2"):
            mp.start_processes(
                state_worker,
                args=(args, kind, f"file://{out}/{kind}.init", out),
                nprocs=args.ranks,
                start_method="spawn",
            )
        read = lambda kind, r: json.loads(Path(f"{out}/{kind}{r}.json").read_text())  # noqa: E731
        sizes = {kind: [read(kind, r) for r in range(args.ranks)] for kind in ("ddp", "fsdp2")}
    print("\nper-rank state after one AdamW step (MB):")
    print(f"{'':8}{'params':>10}{'grads':>10}{'adam':>10}{'total':>10}")
    totals = {}
    for kind, ranks in sizes.items():
        for r, s in enumerate(ranks):
            total = sum(s.values())
            totals.setdefault(kind, []).append(total)
            cells = "".join(f"{s[key] / MB:>10.2f}" for key in ("params", "grads", "adam"))
            print(f"{kind} r{r}".ljust(8) + cells + f"{total / MB:>10.2f}")
    ratio = max(totals["fsdp2"]) / max(totals["ddp"])
    print(f"FSDP2 / DDP (largest rank): {ratio:.3f}  (ideal 1/{args.ranks} = {1 / args.ranks:.3f})")

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for setting in ("plain", "checkpointed"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--peak-only", setting]
        peaks[setting] = float(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    where = "CUDA allocator" if torch.cuda.is_available() else "CPU resident set"
    print(f"\npeak of one forward + backward, batch {args.batch} ({where}, MB above the start):")
    print(f"  without activation checkpointing: {peaks['plain']:8.1f}")
    print(f"  with activation checkpointing:    {peaks['checkpointed']:8.1f}")
    print(f"  ratio: {peaks['checkpointed'] / peaks['plain']:.3f}")


if __name__ == "__main__":
    main()
