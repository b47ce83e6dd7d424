"""Timestep samplers: where along the path the training loss is evaluated.

Convention (docs/design.md §1): ``t = 0`` is noise, ``t = 1`` is data, ``x_t = (1 - t) x0 + t x1``.
Samplers from the SD3 paper (Esser et al. 2024, "Scaling Rectified Flow Transformers") keep the
paper's parameters, which describe the noise level ``sigma = 1 - t``; each class below draws
sigma exactly as the paper writes it and returns ``t = 1 - sigma``.

Drawing t from a density ``p(t)`` and weighting a uniform-t loss by ``p(t)`` are the same objective
in expectation (see :class:`rfkit.weightings.DensityWeighting`), which is why every sampler also
exposes its ``density``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from rfkit.plugin import Plugin

__all__ = [
    "CosMap",
    "LogitNormal",
    "ModeSampler",
    "ResolutionShifted",
    "Shifted",
    "TimestepSampler",
    "UShaped",
    "Uniform",
    "resolution_shift",
    "shift_sigma",
]


class TimestepSampler(Plugin, ABC):
    """Draws training timesteps ``t`` in the open interval (0, 1)."""

    @abstractmethod
    def __call__(
        self, n: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``n`` timesteps.

        Args:
            n: number of draws, > 0.
            device: where the result lives.
            generator: source of randomness (its device is used for the draw).

        Returns:
            (n,) float32 tensor with values in the open interval (0, 1).
        """

    @abstractmethod
    def density(self, t: Tensor) -> Tensor:
        """Probability density ``p(t)`` of the draws, elementwise; integrates to 1 over (0, 1)."""

    def for_tokens(self, num_tokens: int) -> TimestepSampler:
        """The sampler to use for a batch with ``num_tokens`` latent tokens.

        Most samplers ignore the resolution; :class:`ResolutionShifted` does not. The training
        module calls this once per batch so shape buckets get their own shift.
        """
        del num_tokens
        return self


# --------------------------------------------------------------------------------------------
# Shared draws. A float32 draw can land exactly on 0 or 1 after a nonlinear map; clamping by one
# ulp keeps every sampler inside the open interval the ABC promises.
# --------------------------------------------------------------------------------------------

_EPS = torch.finfo(torch.float32).eps


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int (the number of timesteps to draw), got {n!r}")


def _draw(fn, n: int, device, generator: torch.Generator | None) -> Tensor:
    """(n,) float32 draws of ``fn`` (``torch.rand``, ``torch.randn``), made on the generator's device."""
    _check_n(n)
    where = generator.device if generator is not None else device
    return fn(n, generator=generator, device=where).to(device)


def _open(t: Tensor) -> Tensor:
    return t.clamp(_EPS, 1.0 - _EPS)


# --------------------------------------------------------------------------------------------
# Built-in samplers
# --------------------------------------------------------------------------------------------


