"""Per-row draws: any layout of ranks and micro-batches sees the same numbers per global row, and a
rank draws in proportion to its own rows, whatever the world size."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from rfkit.draws import BLOCK_ROWS, RowDraws
from rfkit.timesteps import LogitNormal


def global_draw(global_rows: int, world: int, accumulate: int, draw) -> torch.Tensor:
    """Every (micro-batch, rank) slice of step 7, put back in global row order."""
    n = global_rows // (world * accumulate)
    parts = []
    for micro in range(accumulate):
        for rank in range(world):
            parts.append(draw(RowDraws.for_step(11, 7, micro, rank, world, n)))
    return torch.cat(parts)


DRAWS = {
    "noise": lambda d: d.normal((3, 4, 4)),
    "uniform": lambda d: d.uniform(),
    "sampler": lambda d: d.rows(lambda k, g: LogitNormal(0.5, 1.2)(k, generator=g)),
    "two in a row": lambda d: torch.stack([d.uniform(), d.normal(())], 1),  # the second call is its own stream
}


@pytest.mark.parametrize("name", DRAWS)
@pytest.mark.parametrize("global_rows", [64, 96, 200])
def test_every_layout_draws_the_same_rows(name, global_rows):
    reference = global_draw(global_rows, 1, 1, DRAWS[name])
    for world, accumulate in ((2, 1), (4, 1), (1, 2), (2, 2), (8, 1)):
        if global_rows % (world * accumulate):
            continue
        got = global_draw(global_rows, world, accumulate, DRAWS[name])
        assert torch.equal(got, reference), (world, accumulate)


def test_a_rank_draws_in_proportion_to_its_rows_whatever_the_world():
    n = 64
    counts = {}
    for world in (1, 8, 256):
        for rank in (0, world - 1):
            draws = RowDraws.for_step(0, 3, 0, rank, world, n)
            draws.normal((16, 32, 32))
            counts[world, rank] = draws.rows_drawn
    assert set(counts.values()) == {n}  # the old scheme drew world * n: 16,384 rows at 256 ranks
    # rows that straddle blocks cost at most two partial blocks more, still independent of the world
    for world in (3, 30, 300):
        draws = RowDraws.for_step(0, 3, 0, world - 1, world, 40)
        draws.uniform()
        assert draws.rows_drawn <= 40 + 2 * (BLOCK_ROWS - 1)


def test_draws_are_standard_normal_and_uniform_and_independent():
    draws = RowDraws(5, 0, 4096)
    noise, coins = draws.normal(()), draws.uniform()
    assert stats.kstest(noise.numpy(), "norm").pvalue > 0.01
    assert stats.kstest(coins.numpy(), "uniform").pvalue > 0.01
    assert abs(stats.pearsonr(noise.numpy(), coins.numpy()).statistic) < 4 / 4096**0.5
    # blocks are not copies of each other, nor steps of each other
    blocks = noise.reshape(-1, BLOCK_ROWS)
    assert torch.unique(blocks, dim=0).shape[0] == blocks.shape[0]
    assert not torch.equal(
        RowDraws.for_step(5, 1, 0, 0, 1, 64).uniform(), RowDraws.for_step(5, 2, 0, 0, 1, 64).uniform()
    )


def test_the_shared_generator_is_the_same_on_every_rank():
    firsts = [RowDraws.for_step(9, 4, 0, rank, 4, 16) for rank in range(4)]
    for d in firsts:
        d.uniform()  # the same calls before it on every rank
    values = [torch.rand(5, generator=d.shared()) for d in firsts]
    assert all(torch.equal(v, values[0]) for v in values)
