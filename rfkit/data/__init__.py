"""Data modules: embedded sets that run anywhere (2-D toys, digits) and latent shards at scale."""

from rfkit.data.digits import Digits
from rfkit.data.shards import LatentShards
from rfkit.data.toy2d import Checkerboard, Circles, EightGaussians, Moons, Spirals, Toy2D, ToyDistribution
from rfkit.data.writer import LatentShardWriter

__all__ = [
    "Checkerboard",
    "Circles",
    "Digits",
    "EightGaussians",
    "LatentShardWriter",
    "LatentShards",
    "Moons",
    "Spirals",
    "Toy2D",
    "ToyDistribution",
]