class Uniform(TimestepSampler):
    """``t ~ U(0, 1)``; density 1. The rectified-flow paper's choice (Liu et al. 2022)."""

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        return _open(_draw(torch.rand, n, device, generator))

    def density(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class LogitNormal(TimestepSampler):
    """SD3's logit-normal sampling: ``sigma = sigmoid(loc + scale * n)``, ``n ~ N(0, 1)``, ``t = 1 - sigma``.

    Density (in sigma, SD3 eq. 19)::

        p(sigma) = exp(-(logit(sigma) - loc)^2 / (2 scale^2)) / (scale sqrt(2 pi) sigma (1 - sigma))

    and ``p_t(t) = p(1 - t)``. A positive ``loc`` puts more training on the noisy side (small t),
    as in the paper. diffusers' scripts flip the sign of ``logit_mean`` by indexing a descending
    sigma table with the draw; rfkit follows the paper. SD3's best setting is ``loc=0, scale=1``.

    Args:
        loc: location ``m`` of ``logit(sigma)``.
        scale: spread ``s`` of ``logit(sigma)``, > 0.
    """

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (the std of logit(sigma)), got {scale}")
        self.loc = float(loc)
        self.scale = float(scale)

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        sigma = torch.sigmoid(self.loc + self.scale * _draw(torch.randn, n, device, generator))
        return _open(1.0 - sigma)

    def density(self, t: Tensor) -> Tensor:
        sigma = 1.0 - t
        z = (torch.logit(sigma) - self.loc) / self.scale
        return torch.exp(-0.5 * z**2) / (self.scale * math.sqrt(2 * math.pi) * sigma * t)


class ModeSampler(TimestepSampler):
    """SD3's mode sampling with heavy tails (SD3 eq. 20)::

        sigma = f(u) = 1 - u - scale * (cos^2(pi u / 2) - 1 + u),   u ~ U(0, 1),   t = 1 - sigma

    ``scale > 0`` concentrates sigma around 1/2 while keeping mass at both ends; ``scale = 0`` is
    uniform. ``f`` is a bijection of [0, 1] only while ``f'(u) = -1 - scale + scale (pi/2) sin(pi u)``
    stays <= 0, i.e. ``-1 <= scale <= 2 / (pi - 2)``; outside that range the draws fold over and the
    paper's density is wrong, so those scales are refused. SD3 reports ``scale = 1.29``.
    """

    MAX_SCALE = 2.0 / (math.pi - 2.0)

    def __init__(self, scale: float = 1.29) -> None:
        if not -1.0 <= scale <= self.MAX_SCALE:
            raise ValueError(
                f"ModeSampler scale must lie in [-1, 2/(pi-2) = {self.MAX_SCALE:.4f}], got {scale}: "
                "outside that range f(u) = 1 - u - s(cos^2(pi u/2) - 1 + u) is not monotone, so the "
                "draws fold over and no longer follow the mode density"
            )
        self.scale = float(scale)

    def _f(self, u: Tensor) -> Tensor:
        return 1.0 - u - self.scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        return _open(1.0 - self._f(_draw(torch.rand, n, device, generator)))

    def density(self, t: Tensor) -> Tensor:
        # p(sigma) = 1 / |f'(f^{-1}(sigma))|; f is decreasing, so invert it by bisection in float64.
        sigma = (1.0 - t).double()
        lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
        for _ in range(60):  # 2^-60: below float64 resolution on [0, 1]
            mid = 0.5 * (lo + hi)
            above = self._f(mid) > sigma  # still left of the root
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        u = 0.5 * (lo + hi)
        slope = -1.0 - self.scale + self.scale * 0.5 * math.pi * torch.sin(math.pi * u)
        return (1.0 / slope.abs()).to(t.dtype)


class CosMap(TimestepSampler):
    """SD3's CosMap: ``sigma = 1 - 1 / (tan(pi u / 2) + 1)``, ``u ~ U(0, 1)``, ``t = 1 - sigma``.

    Its density ``p(sigma) = 2 / (pi (1 - 2 sigma + 2 sigma^2))`` is symmetric about 1/2, so
    ``p_t(t)`` has the same form. It matches the cosine schedule's log-SNR spacing (SD3 §3.1).
    """

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        u = _draw(torch.rand, n, device, generator)
        sigma = 1.0 - 1.0 / (torch.tan(0.5 * math.pi * u) + 1.0)
        return _open(1.0 - sigma)

    def density(self, t: Tensor) -> Tensor:
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))


class UShaped(TimestepSampler):
    """The U-shaped density of Lee et al. 2024 ("Improving the Training of Rectified Flows")::

        p(t) = a (exp(a t) + exp(a (1 - t))) / (2 (exp(a) - 1))

    Half the draws come from ``C exp(a t)`` on [0, 1] (``C = a / (exp(a) - 1)``, sampled by its
    inverse CDF ``t = log(1 + u (exp(a) - 1)) / a``), half from its mirror ``1 - t``: both ends,
    where a 2-rectified flow's loss is largest, get more training. The paper uses ``a = 4``.
    """

    def __init__(self, a: float = 4.0) -> None:
        if not a > 0:
            raise ValueError(f"a must be > 0 (the steepness of the U), got {a}")
        self.a = float(a)

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        u = _draw(torch.rand, 2 * n, device, generator)
        t = torch.log1p(u[:n] * math.expm1(self.a)) / self.a
        t = torch.where(u[n:] < 0.5, t, 1.0 - t)  # the mirror half
        return _open(t)

    def density(self, t: Tensor) -> Tensor:
        return self.a * (torch.exp(self.a * t) + torch.exp(self.a * (1.0 - t))) / (2.0 * math.expm1(self.a))


