"""Couplings: which noise sample each data sample travels from.

A coupling receives a batch of noise ``x0`` and data ``x1`` and returns the pairs to train on.
It never moves ``x1``: labels and text embeddings are indexed like ``x1`` and must stay aligned.
It reorders or replaces ``x0`` only. The batch's conditioning comes along read-only as ``cond``
(the keys of :data:`rfkit.data.schema.COND_KEYS`, e.g. ``cond["cls"]``), so a coupling may pair within
classes without ever seeing, or moving, anything but the noise.

Why it matters (docs/design.md §2): with the independent coupling straight paths cross, the network can
only learn their average, and the loss has a positive floor. An optimal-transport coupling (Brenier
map for the squared Euclidean cost) makes paths that do not cross; minibatch OT approximates it
(Tong et al. 2023; Pooladian et al. 2023). Reflow takes the pairs ``(z0, ODE(z0))`` of a trained
flow (Liu et al. 2022).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from rfkit.distributed import broadcast_from_zero, gather_rows, local_rows, rank_and_world
from rfkit.ot import exact_assignment, sinkhorn_plan
from rfkit.plugin import Plugin

__all__ = ["Coupling", "Independent", "MinibatchOT", "OTGap", "Reflow", "check_pair", "ot_gap", "pair_cost"]


class Coupling(Plugin, ABC):
    """Pairs noise with data; ``x1`` comes back untouched."""

    @abstractmethod
    def __call__(
        self,
        x0: Tensor,
        x1: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        cond: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Couple a batch.

        Args:
            x0: (n, *shape) fresh noise, N(0, I).
            x1: (n, *shape) data latents.
            noise: (n, *shape) noise the data carries with each sample (reflow pairs), or None.
            generator: randomness for couplings that draw (e.g. from an entropic plan).
            cond: the batch's conditioning, indexed like ``x1`` (``"cls"`` (n,) int64 labels,
                ``"text"`` (n, L, D), ``"pooled"`` (n, D)), or None. Read-only: most couplings
                ignore it; a class-aware coupling pairs within ``cond["cls"]``.

        Returns:
            ``(x0', x1)``: the noise to pair with each data row, (n, *shape), and ``x1`` itself.
        """


