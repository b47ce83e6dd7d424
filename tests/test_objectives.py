"""Objectives (rfkit.objectives) against independent computations: flow matching trains exactly as the
loss did before it moved out of the module; MeanFlow's target against finite differences and a
closed form; the shortcut's consistency target against two half Euler steps."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from rfkit.couplings import MinibatchOT
from rfkit.draws import RowDraws
from rfkit.models import MLP, DiT, VelocityModel
from rfkit.module import RectifiedFlow
from rfkit.objectives import FlowMatching, MeanFlow, Shortcut
from rfkit.testing import check_objective
from rfkit.timesteps import LogitNormal, Uniform
from rfkit.weightings import MinSNR


def tiny_dit(**kw) -> DiT:
    return DiT(in_channels=1, input_size=4, patch_size=2, width=16, depth=1, heads=2, **kw)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Every weight random (DiT's zero-initialised gates and outputs would make v = 0 and every check trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


# --------------------------------------------------------------------------------------------
# FlowMatching: the loss that used to live in RectifiedFlow.velocity_loss, bit for bit
# --------------------------------------------------------------------------------------------


def reference_loss(model, batch, draws, coupling, timesteps, cond_dropout):
    """The pre-objective ``RectifiedFlow.velocity_loss``, restated: noise, coupling, t, label drops, in this order."""
    x1 = batch["latent"]
    cond = {"cls": batch["cls"]}
    x0 = draws.normal(tuple(x1.shape[1:]), x1.dtype)
    x0, x1 = coupling(x0, x1, noise=None, generator=draws.shared(), cond=cond)
    sampler = timesteps.for_tokens(model.num_tokens(tuple(x1.shape[1:])))
    t = draws.rows(lambda k, g: sampler(k, device=draws.device, generator=g))
    cond = model.drop_condition(cond, draws.uniform() < cond_dropout)
    x_t = x0 + t[:, None, None, None] * (x1 - x0)  # rounded as rfkit.paths writes it
    v = model(x_t, t, cond)
    return (v.float() - (x1 - x0).float()).pow(2).flatten(1).mean(1), t


def test_flow_matching_trains_bit_identically_to_the_loss_it_replaced():
    torch.manual_seed(0)
    batches = [{"latent": torch.randn(16, 1, 4, 4), "cls": torch.randint(0, 3, (16,))} for _ in range(3)]
    model = randomize(tiny_dit(num_classes=3), scale=0.1)
    reference = copy.deepcopy(model)
    axes = {"coupling": MinibatchOT(), "timesteps": LogitNormal(), "weighting": MinSNR()}
    module = RectifiedFlow(model, cond_dropout=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **axes)
    module.noise_seed = 7
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))

    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step, batch in enumerate(batches):
        draws = RowDraws.for_step(7, step, 0, 0, 1, 16)
        per, t = reference_loss(reference, batch, draws, axes["coupling"], axes["timesteps"], 0.5)
        sgd.zero_grad()
        (MinSNR()(t) * per).mean().backward()
        sgd.step()
    for (name, a), b in zip(module.model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(
        module.model.final.proj.weight, randomize(tiny_dit(num_classes=3), scale=0.1).final.proj.weight
    )


def test_builtin_objectives_keep_the_contract():
    check_objective(FlowMatching())
    check_objective(MeanFlow())
    check_objective(MeanFlow(ratio=1.0, power=0.5, guidance=2.0))
    check_objective(Shortcut())
    check_objective(Shortcut(fraction=1.0, levels=3))


class GlobalRNG(FlowMatching):
    """Draws its timesteps from torch's global RNG instead of the step's draws."""

    def loss(self, model, batch, draws, **kw):
        per, t = super().loss(model, batch, draws, **kw)
        return per * (1 + 0 * torch.rand(())), t


class WrongNFE(FlowMatching):
    def nfe(self, solver, num_steps):
        return num_steps + 1


@pytest.mark.parametrize(("broken", "rule"), [(GlobalRNG(), "global RNG"), (WrongNFE(), "network calls")])
def test_broken_objectives_are_caught(broken, rule):
    with pytest.raises(AssertionError, match=rule):
        check_objective(broken)


# --------------------------------------------------------------------------------------------
# MeanFlow
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: MLP(dim=3, width=16, second_time=True), lambda: tiny_dit(second_time=True)])
def test_meanflow_target_is_v_plus_h_times_the_finite_difference_total_derivative(make):
    model = randomize(make()).double()
    n = 6
    shape = model.latent_shape if len(model.latent_shape) == 1 else (1, 4, 4)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    t, h = torch.rand(n, generator=g) * 0.5, torch.rand(n, generator=g) * 0.5
    u, target = MeanFlow().target(model, z.double(), t.double(), h.double(), v.double(), {})
    # d/dt of u(z_t, r, t) with r fixed: z moves with v, t by +1, so h = r - t by -1
    eps = 1e-7  # in float64; t enters as sin(1000 t f), so a wider difference is not accurate enough
    zd, vd, td, hd = z.double(), v.double(), t.double(), h.double()
    plus = model(zd + eps * vd, td + eps, {}, hd - eps)
    minus = model(zd - eps * vd, td - eps, {}, hd + eps)
    dudt = (plus - minus) / (2 * eps)
    expected = vd + h.double().reshape(-1, *[1] * len(shape)) * dudt
    torch.testing.assert_close(u, model(zd, td, {}, hd))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
    assert not target.requires_grad and u.requires_grad
    # the sign of the h tangent matters: the other sign gives another target
    wrong = vd + h.double().reshape(-1, *[1] * len(shape)) * (
        (model(zd + eps * vd, td + eps, {}, hd + eps) - model(zd - eps * vd, td - eps, {}, hd - eps)) / (2 * eps)
    )
    assert (target.double() - wrong).abs().max() > 1e-3


def test_meanflow_jvp_runs_in_fp32_under_bf16_autocast():
    model = randomize(tiny_dit(second_time=True), scale=0.2)
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    t, h = torch.rand(4, generator=g) * 0.5, torch.rand(4, generator=g) * 0.5
    u32, target32 = MeanFlow().target(model, z, t, h, v, {})
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16-mixed runs training_step under
        u, target = MeanFlow().target(model, z, t, h, v, {})
        assert model(z, t, {}, h).dtype == torch.bfloat16  # (autocast is on around it)
    assert u.dtype == target.dtype == torch.float32
    torch.testing.assert_close(target, target32)  # a bf16 JVP would be off by ~1e-2
    torch.testing.assert_close(u, u32)


class GaussianFlow(VelocityModel):
    """The exact average velocity of N(0, I) -> N(m, s^2 I) under the independent coupling.

    z_t ~ N(t m, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 + t^2 s^2, and the flow keeps the standardised
    point: z_r = r m + sigma_r (z_t - t m) / sigma_t. So u(z, r, t) = (z_r - z_t) / (r - t) and, at r = t,
    v(z, t) = m + sigma_t' (z - t m) / sigma_t with sigma_t' = (t s^2 - (1 - t)) / sigma_t.
    """

    second_time = True

    def __init__(self, m: Tensor, s: float) -> None:
        super().__init__()
        self.latent_shape, self.m, self.s = tuple(m.shape), m, s

    def sigma(self, t: Tensor) -> Tensor:
        return ((1 - t) ** 2 + t**2 * self.s**2).sqrt()[:, None]

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        d_sigma = (t[:, None] * self.s**2 - (1 - t[:, None])) / self.sigma(t)
        return self.m + d_sigma * (z - t[:, None] * self.m) / self.sigma(t)

    def forward(self, z, t, cond, r=None):
        h = torch.zeros_like(t) if r is None else r
        end = t + h
        z_end = end[:, None] * self.m + self.sigma(end) * (z - t[:, None] * self.m) / self.sigma(t)
        average = (z_end - z) / torch.where(h == 0, 1.0, h)[:, None]
        return torch.where((h == 0)[:, None], self.velocity(z, t), average)


def test_meanflow_target_is_the_exact_average_velocity_when_the_model_is_exact():
    exact = GaussianFlow(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), s=0.5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.6
    h = torch.rand(64, generator=g, dtype=torch.float64) * (1 - t)
    h[:8] = 0  # r = t rows: u = v
    u, target = MeanFlow().target(exact, z, t, h, exact.velocity(z, t), {})
    # with the marginal velocity in place of x1 - x0, the identity's right side is u itself
    torch.testing.assert_close(target.double(), exact(z, t, {}, h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.double()[:8], exact.velocity(z, t)[:8], rtol=1e-6, atol=1e-6)
    # and one jump with the exact u lands where the flow does: the data distribution's quantile map
    x0 = torch.randn(4096, 3, generator=g, dtype=torch.float64)
    x1 = MeanFlow().sample(exact, x0, num_steps=1)
    torch.testing.assert_close(x1, exact.m + 0.5 * x0)


def test_meanflow_rows_with_r_equal_t_are_flow_matching():
    model = randomize(tiny_dit(second_time=True))
    batch = {"latent": torch.randn(8, 1, 4, 4)}
    kw = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    fm, t_fm = FlowMatching().loss(model, batch, RowDraws(3, 0, 8), **kw)
    mf, t_mf = MeanFlow(ratio=0.0, power=0.0).loss(model, batch, RowDraws(3, 0, 8), **kw)
    assert torch.equal(t_fm, t_mf)
    torch.testing.assert_close(mf, fm, rtol=1e-5, atol=1e-6)
    # the adaptive weight: delta / (delta + c)^p
    mf_w, _ = MeanFlow(ratio=0.0, power=1.0, eps=0.01).loss(model, batch, RowDraws(3, 0, 8), **kw)
    torch.testing.assert_close(mf_w, fm / (fm + 0.01), rtol=1e-5, atol=1e-6)


def test_meanflow_folds_guidance_into_the_target_on_rows_that_kept_their_label():
    from rfkit.objectives import Pairs

    model = randomize(MLP(dim=2, width=16, num_classes=3, second_time=True))
    g = torch.Generator().manual_seed(4)
    x0, x1, t = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g), torch.rand(6, generator=g)
    kept = torch.tensor([True, True, False, True, False, True])
    cond = {"cls": torch.where(kept, torch.tensor([0, 1, 2, 0, 1, 2]), 3)}  # dropped rows hold the null label
    z = (1 - t[:, None]) * x0 + t[:, None] * x1
    with torch.no_grad():
        u_null = model(z, t, {"cls": torch.full((6,), 3)}, torch.zeros(6))
        u_cond = model(z, t, cond, torch.zeros(6))
    v = x1 - x0
    pairs = Pairs(x0, x1, t, cond, kept)
    got = MeanFlow(guidance=2.0).guided_target_velocity(model, pairs, z)
    torch.testing.assert_close(got, torch.where(kept[:, None], 2.0 * v - u_null, v))  # omega v + (1 - omega) u_null
    got = MeanFlow(guidance=1.0, guidance_mix=0.5).guided_target_velocity(model, pairs, z)
    torch.testing.assert_close(got, torch.where(kept[:, None], v + 0.5 * u_cond - 0.5 * u_null, v))
    assert torch.equal(MeanFlow().guided_target_velocity(model, pairs, z), v)  # omega = 1, kappa = 0: none


def test_meanflow_draws_intervals_forward_on_the_configured_fraction():
    from rfkit.objectives import draw_pairs

    model = MLP(dim=2, second_time=True)
    draws = RowDraws(0, 0, 4000)
    pairs = draw_pairs(model, {"latent": torch.randn(4000, 2)}, draws, MinibatchOT(method="exact"), Uniform())
    before = pairs.t.clone()
    h = MeanFlow(ratio=0.25).draw_intervals(pairs, draws, Uniform(), model)
    assert bool((h >= 0).all()) and bool((pairs.t + h <= 1).all())
    assert abs(float((h > 0).float().mean()) - 0.25) < 0.03  # 4000 rows: 3 standard deviations is 0.021
    assert torch.equal(pairs.t[h == 0], before[h == 0])  # r = t rows keep their t
    # r != t rows: (t, r) is the sorted pair of two independent uniforms, so E[t] = 1/3 and E[r] = 2/3
    assert abs(float(pairs.t[h > 0].mean()) - 1 / 3) < 0.03 and abs(float((pairs.t + h)[h > 0].mean()) - 2 / 3) < 0.03


def test_meanflow_refuses_dropout_checkpointing_and_a_model_without_a_second_time():
    with pytest.raises(ValueError, match="second_time"):
        MeanFlow().setup(MLP(dim=2))
    MeanFlow().setup(MLP(dim=2, second_time=True), sharded=True)  # FSDP2 works: see the 2-rank test
    with pytest.raises(ValueError, match="activation checkpointing"):
        MeanFlow().setup(MLP(dim=2, second_time=True), activation_checkpointing=True)
    dropping = MLP(dim=2, second_time=True)
    dropping.body.insert(0, torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        MeanFlow().setup(dropping)
    with pytest.raises(ValueError, match="ratio"):
        MeanFlow(ratio=1.5)


# --------------------------------------------------------------------------------------------
# Shortcut
# --------------------------------------------------------------------------------------------


def test_shortcut_target_is_two_half_euler_steps():
    model = randomize(MLP(dim=3, width=16, num_classes=2, second_time=True))
    objective = Shortcut(levels=5)  # finest half step 1/32: every half below is a trained step size
    z, t, cond = torch.randn(5, 3), torch.rand(5) * 0.5, {"cls": torch.tensor([0, 1, 0, 1, 2])}
    half = torch.tensor([0.25, 0.125, 0.0625, 0.25, 0.5])
    target = objective.consistency_target(model, z, t, half, cond)
    # two Euler steps of size `half` with the model's slope for that step size...
    h = half[:, None]
    z1 = z + h * model(z, t, cond, half)
    z2 = z1 + h * model(z1, t + half, cond, half)
    # ...land where one step of 2 * half with the target does
    torch.testing.assert_close(z + 2 * h * target, z2)
    # the finest half step (2^-levels) is the flow-matching velocity, d = 0
    finest = torch.full((5,), 2.0**-5)
    v1 = model(z, t, cond, torch.zeros(5))
    v2 = model(z + finest[:, None] * v1, t + finest, cond, torch.zeros(5))
    torch.testing.assert_close(objective.consistency_target(model, z, t, finest, cond), (v1 + v2) / 2)


def test_shortcut_consistency_rows_regress_on_their_target_and_the_rest_is_flow_matching():
    model = randomize(MLP(dim=2, width=16, second_time=True))
    objective = Shortcut(fraction=1.0, levels=3)
    batch = {"latent": torch.randn(64, 2)}
    kw = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    per, t = objective.loss(model, batch, RowDraws(5, 0, 64), **kw)
    # the pairs: the step's first two streams, noise then the coupling (exact OT: the generator does not matter)
    x0 = MinibatchOT()(RowDraws(5, 0, 64).normal((2,)), batch["latent"])[0]
    z = x0 + t[:, None] * (batch["latent"] - x0)
    # every row is a consistency row at one full step 2^-j on that step's grid: find the j that reproduces it
    matched = torch.zeros(64, dtype=torch.bool)
    for j in range(3):
        full = torch.full((64,), 0.5**j)
        on_grid = torch.isclose(t / full, torch.round(t / full)) & (t + full <= 1)
        target = objective.consistency_target(model, z, t, full / 2, {})
        loss = ((model(z, t, {}, full) - target) ** 2).mean(1)
        matched |= on_grid & torch.isclose(loss, per.detach(), rtol=1e-5, atol=1e-7)
    assert bool(matched.all())
    # fraction 0 is flow matching (d = 0)
    fm, _ = FlowMatching().loss(model, batch, RowDraws(5, 0, 64), **kw)
    sc, _ = Shortcut(fraction=0.0).loss(model, batch, RowDraws(5, 0, 64), **kw)
    torch.testing.assert_close(sc, fm)


def test_shortcut_samples_with_its_step_size_and_refuses_ema_targets_without_ema():
    model = randomize(MLP(dim=2, width=16, second_time=True))
    x0 = torch.randn(7, 2)
    one = Shortcut().sample(model, x0, num_steps=1)
    torch.testing.assert_close(one, x0 + model(x0, torch.zeros(7), {}, torch.ones(7)))
    two = Shortcut().sample(model, x0, num_steps=2)
    mid = x0 + 0.5 * model(x0, torch.zeros(7), {}, torch.full((7,), 0.5))
    torch.testing.assert_close(two, mid + 0.5 * model(mid, torch.full((7,), 0.5), {}, torch.full((7,), 0.5)))
    assert Shortcut().nfe(None, 4) == 4
    with pytest.raises(ValueError, match=r"rfkit\.ema\.EMA"):
        Shortcut(targets="ema").bind_ema(None)
    Shortcut().bind_ema(None)  # current targets need no EMA


def test_shortcut_ema_targets_come_from_the_swapped_in_weights():
    import contextlib

    live, average = (
        randomize(MLP(dim=2, width=16, second_time=True)),
        randomize(MLP(dim=2, width=16, second_time=True), 1),
    )

    @contextlib.contextmanager
    def swapped():  # what EMA.swapped does: the averages in the live module's parameters, restored after
        kept = copy.deepcopy(live.state_dict())
        live.load_state_dict(average.state_dict())
        yield
        live.load_state_dict(kept)

    objective = Shortcut(targets="ema")
    objective.bind_ema(swapped)
    z, t, half = torch.randn(6, 2), torch.rand(6) * 0.5, torch.full((6,), 0.25)
    torch.testing.assert_close(
        objective.consistency_target(live, z, t, half, {}), Shortcut().consistency_target(average, z, t, half, {})
    )
    assert not torch.equal(live.inp.weight, average.inp.weight)  # restored


def test_shortcut_with_ema_targets_trains_end_to_end(tmp_path):
    from pathlib import Path

    from rfkit.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy2d_shortcut.yaml"
    tiny = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--data.init_args.batches_per_epoch=3"]
    tiny += ["--data.init_args.val_size=64", "--trainer.enable_progress_bar=false", "--model.objective.targets=ema"]
    with pytest.raises(ValueError, match="no EMA"):  # the toy config keeps none: refused at fit start
        main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path / 'a'}", *tiny])
    main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path / 'b'}", *tiny,
          "--trainer.callbacks+=rfkit.ema.EMA", "--trainer.callbacks.decay=0.5"])  # fmt: skip
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").exists()


MEANFLOW = ["--trainer.max_steps=3", "--model.objective=MeanFlow", "--model.objective.ratio=0.5"]
MEANFLOW += ["--model.model.init_args.second_time=true", "--trainer.val_check_interval=3"]


@pytest.mark.slow  # several minutes of 2-process runs: tools/test.sh -m slow
def test_meanflow_under_ddp_trains_like_one_process_on_the_global_batch(tmp_path):
    # 2 gloo ranks x 32 rows against 1 process x 64: the JVP runs on the inner model (Lightning calls
    # training_step through the DDP wrapper, and the module calls self.model), so DDP's gradient
    # all-reduce sees the JVP's backward like any other; the weights must agree
    from test_scale import assert_same_weights, run, weights

    run("digits_ddp.yaml", tmp_path / "one", *MEANFLOW, processes=1)
    run("digits_ddp.yaml", tmp_path / "ddp", *MEANFLOW)
    one, ddp = tmp_path / "one/checkpoints/last.ckpt", tmp_path / "ddp/checkpoints/last.ckpt"
    assert_same_weights(weights(ddp), weights(one))  # the trained weights and their EMA (ema/<name>)
    # and the second-time embedding trained (it starts at zero)
    assert weights(one)["model.r_embed.mlp.2.weight"].abs().max() > 0


@pytest.mark.slow  # several minutes of 2-process runs: tools/test.sh -m slow
def test_meanflow_under_fsdp2_trains_like_one_process_on_the_global_batch(tmp_path):
    # FSDP2 gathers each block's parameters in forward hooks; the JVP's tangents flow through the
    # gathered weights like the activations do, and the backward reduce-scatters as usual
    from test_scale import assert_same_weights, run, weights

    meanflow = [*MEANFLOW, "--model.activation_checkpointing=false"]  # refused with the JVP (see above)
    run("digits_fsdp.yaml", tmp_path / "one", *meanflow, "--trainer.devices=1", "--trainer.strategy=auto", processes=1)
    run("digits_fsdp.yaml", tmp_path / "fsdp", *meanflow)
    assert_same_weights(
        weights(tmp_path / "fsdp/checkpoints/last.ckpt"), weights(tmp_path / "one/checkpoints/last.ckpt")
    )


# --------------------------------------------------------------------------------------------
# Sampling follows the objective
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["MeanFlow", "Shortcut"])
def test_sampling_from_a_checkpoint_jumps_and_reports_its_nfe(objective, tmp_path):
    import json
    from pathlib import Path

    import numpy as np

    import rfkit
    from rfkit.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / f"toy2d_{objective.lower()}.yaml"
    tiny = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--data.init_args.batches_per_epoch=3"]
    tiny += ["--data.init_args.val_size=64", "--trainer.enable_progress_bar=false"]
    main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", *tiny])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    main(["sample", f"--ckpt={ckpt}", f"--out={tmp_path / 's'}", "--num_samples=20", "--num_steps=2", "--solver=RK4"])
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["nfe"] == 2 and stats["objective"].startswith(objective)  # 2 jumps; the solver plays no part
    module = rfkit.load_checkpoint(ckpt)
    x0 = torch.from_numpy(np.load(tmp_path / "s" / "noise.npy"))
    model, n = module.model, x0.shape[0]
    with torch.no_grad():  # two jumps of 1/2, by hand
        mid = x0 + 0.5 * model(x0, torch.zeros(n), {}, torch.full((n,), 0.5))
        end = mid + 0.5 * model(mid, torch.full((n,), 0.5), {}, torch.full((n,), 0.5))
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "s" / "samples.npy")), end)
