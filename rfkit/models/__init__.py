"""Velocity networks ``v(x, t, cond)``, shaped like ``x``."""

from rfkit.models.base import Cond, VelocityModel
from rfkit.models.dit import DiT
from rfkit.models.mlp import MLP
from rfkit.models.mmdit import MMDiT

__all__ = ["MLP", "Cond", "DiT", "MMDiT", "VelocityModel"]