# --------------------------------------------------------------------------------------------
# The SD3 / Flux shift: a change of variable applied to any base sampler
# --------------------------------------------------------------------------------------------


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """SD3's shift ``sigma' = a sigma / (1 + (a - 1) sigma)``: ``logit(sigma') = logit(sigma) + ln a``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class Shifted(TimestepSampler):
    """Moves any sampler toward noise by SD3's timestep shift (SD3 §5.3.2, eq. 23).

    With ``a = shift``::

        sigma' = a sigma / (1 + (a - 1) sigma),    t' = 1 - sigma'

    ``a > 1`` spends more steps at high noise, which higher resolutions need (SD3 uses
    ``a = sqrt(m / n)`` for m pixels vs a base of n). Since ``logit(sigma') = logit(sigma) + ln a``,
    ``Shifted(LogitNormal(m, s), a)`` is exactly ``LogitNormal(m + ln a, s)``. The density follows
    from the change of variable ``sigma = sigma' / (a - (a - 1) sigma')``::

        p'(sigma') = p(sigma) * a / (a - (a - 1) sigma')^2

    Args:
        base: the sampler to shift.
        shift: ``a`` > 0; 1 leaves the base unchanged.
    """

    def __init__(self, base: TimestepSampler, shift: float = 3.0) -> None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0 (SD3's alpha; 1 means no shift), got {shift}")
        self.base = base
        self.shift = float(shift)

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        t = self.base(n, device=device, generator=generator)
        return _open(1.0 - shift_sigma(1.0 - t, self.shift))

    def density(self, t: Tensor) -> Tensor:
        s_new = 1.0 - t
        denom = self.shift - (self.shift - 1.0) * s_new
        s_old = s_new / denom
        return self.base.density(1.0 - s_old) * self.shift / denom**2

    def for_tokens(self, num_tokens: int) -> TimestepSampler:
        return Shifted(self.base.for_tokens(num_tokens), self.shift)


def resolution_shift(
    num_tokens: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_tokens: int = 256,
    max_tokens: int = 4096,
) -> float:
    """Flux's resolution-dependent shift ``a = exp(mu)`` for ``num_tokens`` latent tokens.

    ``mu`` is linear in the token count L through (base_tokens, base_shift) and
    (max_tokens, max_shift)::

        mu = base_shift + (L - base_tokens) * (max_shift - base_shift) / (max_tokens - base_tokens)

    With Flux's defaults a 256-token latent gets ``a = e^0.5 = 1.65`` and a 4096-token one
    (1024x1024 pixels, 2x2 patches of a /8 VAE) ``a = e^1.15 = 3.16``. Use the result as
    ``Shifted(base, shift=a)`` or as the inference shift of :func:`rfkit.solvers.time_grid`.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    if max_tokens == base_tokens:
        raise ValueError("max_tokens and base_tokens must differ (they fix the line through mu)")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + (num_tokens - base_tokens) * slope)


class ResolutionShifted(TimestepSampler):
    """``Shifted(base, resolution_shift(num_tokens, ...))``, re-evaluated for each batch's token count.

    ``num_tokens`` is the default used when the sampler is called directly; during training the
    module calls :meth:`for_tokens` with the token count of each batch (shape buckets differ).
    Parameters are Flux's (see :func:`resolution_shift`).
    """

    def __init__(
        self,
        base: TimestepSampler,
        num_tokens: int = 256,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_tokens: int = 256,
        max_tokens: int = 4096,
    ) -> None:
        self.base = base
        self.num_tokens = int(num_tokens)
        self._line = (base_shift, max_shift, base_tokens, max_tokens)
        self._shifted = Shifted(base, resolution_shift(self.num_tokens, *self._line))

    @property
    def shift(self) -> float:
        return self._shifted.shift

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        return self._shifted(n, device=device, generator=generator)

    def density(self, t: Tensor) -> Tensor:
        return self._shifted.density(t)

    def for_tokens(self, num_tokens: int) -> TimestepSampler:
        if num_tokens == self.num_tokens:
            return self
        return ResolutionShifted(self.base, num_tokens, *self._line)