def check_pair(x0: Tensor, x1: Tensor, name0: str = "x0", name1: str = "x1") -> None:
    """Raise ValueError unless ``x0`` and ``x1`` have one shape and are finite everywhere."""
    if x0.shape != x1.shape:
        raise ValueError(
            f"{name0} and {name1} must have the same shape (batch size included), "
            f"got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"{name0} must be a non-empty batch (n, ...), got shape {tuple(x0.shape)}")
    # one host-device sync per batch (on a GPU, each sync stalls the queue), and the names only on failure
    if not (torch.isfinite(x0).all() & torch.isfinite(x1).all()):
        name = name0 if not torch.isfinite(x0).all() else name1
        raise ValueError(f"{name} contains NaN or inf; a coupling needs finite inputs")


class Independent(Coupling):
    """The product coupling: each data sample keeps the noise it was drawn with."""

    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        return x0, x1


class MinibatchOT(Coupling):
    """Optimal transport within a minibatch, for the squared Euclidean cost on flattened latents.

    ``method="exact"``: the optimal permutation ``pi`` of the noise,
    ``min_pi sum_j ||x0[pi(j)] - x1[j]||^2``. Every noise row is used exactly once, so the noise
    marginal of the batch is untouched (torchcfm instead samples pairs from the plan with
    replacement, repeating some noise rows and dropping others). Solved exactly by
    :func:`rfkit.ot.exact_assignment` (Jonker-Volgenant for latents, the network simplex for low-dimensional
    data), on the CPU in float64.

    ``method="sinkhorn"``: the entropic plan ``P = argmin <P, C> - eps H(P)`` with uniform marginals,
    by log-domain Sinkhorn iterations on the inputs' device; each data row then draws its noise
    row from ``P[j, :] / P[j, :].sum()``. The regularisation is relative to the cost scale,
    ``eps = reg * mean(C)``, so one ``reg`` means the same on 2-D toys and 4096-dim latents:
    ``reg -> 0`` approaches the exact plan, large ``reg`` the independent coupling. Noise rows may
    repeat, as in any draw from a plan.

    Under data parallelism each rank holds ``n`` rows of a global batch of ``world * n``.
    ``across_ranks=False`` (per-rank) couples each rank's rows among themselves: no communication,
    ``world`` independent plans of size n (exact: O(n^3) each, in parallel). ``across_ranks=True``
    (global) all-gathers noise and data, solves one plan on the whole global batch and gives each
    rank its rows: the plan a single process would find on the concatenated batch, closer to the
    true OT coupling (the minibatch OT bias shrinks with the batch), at the price of two
    all-gathers and one (world n)-sized solve (exact: on rank 0, then broadcast). Training is then
    the same on any number of ranks for the same global batch. Every rank must hold the same ``n``.

    ``chunk_size=c`` solves the plan within consecutive blocks of ``c`` rows (noise rows
    ``[k c, (k+1) c)`` with data rows ``[k c, (k+1) c)``; the last block may be shorter) instead of
    on the whole batch: exact OT is O(n^3), so ``n / c`` blocks cost O(n c^2), ``(n / c)^2`` times
    less. Rows arrive shuffled, so each block is a random minibatch of ``c``: the plan is exactly
    minibatch OT at batch ``c``, optimal within blocks, not across them. ``chunk_size >= n`` is the
    full plan. How far from the full plan a chunked one lands on your data: :func:`ot_gap`; the
    figures at global batches of 2048-8192 latents are in ``tools/results/bench_ot_scale.md``. With
    ``across_ranks=True`` the blocks tile the gathered global batch (rank-major), so
    ``chunk_size`` = rows per rank gives the per-rank plans again, only with the communication; the
    ranks share the blocks' solves (the full plan is solved by rank 0 alone).

    Args:
        method: "exact" or "sinkhorn".
        reg: sinkhorn only; relative entropic regularisation, > 0.
        max_iter: sinkhorn only; iteration cap.
        tol: sinkhorn only; stop when the row marginals are within ``tol`` (relative) of uniform.
        across_ranks: solve one plan for the global batch (True) or one per rank (False).
        chunk_size: solve within consecutive blocks of this many rows (>= 2), or None for one plan
            on the whole (global) batch.
    """

    def __init__(
        self,
        method: Literal["exact", "sinkhorn"] = "exact",
        reg: float = 0.05,
        max_iter: int = 200,
        tol: float = 1e-4,
        across_ranks: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        if method not in ("exact", "sinkhorn"):
            raise ValueError(f"method must be 'exact' or 'sinkhorn', got {method!r}")
        if not reg > 0:
            raise ValueError(f"reg must be > 0 (eps = reg * mean cost), got {reg}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.method = method
        self.reg = float(reg)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        if chunk_size is not None and chunk_size < 2:
            raise ValueError(f"chunk_size must be >= 2 rows (or None for the whole batch), got {chunk_size}")
        self.across_ranks = across_ranks
        self.chunk_size = chunk_size

    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        if self.across_ranks and rank_and_world()[1] > 1:
            mine = local_rows(x1.shape[0])
            x0, x1_all = gather_rows(x0), gather_rows(x1)
            return x0[self._pairing(x0, x1_all, generator)[mine]], x1
        return x0[self._pairing(x0, x1, generator)], x1

    def _pairing(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Tensor:
        """(n,) index of the noise row paired with each data row."""
        rank, world = rank_and_world()
        if self.method == "exact" and self.across_ranks and world > 1:
            # every rank must use the very same permutation. Blocks are dealt round-robin (rank r
            # solves blocks r, r + world, ...) and summed over ranks, each row written by exactly
            # one rank, so the solve time divides by up to the world size; one block (the full
            # plan) is solved on rank 0 and broadcast.
            if self.chunk_size is None or self.chunk_size >= x1.shape[0]:
                empty = torch.empty(x1.shape[0], dtype=torch.long, device=x0.device)
                return broadcast_from_zero(self._blocks(x0, x1, generator) if rank == 0 else empty)
            perm = self._blocks(x0, x1, generator, rank, world)
            dist.all_reduce(perm)  # sum: zeros from the ranks that did not solve a row's block
            return perm
        return self._blocks(x0, x1, generator)

    def _blocks(
        self, x0: Tensor, x1: Tensor, generator: torch.Generator | None, rank: int = 0, world: int = 1
    ) -> Tensor:
        """(n,) pairing solved within consecutive blocks of ``chunk_size`` rows (one block if None);
        only blocks ``rank, rank + world, ...``, zeros in the others."""
        n = x1.shape[0]
        size = n if self.chunk_size is None else self.chunk_size
        perm = torch.zeros(n, dtype=torch.long, device=x0.device)
        for k, s in enumerate(range(0, n, size)):
            if k % world == rank:
                perm[s : s + size] = self._solve(x0[s : s + size], x1[s : s + size], generator) + s
        return perm

    def _solve(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.method == "exact":
            return exact_assignment(x0, x1)
        plan = sinkhorn_plan(x0, x1, self.reg, self.max_iter, self.tol)
        where = generator.device if generator is not None else plan.device
        return torch.multinomial(plan.to(where), 1, generator=generator).squeeze(1).to(x0.device)


class OTGap(NamedTuple):
    """Mean squared pair distances of one batch under three couplings, and how they compare.

    ``cost``: the pairing measured; ``optimal``: the exact plan on the whole batch; ``independent``:
    each data row with the noise row drawn beside it. All are ``mean_j ||x0[perm[j]] - x1[j]||^2``.
    """

    cost: float
    optimal: float
    independent: float

    @property
    def relative(self) -> float:
        """``cost / optimal - 1``: how much more the pairing transports than the optimum."""
        return self.cost / self.optimal - 1.0

    @property
    def gain_kept(self) -> float:
        """``(independent - cost) / (independent - optimal)``: the share of OT's cost reduction kept (1 = optimal)."""
        return (self.independent - self.cost) / (self.independent - self.optimal)


def ot_gap(x0: Tensor, x1: Tensor, paired: Tensor) -> OTGap:
    """How far a coupling's pairs ``(paired[j], x1[j])`` are from the exact plan on the whole batch.

    Args:
        x0: (n, *shape) the noise the coupling was given.
        x1: (n, *shape) data.
        paired: (n, *shape) the noise it paired with each data row, e.g.
            ``MinibatchOT(chunk_size=1024)(x0, x1)[0]``.

    Solves the full exact plan (:func:`rfkit.ot.exact_assignment`, O(n^3)) once; distances in float64.
    """
    check_pair(x0, x1)
    check_pair(paired, x1, "paired", "x1")
    optimal = x0[exact_assignment(x0, x1)]
    return OTGap(pair_cost(paired, x1), pair_cost(optimal, x1), pair_cost(x0, x1))


def pair_cost(x0: Tensor, x1: Tensor) -> float:
    """``mean_j ||x0[j] - x1[j]||^2`` over a batch of pairs (n, *shape), in float64."""
    return float((x0.reshape(x0.shape[0], -1).double() - x1.reshape(x1.shape[0], -1).double()).pow(2).sum(1).mean())


class Reflow(Coupling):
    """Pairs each data sample with the noise stored beside it (``noise.npy`` in reflow shards).

    Reflow (Liu et al. 2022) trains on ``(z0, ODE_teacher(z0))``: the coupling is the teacher's
    deterministic map, its paths do not cross, and the retrained flow is straighter. The fresh
    ``x0`` is discarded. Batches without their noise are refused: training such a batch
    independently would silently undo the reflow.
    """

    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        if noise is None:
            raise ValueError(
                "Reflow needs the noise each sample was generated from, and this batch carries "
                "none: train on shards written by `rfkit reflow` (they hold noise.npy), or use "
                "another coupling"
            )
        check_pair(noise, x1, "noise", "x1")
        return noise.to(x1.dtype), x1
