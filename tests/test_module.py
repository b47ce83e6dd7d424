"""RectifiedFlow: the training objective against its closed form, and the wiring of each plugin axis."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from rfkit.couplings import MinibatchOT, Reflow
from rfkit.draws import RowDraws
from rfkit.models import DiT, VelocityModel
from rfkit.module import RectifiedFlow
from rfkit.sampling import generate, guided_velocity
from rfkit.solvers import Euler
from rfkit.timesteps import LogitNormal, ResolutionShifted, Uniform
from rfkit.weightings import MinSNR


class Linear(VelocityModel):
    """v = A x + b t (+ a per-class offset): small enough to check losses by hand."""

    def __init__(self, dim: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        self.latent_shape = (dim,)
        self.a = nn.Linear(dim, dim)
        self.b = nn.Parameter(torch.randn(dim))
        self.cls = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.num_classes = num_classes
        self.seen: list[Tensor] = []

    def forward(self, x, t, cond):
        out = self.a(x) + t[:, None] * self.b
        if self.cls is not None:
            self.seen.append(cond["cls"].clone())
            out = out + self.cls(cond["cls"])
        return out

    def drop_condition(self, cond, drop):
        return {**cond, "cls": torch.where(drop, self.num_classes, cond["cls"])}


def test_loss_is_the_weighted_velocity_mse():
    torch.manual_seed(0)
    module = RectifiedFlow(Linear(), timesteps=LogitNormal(), weighting=MinSNR(5.0))
    x1 = torch.randn(64, 3)
    t = torch.rand(64)
    per_sample, t_used = module.velocity_loss({"latent": x1}, RowDraws(3, 0, 64), t=t)
    x0 = RowDraws(3, 0, 64).normal((3,))
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    v = module.model(x_t, t, {})
    torch.testing.assert_close(per_sample, ((v - (x1 - x0)) ** 2).mean(1))
    assert torch.equal(t_used, t)
    # training_step applies the weighting
    torch.manual_seed(5)
    loss = module.training_step({"latent": x1}, 0)
    torch.manual_seed(5)
    per, t_drawn = module.velocity_loss({"latent": x1})
    torch.testing.assert_close(loss, (MinSNR(5.0)(t_drawn) * per).mean())


def test_coupling_and_reflow_noise_are_used():
    x1 = torch.randn(32, 3) + 4
    noise = torch.randn(32, 3)
    module = RectifiedFlow(Linear(), coupling=Reflow())
    t = torch.full((32,), 0.0)
    per, _ = module.velocity_loss({"latent": x1, "noise": noise}, t=t)
    v = module.model(noise, t, {})  # at t = 0, x_t is the stored noise
    torch.testing.assert_close(per, ((v - (x1 - noise)) ** 2).mean(1))
    with pytest.raises(ValueError, match="noise"):
        module.velocity_loss({"latent": x1})
    # minibatch OT: the module trains on the optimally permuted noise
    ot = RectifiedFlow(Linear(), coupling=MinibatchOT())
    ones = torch.ones(32)
    per_ot, _ = ot.velocity_loss({"latent": x1}, RowDraws(0, 0, 32), t=ones)
    x0 = RowDraws(0, 0, 32).normal((3,))
    paired, _ = MinibatchOT()(x0, x1)
    v = ot.model(x1, ones, {})  # at t = 1, x_t is the data whatever the pairing
    torch.testing.assert_close(per_ot, ((v - (x1 - paired)) ** 2).mean(1))
    assert ((paired - x1) ** 2).sum() < ((x0 - x1) ** 2).sum()


def test_null_class_is_used_at_the_configured_rate():
    model = Linear(num_classes=10)
    module = RectifiedFlow(model, cond_dropout=0.3).train()
    torch.manual_seed(0)
    for _ in range(20):
        module.training_step({"latent": torch.randn(256, 3), "cls": torch.randint(0, 10, (256,))}, 0)
    labels = torch.cat(model.seen)
    rate = float((labels == 10).float().mean())
    n = labels.numel()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    # in eval (validation) nothing is dropped
    model.seen.clear()
    module.eval().velocity_loss({"latent": torch.randn(256, 3), "cls": torch.randint(0, 10, (256,))})
    assert not bool((torch.cat(model.seen) == 10).any())


def test_resolution_shift_follows_the_batch_token_count():
    seen = []

    class Spy(ResolutionShifted):
        def for_tokens(self, num_tokens):
            seen.append(num_tokens)
            return super().for_tokens(num_tokens)

    dit = DiT(in_channels=1, input_size=8, patch_size=2, width=32, depth=1, heads=4)
    module = RectifiedFlow(dit, timesteps=Spy(Uniform()))
    module.velocity_loss({"latent": torch.randn(2, 1, 8, 8)})
    module.velocity_loss({"latent": torch.randn(2, 1, 16, 8)})
    assert seen == [16, 32]


def test_guidance_formula_and_sampling():
    model = Linear(num_classes=4)
    cond = {"cls": torch.tensor([1, 2])}
    x, t = torch.randn(2, 3), torch.rand(2)
    v_c = model(x, t, cond)
    v_u = model(x, t, {"cls": torch.tensor([4, 4])})
    torch.testing.assert_close(guided_velocity(model, cond, 3.0)(x, t), v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(guided_velocity(model, cond, 1.0)(x, t), v_c)
    x0 = torch.randn(2, 3)
    out = generate(model, x0, cond, Euler(), num_steps=1)
    torch.testing.assert_close(out, x0 + model(x0, torch.zeros(2), cond))
    module = RectifiedFlow(model, cfg_scale=2.0, sample_steps=4)
    assert module.sample(x0, cond).shape == (2, 3)


def test_bad_settings():
    with pytest.raises(ValueError, match="cond_dropout"):
        RectifiedFlow(Linear(), cond_dropout=1.0)


def test_hyperparameters_are_the_parsed_config_under_the_cli_and_scalars_in_python():
    """built_from_parsed_config reads a private Lightning name; both of its answers are checked here."""
    from pathlib import Path

    from rfkit.cli import RFKitCLI
    from rfkit.models import MLP
    from rfkit.module import built_from_parsed_config

    assert not built_from_parsed_config()
    by_hand = RectifiedFlow(MLP(dim=2, width=8, depth=1), timesteps=LogitNormal())
    assert "model" not in by_hand.hparams and "timesteps" not in by_hand.hparams and by_hand.hparams.cfg_scale == 1.0
    config = Path(__file__).resolve().parents[1] / "configs/toy2d.yaml"
    cli = RFKitCLI(args=[f"--config={config}", "--trainer.logger=false"], run=False)
    assert cli.model.hparams["timesteps"]["class_path"] == "rfkit.timesteps.Uniform"
    assert cli.model.hparams["model"]["init_args"]["dim"] == 2


def test_sampling_settings_are_one_value_with_overrides():
    from rfkit.models import MLP
    from rfkit.sampling import SamplingSettings
    from rfkit.solvers import Heun

    flow = RectifiedFlow(MLP(dim=2, width=8, depth=1), sample_solver=Heun(), sample_steps=5, sample_shift=2.0)
    assert flow.sampling == SamplingSettings(flow.sample_solver, 5, 2.0, 1.0)
    changed = flow.sampling.override(num_steps=3, shift=None, cfg_scale=2.0)  # None keeps the module's value
    assert (changed.num_steps, changed.shift, changed.cfg_scale) == (3, 2.0, 2.0)
    assert changed.record() == {"solver": "Heun()", "num_steps": 3, "shift": 2.0, "cfg_scale": 2.0}
    x0 = torch.randn(4, 2)
    torch.testing.assert_close(
        flow.sample(x0, {}, num_steps=3), generate(flow.model, x0, {}, solver=Heun(), num_steps=3, shift=2.0)
    )
    assert flow.nfe() == 10 and flow.nfe(3) == 6  # Heun: 2 evaluations per step
