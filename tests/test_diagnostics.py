"""Straightness and transport cost: closed forms, and the streaming identity against the definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rfkit.diagnostics import flow_stats, transport_cost


def test_straight_flow_has_zero_straightness():
    c = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    stats = flow_stats(lambda x, t: c, torch.zeros(2, 2), num_steps=10)
    assert stats.straightness == pytest.approx(0.0, abs=1e-9)
    assert stats.transport_cost == pytest.approx(float((c**2).sum(1).mean()))
    torch.testing.assert_close(stats.x1, c)
    assert stats.nfe == 10


def test_accelerating_flow_closed_form():
    # v = 2 t c: Z1 - Z0 = c and S = int ||c - 2 t c||^2 dt = ||c||^2 / 3
    c = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)  # ||c||^2 = 9
    stats = flow_stats(lambda x, t: 2 * t[:, None] * c, torch.zeros(1, 3, dtype=torch.float64), num_steps=2000)
    assert stats.straightness == pytest.approx(3.0, rel=2e-3)
    assert stats.transport_cost == pytest.approx(9.0, rel=2e-3)


def test_streaming_identity_equals_the_definition():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))

    def v(x, t):
        return 3 * net(torch.cat([x, t[:, None]], 1))

    x0 = torch.randn(64, 2, dtype=torch.float64)
    net.double()
    k = 50
    stats = flow_stats(v, x0, num_steps=k)
    # the definition, with every velocity stored
    x, vs = x0, []
    with torch.no_grad():
        for i in range(k):
            vs.append(v(x, torch.full((64,), i / k, dtype=torch.float64)))
            x = x + vs[-1] / k
    d = x - x0
    direct = sum(float(((d - vi) ** 2).sum(1).mean()) / k for vi in vs)
    assert stats.straightness == pytest.approx(direct, rel=1e-9)
    assert stats.transport_cost == pytest.approx(transport_cost(x0, x))
    assert stats.straightness > 0.01  # a generic (curving) field is not straight
