"""A loss weighting rfkit does not ship: P2 (perception-prioritised) weighting."""

from __future__ import annotations

from torch import Tensor

from rfkit.weightings import LossWeighting


class P2Weight(LossWeighting):
    """P2 weighting (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models"),
    restated for rfkit's velocity loss.

    P2 multiplies the noise-prediction loss by ``(k + SNR)^-gamma``, which lowers the weight of the
    nearly clean steps where only imperceptible detail is learned. On ``x_t = (1 - t) x0 + t x1``
    the noise error is ``x0_hat - x0 = -t (v - u)`` and ``SNR = t^2 / (1 - t)^2``, so the same
    objective on the velocity loss is::

        w(t) = t^2 / (k + t^2 / (1 - t)^2)^gamma

    ``gamma = 0`` is the plain noise-prediction loss (``w = t^2``); the paper uses ``k = 1`` and
    ``gamma`` in {0.5, 1}.

    Args:
        gamma: strength of the down-weighting of clean steps, >= 0.
        k: keeps the weight finite at SNR = 0, > 0.
    """

    def __init__(self, gamma: float = 1.0, k: float = 1.0) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0 (0 means no P2 down-weighting), got {gamma}")
        if not k > 0:
            raise ValueError(f"k must be > 0 (the SNR offset), got {k}")
        self.gamma, self.k = float(gamma), float(k)

    def __call__(self, t: Tensor) -> Tensor:
        snr = (t / (1.0 - t)) ** 2
        return t**2 * (self.k + snr) ** -self.gamma
