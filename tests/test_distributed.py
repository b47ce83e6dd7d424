"""Distributed pieces on real processes (gloo): OT across ranks against the single-process plan, the
collectives' guards; and the restartable data streams and the global batch split."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rfkit.couplings import MinibatchOT
from rfkit.data.batches import BatchLoader, TensorBatches, global_batch_split
from rfkit.data.toy2d import EightGaussians, _Fresh
from rfkit.distributed import gather_rows

WORLD, N, D = 2, 24, 6  # ranks, rows per rank, dimension


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N, D, generator=g), torch.randn(WORLD * N, D, generator=g) + 2.0


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        x0, x1 = _global_batch()
        mine = slice(rank * N, (rank + 1) * N)
        result = {}
        for name, coupling in {
            "global_exact": MinibatchOT(across_ranks=True),
            "local_exact": MinibatchOT(),
            "global_sinkhorn": MinibatchOT("sinkhorn", reg=0.05, across_ranks=True),
            "global_chunked": MinibatchOT(across_ranks=True, chunk_size=16),  # blocks straddle the ranks
        }.items():
            g = torch.Generator().manual_seed(7)  # the same on every rank, as RectifiedFlow's step generator
            paired, data = coupling(x0[mine], x1[mine], generator=g)
            assert torch.equal(data, x1[mine])  # a coupling never moves the data
            result[name] = paired
        try:  # ranks holding different row counts: an error on every rank, not a hang
            gather_rows(torch.zeros(3 + rank, D))
        except ValueError as err:
            result["error"] = str(err)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ot_across_ranks_is_the_single_process_plan_on_the_concatenated_batch(tmp_path):
    mp.start_processes(_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x0, x1 = _global_batch()
    # global: each rank's rows of the one plan a single process finds on the whole batch
    single, _ = MinibatchOT()(x0, x1)
    assert torch.equal(torch.cat([r["global_exact"] for r in ranks]), single)
    # every noise row of the global batch is used exactly once, across ranks
    rows = torch.cat([r["global_exact"] for r in ranks])
    assert torch.equal(rows[torch.argsort(rows[:, 0])], x0[torch.argsort(x0[:, 0])])
    # per rank: each rank's own plan on its own rows, which costs more than the global one
    for r, result in enumerate(ranks):
        mine = slice(r * N, (r + 1) * N)
        assert torch.equal(result["local_exact"], MinibatchOT()(x0[mine], x1[mine])[0])
    per_rank = torch.cat([r["local_exact"] for r in ranks])
    assert ((single - x1) ** 2).sum() < ((per_rank - x1) ** 2).sum()
    # sinkhorn: the same draw from the same global plan
    sinkhorn, _ = MinibatchOT("sinkhorn", reg=0.05)(x0, x1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([r["global_sinkhorn"] for r in ranks]), sinkhorn)
    assert all("same batch size on every rank, got [3, 4]" in r["error"] for r in ranks)
    # chunked: the single-process chunked plan on the concatenated batch, not the per-rank plans
    chunked = torch.cat([r["global_chunked"] for r in ranks])
    assert torch.equal(chunked, MinibatchOT(chunk_size=16)(x0, x1)[0])
    assert not torch.equal(chunked, single) and not torch.equal(chunked, per_rank)


def _stream(loader, n: int) -> list[torch.Tensor]:
    out, it = [], iter(loader)
    while len(out) < n:
        try:
            out.append(next(it)["latent"])
        except StopIteration:  # the next epoch, as Lightning starts it
            it = iter(loader)
    return out


@pytest.mark.parametrize("make", ["tensors", "toy"])
def test_a_restored_stream_continues_where_it_stopped(make):
    def loader():
        if make == "tensors":
            return BatchLoader(TensorBatches({"latent": torch.arange(40.0)[:, None]}, 8, num_batches=7, seed=3))
        return BatchLoader(_Fresh(EightGaussians(), batch_size=4, num_batches=5, seed=3))

    whole = _stream(loader(), 17)  # crosses two epoch boundaries
    for stop in (3, 5, 7, 12):
        first = loader()
        _stream(first, stop)
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        rest = _stream(resumed, 17 - stop)
        assert all(torch.equal(a, b) for a, b in zip(whole[stop:], rest, strict=True)), stop


def test_global_batch_split_names_the_key():
    assert global_batch_split(None, 32, world=4) == 32
    assert global_batch_split(128, 32, world=4, accumulate=2) == 16
    with pytest.raises(ValueError, match=r"global_batch_size=100 must be a positive multiple .* 3 x 1 = 3; try 99"):
        global_batch_split(100, 32, world=3)
