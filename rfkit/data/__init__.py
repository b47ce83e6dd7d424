"""Data modules: embedded sets that run anywhere (2-D toys, digits)."""

from rfkit.data.digits import Digits
from rfkit.data.toy2d import Checkerboard, Circles, EightGaussians, Moons, Spirals, Toy2D, ToyDistribution

__all__ = ["Checkerboard", "Circles", "Digits", "EightGaussians", "Moons", "Spirals", "Toy2D", "ToyDistribution"]
