"""FSDP2 for rfkit: Lightning's ``ModelParallelStrategy`` as plain fully sharded data parallelism.

``RectifiedFlow.configure_model`` shards every transformer block, then the root, over the
data-parallel mesh this strategy builds (see :func:`rfkit.parallel.parallelize`). It runs on GPUs
(NCCL) and on CPUs (gloo); Lightning's ``strategy="fsdp"`` (FSDP1) refuses CPUs.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["FSDP2", "sharding_mesh"]


def sharding_mesh(module: pl.LightningModule) -> DeviceMesh | None:
    """The data-parallel mesh to shard ``module`` over, under ``ModelParallelStrategy``; else None.

    Raises ValueError when the run also keeps Lightning's ``WeightAveraging`` (``EMAWeightAveraging``):
    it holds a full, unsharded copy of the model and does not support sharded ones;
    :class:`rfkit.ema.EMA` is the EMA sharded like the model.
    """
    mesh = module.device_mesh
    if mesh is None:
        return None
    if any(isinstance(cb, WeightAveraging) for cb in module.trainer.callbacks):
        raise ValueError(
            "Lightning's EMAWeightAveraging keeps a full, unsharded copy of the model and does not support "
            "sharded (FSDP2) models: replace it in trainer.callbacks by rfkit.ema.EMA (same decay; its average "
            "is sharded like the weights and saved in the sharded checkpoints)"
        )
    return mesh["data_parallel"] if mesh.mesh_dim_names else mesh


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class FSDP2(ModelParallelStrategy):
    """Every rank is one data-parallel shard (``ModelParallelStrategy`` with tensor parallel size 1).

    Checkpoints are written atomically. Sharded ones (a folder, one file per rank, the default)
    go to ``<name>.partial`` and are renamed into place once every rank's shard and the metadata
    are on disk; a crash mid-write never leaves a folder that looks complete. With
    ``save_distributed_checkpoint=False`` rank 0 gathers the full state into one file, written
    by the strategy's checkpoint IO (``rfkit fit`` installs an atomic one).

    Args:
        save_distributed_checkpoint: one file per rank in a folder (True), or one full file (False).
        process_group_backend: "nccl", "gloo", ...; default: nccl on GPUs, gloo on CPUs.
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    @override
    def setup_environment(self) -> None:
        # Lightning's "auto" is one data-parallel group per node; here every rank shards
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial, old = path.with_name(f"{path.name}.partial"), path.with_name(f"{path.name}.old")
        if self.global_rank == 0:
            _remove(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every shard, and rank 0's metadata, are written
        if self.global_rank == 0:
            _remove(old)
            if path.exists():
                os.replace(path, old)
            os.replace(partial, path)
            _remove(old)
        self.barrier()
