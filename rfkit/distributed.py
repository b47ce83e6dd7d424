"""Small torch.distributed helpers shared by the math, the module and the data (no Lightning).

Every helper is a no-op on one process, so the same code runs unchanged on a laptop and on a
cluster. Collectives here must be called by every rank, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["any_rank", "broadcast_from_zero", "gather_rows", "local_rows", "rank_and_world", "stream_seed"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def stream_seed(seed: int, *parts: int) -> int:
    """A deterministic 63-bit seed for (seed, rank, epoch, ...), the same in every process."""
    out = seed
    for p in parts:
        out = (out * 1_000_003 + p) % (2**63)
    return out


def local_rows(n: int) -> slice:
    """This rank's rows of a global batch made of ``n`` rows per rank, in rank order."""
    rank, _ = rank_and_world()
    return slice(rank * n, (rank + 1) * n)


def gather_rows(x: Tensor) -> Tensor:
    """(n, ...) on every rank -> (world * n, ...) on every rank, rank 0's rows first.

    Raises ValueError (on every rank, so none hangs) when the ranks hold different row counts.
    """
    world = rank_and_world()[1]
    if world == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(c) for c in counts]
    if len(set(sizes)) != 1:
        raise ValueError(f"gathering a global batch needs the same batch size on every rank, got {sizes}")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_from_zero(x: Tensor) -> Tensor:
    """Rank 0's ``x`` on every rank (``x`` gives the shape and dtype on the others)."""
    if rank_and_world()[1] == 1:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=0)
    return x


def any_rank(flag: bool | Tensor, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on at least one (an all-reduce MAX of one number)."""
    value = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1)
    if rank_and_world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
