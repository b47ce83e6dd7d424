"""The velocity-network interface the training module and the samplers rely on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from torch import Tensor, nn

from rfkit.paths import expand_t

Cond = Mapping[str, Tensor]
"""Conditioning, batch-first: ``cls`` (B,) class labels, ``text`` (B, L, D) and ``pooled`` (B, D)
precomputed text embeddings. A model reads the keys it declares and ignores the rest."""


class VelocityModel(nn.Module, ABC):
    """``v(x, t, cond)``: the velocity field, shaped like ``x``.

    Subclasses set ``latent_shape`` (the shape of one sample they generate by default) and, if
    they are conditional, override :meth:`drop_condition` so classifier-free guidance has a null
    condition to train and sample with.
    """

    latent_shape: tuple[int, ...]
    cond_keys: tuple[str, ...] = ()
    """The conditioning keys ``forward`` requires (empty for an unconditional model)."""
    second_time: bool = False
    """Whether ``forward`` reads the second time ``r`` (built with ``second_time=True``)."""

    @abstractmethod
    def forward(self, x: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None) -> Tensor:
        """Velocity at ``x`` (B, *latent_shape) and ``t`` (B,) in [0, 1]; returns (B, *latent_shape).

        ``r`` (B,): an optional second time, fed through a zero-initialised embedding so that a new
        model, or one initialised from a flow-matching checkpoint, ignores it until trained. The
        objectives of :mod:`rfkit.objectives` pass an interval length (MeanFlow's ``r - t``, the
        shortcut's step size d), so None and 0 both mean the instantaneous velocity.
        """

    def drop_condition(self, cond: Cond, drop: Tensor) -> dict[str, Tensor]:
        """Replace the condition of rows where ``drop`` (B,) bool is True by the null condition.

        The default, for unconditional models, returns ``cond`` unchanged.
        """
        del drop
        return dict(cond)

    def check_second_time(self, r: Tensor | None) -> None:
        """Refuse ``r`` on a model built without a second-time embedding (it would be ignored silently)."""
        if r is not None and not self.second_time:
            raise ValueError(
                f"{type(self).__name__} was given a second time r but was built without one: "
                "construct it with second_time=True (model.model.init_args.second_time: true)"
            )

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Tokens the model sees for one latent of this shape (drives resolution-dependent shifts)."""
        del latent_shape
        return 1


def zero_condition(cond: Cond, drop: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """``cond`` with the ``keys`` of rows where ``drop`` (B,) is True set to zeros: the null condition
    of text-conditioned models (SD3 drops its text encoders to zero embeddings)."""
    out = dict(cond)
    for key in keys:
        out[key] = cond[key] * expand_t(~drop, cond[key])
    return out
