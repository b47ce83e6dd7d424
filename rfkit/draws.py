"""Random draws for one rank's rows of a global batch: the same numbers whatever the number of ranks.

A training step draws, for each row of its global batch, noise, a timestep and a label-drop coin
(objectives may draw more). Two guarantees matter at scale:

1. **The same training for any world size and gradient accumulation.** Row ``g`` of step ``s``
   gets the same numbers whether one process holds the whole batch or 256 ranks hold a slice
   each, so 1 GPU x batch 2B trains exactly like 2 GPUs x B, and nothing needs resuming (the
   numbers follow from (seed, step, row)).
2. **Work and memory per rank proportional to its own rows.** Drawing the global batch on every
   rank and keeping one slice costs each rank ``world`` times its share: at 256 ranks x 64
   latents of 16x32x32, a gigabyte of fp32 noise per rank per step.

Both hold with fixed-size blocks of global rows: block ``b`` (rows ``b*B .. b*B + B - 1``) of the
``k``-th draw of a step comes from a generator seeded by ``(seed, k, b)``. A rank draws only the
blocks that overlap its rows, whole (so a block's numbers never depend on who draws it), and keeps
its rows: at most ``n + 2 (B - 1)`` rows per draw for ``n`` rows, whatever the world size.

Global row numbering: in micro-batch ``m`` (of ``accumulate`` per optimizer step) on rank ``r`` of
``world``, local row ``i`` is global row ``(m * world + r) * n + i``; the data modules deal rows in
that order (:class:`rfkit.data.batches.TensorBatches`). It assumes every rank holds ``n`` rows, as
rfkit's training streams guarantee.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rfkit.distributed import rank_and_world, stream_seed

__all__ = ["BLOCK_ROWS", "RowDraws"]

BLOCK_ROWS = 64
"""Rows per block (B above). Fixed: changing it changes every number drawn."""


class RowDraws:
    """The draws of one step for rows ``first_row .. first_row + num_rows - 1`` of the global batch.

    Each call (``rows``, ``normal``, ``uniform``, ``shared``) is a new, independent stream; calls
    must come in the same order on every rank (they do: every rank runs the same code).

    Args:
        seed: the step's seed, e.g. ``stream_seed(run_seed, global_step)``.
        first_row: this rank's first global row.
        num_rows: this rank's rows ``n``.
        device: where the numbers are drawn (a CUDA generator on a GPU).
        block_rows: rows per block.
    """

    def __init__(
        self,
        seed: int,
        first_row: int,
        num_rows: int,
        device: torch.device | str = "cpu",
        block_rows: int = BLOCK_ROWS,
    ) -> None:
        self.seed = seed
        self.first_row = first_row
        self.num_rows = num_rows
        self.device = torch.device(device)
        self.block_rows = block_rows
        self.calls = 0
        self.rows_drawn = 0  # rows drawn so far, this rank's and its blocks' neighbours: for tests and benchmarks

    @classmethod
    def for_step(
        cls, seed: int, step: int, micro_batch: int, rank: int, world: int, num_rows: int, device=None
    ) -> RowDraws:
        """The draws of optimizer step ``step``, micro-batch ``micro_batch``, for ``rank`` of ``world``."""
        first_row = (micro_batch * world + rank) * num_rows
        return cls(stream_seed(seed, step), first_row, num_rows, device or "cpu")

    @classmethod
    def from_torch_rng(cls, num_rows: int, device=None) -> RowDraws:
        """Draws seeded from torch's global RNG, for a step run by hand (no trainer, no run seed)."""
        rank, world = rank_and_world()
        return cls.for_step(int(torch.randint(0, 2**62, ())), 0, 0, rank, world, num_rows, device)

    def _stream(self) -> int:
        self.calls += 1
        return self.calls

    def rows(self, draw: Callable[[int, torch.Generator], Tensor]) -> Tensor:
        """This rank's rows of a per-row draw.

        Args:
            draw: ``draw(count, generator)`` -> a tensor whose first dimension is ``count``; it must
                depend only on its arguments (e.g. ``lambda k, g: sampler(k, generator=g)``).

        Returns:
            (num_rows, ...) rows ``first_row ..`` of the draw.
        """
        stream, size = self._stream(), self.block_rows
        first, last = self.first_row // size, (self.first_row + self.num_rows - 1) // size
        parts = []
        for block in range(first, last + 1):
            g = torch.Generator(self.device).manual_seed(stream_seed(self.seed, stream, block))
            parts.append(draw(size, g))
        self.rows_drawn += size * (last - first + 1)
        start = self.first_row - first * size
        drawn = parts[0] if len(parts) == 1 else torch.cat(parts)
        return drawn[start : start + self.num_rows]

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """(num_rows, *shape) standard normal noise."""
        return self.rows(lambda k, g: torch.randn((k, *shape), generator=g, device=self.device, dtype=dtype))

    def uniform(self) -> Tensor:
        """(num_rows,) uniform numbers in [0, 1)."""
        return self.rows(lambda k, g: torch.rand(k, generator=g, device=self.device))

    def shared(self) -> torch.Generator:
        """A generator seeded alike on every rank, for draws about the whole batch (e.g. pairs drawn
        from an OT plan solved across ranks)."""
        return torch.Generator(self.device).manual_seed(stream_seed(self.seed, self._stream(), -1))
