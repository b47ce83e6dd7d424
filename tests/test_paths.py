"""The straight path: interpolant, target and endpoint predictions, for any latent rank."""

from __future__ import annotations

import pytest
import torch

from rfkit.paths import expand_t, predict_x0, predict_x1, straight_path


@pytest.mark.parametrize("shape", [(5, 2), (5, 4, 8, 8), (5, 3, 2, 4, 4)])
def test_interpolant_and_target(shape):
    g = torch.Generator().manual_seed(0)
    x0, x1 = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    p = straight_path(x0, x1, t)
    for i in range(shape[0]):  # closed form, sample by sample
        torch.testing.assert_close(p.x_t[i], (1 - t[i]) * x0[i] + t[i] * x1[i])
    torch.testing.assert_close(p.u, x1 - x0)
    torch.testing.assert_close(straight_path(x0, x1, torch.zeros(shape[0], dtype=torch.float64)).x_t, x0)
    torch.testing.assert_close(straight_path(x0, x1, torch.ones(shape[0], dtype=torch.float64)).x_t, x1)
    # u is the time derivative of x_t
    h = 1e-6
    fd = (straight_path(x0, x1, t + h).x_t - straight_path(x0, x1, t - h).x_t) / (2 * h)
    torch.testing.assert_close(fd, p.u, rtol=1e-6, atol=1e-6)


def test_endpoint_predictions_invert_the_path():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    t = torch.rand(6, generator=g)
    p = straight_path(x0, x1, t)
    torch.testing.assert_close(predict_x1(p.x_t, p.u, t), x1)
    torch.testing.assert_close(predict_x0(p.x_t, p.u, t), x0)


def test_bad_shapes():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="same shape"):
        straight_path(x, torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="t must have shape"):
        straight_path(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="t must have shape"):
        expand_t(torch.zeros(4, 1), x)
