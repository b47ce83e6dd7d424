"""Per-block model transforms for scale: activation checkpointing, torch.compile, FSDP2 sharding.

A velocity model that keeps its repeated transformer blocks in ``model.blocks`` (DiT, MMDiT) gets
each transform per block, the unit in which memory and compute repeat; a model without blocks
(the MLP) is treated as one block. Parameter names, and so checkpoints, are the same with or
without any of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["parallelize"]


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Apply the transforms in place, in the order torchtitan uses (checkpoint, compile, shard).

    Args:
        model: a velocity model; its ``blocks`` (an iterable of modules) if it has them.
        mesh: a 1-D data-parallel device mesh: shard every block with FSDP2 (``fully_shard``), then
            the root, so each rank holds ``1 / mesh.size()`` of every parameter and gathers one
            block's weights at a time. None: no sharding.
        activation_checkpointing: keep only each block's input for backward and recompute the
            rest (memory ~ one block's activations instead of all of them, for ~1/3 more compute).
        compile: ``torch.compile`` each block (one compilation, reused by every block).

    Returns:
        ``model``, transformed.
    """
    blocks = list(model.blocks) if hasattr(model, "blocks") else [model]
    for block in blocks:
        if activation_checkpointing:
            # the composable form adds hooks instead of wrapping, so parameter names do not change
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        if compile:
            block.compile()  # in place, unlike torch.compile(block): names do not change either
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            if block is not model:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model
