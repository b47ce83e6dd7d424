"""MLP velocity field for vector data (the 2-D toys)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rfkit.models.base import Cond, VelocityModel
from rfkit.models.layers import LabelEmbedding


class MLP(VelocityModel):
    """``v([x, t])`` by a SELU MLP; with the defaults, exactly torchcfm's 2-D benchmark network.

    torchcfm's ``MLP(dim, w=64, time_varying=True)`` is Linear(dim + 1, w), then ``depth - 1``
    blocks of SELU + Linear(w, w), then SELU + Linear(w, dim). Keeping it identical makes 2-D
    results comparable with torchcfm's published numbers.

    Args:
        dim: data dimension d; inputs are (B, d).
        width: hidden width.
        depth: hidden layers.
        num_classes: 0 for unconditional; else a learned class embedding (with a null label
            ``num_classes`` for guidance) is added to the first hidden layer.
        second_time: accept a second time ``r``: one more input column, ``v([x, t, r])``, whose
            weights start at zero (so the network starts as ``v([x, t])``).
    """

    def __init__(
        self, dim: int = 2, width: int = 64, depth: int = 3, num_classes: int = 0, second_time: bool = False
    ) -> None:
        super().__init__()
        self.latent_shape = (dim,)
        self.num_classes = num_classes
        self.cond_keys = ("cls",) if num_classes > 0 else ()
        self.inp = nn.Linear(dim + 1, width)
        hidden: list[nn.Module] = []
        for _ in range(depth - 1):
            hidden += [nn.SELU(), nn.Linear(width, width)]
        self.body = nn.Sequential(*hidden, nn.SELU(), nn.Linear(width, dim))
        self.y_embed = LabelEmbedding(num_classes, width) if num_classes > 0 else None
        self.second_time = second_time
        self.r_embed = nn.Linear(1, width, bias=False) if second_time else None
        if self.r_embed is not None:
            nn.init.zeros_(self.r_embed.weight)

    def forward(self, x: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None) -> Tensor:
        self.check_second_time(r)
        h = self.inp(torch.cat([x, t[:, None].to(x.dtype)], dim=-1))  # (B, width)
        if self.r_embed is not None:  # r = None is r = 0; still in the graph, so DDP sees every weight used
            h = h + self.r_embed((r if r is not None else torch.zeros_like(t))[:, None].to(x.dtype))
        if self.y_embed is not None:
            h = h + self.y_embed(cond["cls"])
        return self.body(h)

    def drop_condition(self, cond: Cond, drop: Tensor) -> dict[str, Tensor]:
        out = dict(cond)
        if self.y_embed is not None:
            out["cls"] = self.y_embed.drop(cond["cls"], drop)
        return out
