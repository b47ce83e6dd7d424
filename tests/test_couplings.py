"""Couplings: exact OT against independent optimal solvers, the entropic plan, reflow, and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import ot  # POT: an independent exact solver (network simplex)
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from rfkit.couplings import Independent, MinibatchOT, Reflow, ot_gap
from rfkit.ot import sinkhorn_plan


def batch(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    x1 = torch.randn(shape, generator=g, dtype=dtype) * 0.5 + 2.0
    return x0, x1


def pair_cost(x0, x1) -> float:
    return float(((x0 - x1) ** 2).flatten(1).sum(1).sum())


def pot_optimal_cost(x0, x1) -> float:
    a, b = x0.flatten(1).numpy(), x1.flatten(1).numpy()
    n = a.shape[0]
    m = ot.dist(a, b)  # squared Euclidean
    return float(ot.emd2(np.full(n, 1.0 / n), np.full(n, 1.0 / n), m, numItermax=10_000_000)) * n


def scipy_optimal_cost(x0, x1) -> float:
    m = torch.cdist(x1.flatten(1), x0.flatten(1)).pow(2).numpy()
    rows, cols = linear_sum_assignment(m)
    return float(m[rows, cols].sum())


@pytest.mark.parametrize("shape", [(64, 2), (100, 8), (48, 4, 8, 8), (30, 3, 2, 5), (40, 16)])
def test_exact_ot_matches_an_independent_solver(shape):
    x0, x1 = batch(shape)
    y0, y1 = MinibatchOT("exact")(x0, x1)
    assert y1 is x1
    # each noise row used exactly once
    rows = {tuple(r.flatten().tolist()) for r in y0}
    assert rows == {tuple(r.flatten().tolist()) for r in x0} and len(rows) == shape[0]
    # rfkit uses POT's network simplex for low-dimensional samples, lapjv for the rest; each is
    # checked against both POT and scipy's shortest augmenting path, two other algorithms
    assert pair_cost(y0, x1) == pytest.approx(pot_optimal_cost(x0, x1), rel=1e-9)
    assert pair_cost(y0, x1) == pytest.approx(scipy_optimal_cost(x0, x1), rel=1e-9)
    assert pair_cost(y0, x1) < pair_cost(x0, x1)


def test_exact_ot_against_brute_force():
    x0, x1 = batch((6, 3), seed=4)
    best = min(pair_cost(x0[list(p)], x1) for p in itertools.permutations(range(6)))
    assert pair_cost(MinibatchOT()(x0, x1)[0], x1) == pytest.approx(best, rel=1e-12)


def test_exact_ot_in_float32_and_bfloat16_is_still_a_permutation():
    x0, x1 = batch((128, 4, 4, 4), seed=2, dtype=torch.float32)
    y0, _ = MinibatchOT()(x0, x1)
    opt = pot_optimal_cost(x0.double(), x1.double())
    assert pair_cost(y0.double(), x1.double()) == pytest.approx(opt, rel=1e-5)
    yb, _ = MinibatchOT()(x0.bfloat16(), x1.bfloat16())
    assert yb.dtype == torch.bfloat16 and yb.shape == x0.shape


def scipy_rows(x0, x1):
    """(n,) noise row of each data row in the exact plan, from scipy's solver (not rfkit's)."""
    m = torch.cdist(x1.flatten(1).double(), x0.flatten(1).double()).pow(2).numpy()
    return torch.from_numpy(linear_sum_assignment(m)[1])


def test_chunked_exact_ot_is_a_permutation_optimal_within_each_block():
    x0, x1 = batch((50, 3, 4, 4), seed=5)  # 50 = 3 blocks of 16 and a last one of 2
    y0, y1 = MinibatchOT(chunk_size=16)(x0, x1)
    assert y1 is x1
    # a permutation: every noise row used exactly once, and each stays inside its own block
    for s in range(0, 50, 16):
        block = slice(s, s + 16)
        got = {tuple(r.flatten().tolist()) for r in y0[block]}
        assert got == {tuple(r.flatten().tolist()) for r in x0[block]} and len(got) == len(x0[block])
        # optimal within the block, by another solver
        assert torch.equal(y0[block], x0[block][scipy_rows(x0[block], x1[block])])
    # and strictly worse than the full plan on this batch, which pairs across blocks
    assert pair_cost(y0, x1) > pair_cost(x0[scipy_rows(x0, x1)], x1) * (1 + 1e-9)


@pytest.mark.parametrize("chunk_size", [40, 41, 1000])
def test_chunk_size_at_least_the_batch_is_the_exact_plan(chunk_size):
    x0, x1 = batch((40, 8), seed=6)
    assert torch.equal(MinibatchOT(chunk_size=chunk_size)(x0, x1)[0], MinibatchOT()(x0, x1)[0])
    assert torch.equal(MinibatchOT()(x0, x1)[0], x0[scipy_rows(x0, x1)])


def test_chunked_sinkhorn_draws_within_blocks():
    x0, x1 = batch((30, 4), seed=7, dtype=torch.float32)
    x0[:, 0] += torch.arange(30.0) * 1000  # block k's noise rows are tagged by their first coordinate
    y0, _ = MinibatchOT("sinkhorn", chunk_size=10)(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.div(y0[:, 0].round().long() + 500, 10_000, rounding_mode="floor"), torch.arange(30) // 10)


def test_ot_gap_against_an_independent_computation():
    x0, x1 = batch((96, 2, 4, 4), seed=8)
    chunked = MinibatchOT(chunk_size=32)(x0, x1)[0]
    gap = ot_gap(x0, x1, chunked)
    # independently: per-block and full optimal pairs from scipy, costs as plain sums
    d = x1.flatten(1).shape[1]
    blocks = torch.cat([x0[s : s + 32][scipy_rows(x0[s : s + 32], x1[s : s + 32])] for s in (0, 32, 64)])
    by_hand = [float(((y - x1) ** 2).sum() / 96) for y in (blocks, x0[scipy_rows(x0, x1)], x0)]
    assert gap[:3] == pytest.approx(by_hand, rel=1e-12)
    assert gap.relative == pytest.approx(by_hand[0] / by_hand[1] - 1, rel=1e-9) and gap.relative > 0
    assert gap.gain_kept == pytest.approx((by_hand[2] - by_hand[0]) / (by_hand[2] - by_hand[1]), rel=1e-9)
    assert 0 < gap.gain_kept < 1
    # the full plan has no gap and keeps the whole gain; the independent coupling keeps none
    full = ot_gap(x0, x1, MinibatchOT()(x0, x1)[0])
    assert full.relative == pytest.approx(0, abs=1e-12) and full.gain_kept == pytest.approx(1, abs=1e-12)
    assert ot_gap(x0, x1, x0).gain_kept == 0
    assert by_hand[2] == pytest.approx(d * (1 + 0.25 + 4), rel=0.1)  # E||x0 - x1||^2 for these batches


def test_sinkhorn_plan_marginals_and_limits():
    x0, x1 = batch((40, 2), seed=1)
    plan = sinkhorn_plan(x0, x1, reg=0.05, max_iter=2000, tol=1e-6)
    n = 40
    torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(plan.sum(0), torch.full((n,), 1 / n), rtol=1e-4, atol=1e-7)
    cost = torch.cdist(x1.float(), x0.float()) ** 2
    exact = pot_optimal_cost(x0, x1) / n
    # small reg: close to the exact plan's cost; large reg: close to the independent coupling
    sharp = float((sinkhorn_plan(x0, x1, reg=0.002, max_iter=5000, tol=1e-6) * cost).sum())
    blurred = float((sinkhorn_plan(x0, x1, reg=100.0, max_iter=50, tol=1e-6) * cost).sum())
    assert sharp == pytest.approx(exact, rel=0.02)
    assert blurred == pytest.approx(float(cost.mean()), rel=0.02)
    # entropic cost agrees with POT's own Sinkhorn at the same absolute epsilon
    eps = 0.05 * float(cost.mean())
    ref = ot.sinkhorn(np.full(n, 1 / n), np.full(n, 1 / n), cost.double().numpy(), eps, numItermax=20000, stopThr=1e-10)
    torch.testing.assert_close(plan.double(), torch.from_numpy(ref), atol=2e-5, rtol=0)


def test_sinkhorn_pairs_are_seeded_and_lower_cost():
    x0, x1 = batch((256, 2), seed=3, dtype=torch.float32)
    c = MinibatchOT("sinkhorn", reg=0.01)
    a0, a1 = c(x0, x1, generator=torch.Generator().manual_seed(0))
    b0, _ = c(x0, x1, generator=torch.Generator().manual_seed(0))
    assert a1 is x1 and torch.equal(a0, b0)
    exact, indep = pair_cost(MinibatchOT()(x0, x1)[0], x1), pair_cost(x0, x1)
    # drawn with replacement, pairs may even undercut the best permutation; they stay near it
    assert abs(pair_cost(a0, x1) - exact) < 0.1 * (indep - exact)
    costs = [
        pair_cost(MinibatchOT("sinkhorn", reg=r)(x0, x1, generator=torch.Generator().manual_seed(0))[0], x1)
        for r in (0.01, 0.2, 5.0)
    ]
    assert costs[0] < costs[1] < costs[2]  # more regularisation, closer to independent


def test_independent_and_reflow():
    x0, x1 = batch((8, 2))
    y0, y1 = Independent()(x0, x1)
    assert y0 is x0 and y1 is x1
    noise = torch.randn(8, 2, dtype=torch.float64)
    r0, r1 = Reflow()(x0, x1, noise=noise)
    assert torch.equal(r0, noise) and r1 is x1
    with pytest.raises(ValueError, match="noise"):
        Reflow()(x0, x1)
    with pytest.raises(ValueError, match="noise"):
        Reflow()(x0, x1, noise=torch.randn(7, 2))


@pytest.mark.parametrize("coupling", [Independent(), MinibatchOT(), MinibatchOT("sinkhorn")], ids=repr)
def test_bad_input_names_the_argument(coupling):
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"x0 and x1 .*same shape"):
        coupling(x, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="same shape"):
        coupling(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x0 contains NaN"):
        coupling(torch.full((4, 2), float("nan")), x)
    with pytest.raises(ValueError, match="x1 contains NaN"):
        coupling(x, torch.full((4, 2), float("inf")))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="method"):
        MinibatchOT("hungarian")
    with pytest.raises(ValueError, match="reg"):
        MinibatchOT("sinkhorn", reg=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 2"):
        MinibatchOT(chunk_size=1)
