"""Objectives: the rules every :class:`~rfkit.objectives.Objective` keeps, and
:func:`check_objective`."""

from __future__ import annotations

import torch

from rfkit.couplings import MinibatchOT
from rfkit.draws import RowDraws
from rfkit.models import MLP
from rfkit.objectives import Objective
from rfkit.solvers import Euler
from rfkit.testing.rules import Rule, gen, require, rng_untouched, run_rules
from rfkit.timesteps import Uniform


def is_an_objective(objective, ctx) -> None:
    """It subclasses :class:`rfkit.objectives.Objective`, and its ``setup`` accepts a model with a second time."""
    require(isinstance(objective, Objective), objective, "it must subclass rfkit.objectives.Objective")
    objective.setup(ctx["model"])


def loss_is_a_finite_per_sample_loss_from_the_draws(objective, ctx) -> None:
    """``loss`` returns (per_sample, t), both (n,), finite, the loss >= 0 with finite gradients on the weights
    and t in [0, 1]; the step's draws alone decide it (same draws, same loss; the global RNG untouched), with
    and without label dropout, under a minibatch-OT coupling."""
    model, batch, n, seed = ctx["model"], ctx["batch"], ctx["n"], ctx["seed"]
    axes = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    for dropout in (0.0, 0.5):

        def call(d=dropout):
            return objective.loss(model, batch, RowDraws(seed, 0, n), cond_dropout=d, **axes)

        out = rng_untouched(objective, call)
        require(isinstance(out, tuple) and len(out) == 2, objective, "loss must return (per_sample, t)")
        per, t = out
        require(
            per.shape == (n,) and t.shape == (n,),
            objective,
            f"per_sample and t must be ({n},), got {tuple(per.shape)}, {tuple(t.shape)}",
        )
        require(bool(torch.isfinite(per).all()) and bool((per >= 0).all()), objective, "the loss must be finite, >= 0")
        require(bool(((t >= 0) & (t <= 1)).all()), objective, "timesteps must lie in [0, 1]")
        require(torch.equal(per.detach(), call()[0].detach()), objective, "the same draws must give the same loss")
        model.zero_grad()
        per.mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        require(
            bool(grads) and all(bool(torch.isfinite(x).all()) for x in grads),
            objective,
            "the loss must have finite gradients on the weights",
        )


def fixed_t_comes_back(objective, ctx) -> None:
    """Given fixed t (validation), ``loss`` returns those t and a finite (n,) loss."""
    fixed = torch.linspace(0.05, 0.95, ctx["n"])
    axes = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    per, t = objective.loss(ctx["model"], ctx["batch"], RowDraws(ctx["seed"], 0, ctx["n"]), t=fixed, **axes)
    require(torch.equal(t, fixed), objective, "given fixed t, loss must return those t")
    require(per.shape == fixed.shape and bool(torch.isfinite(per).all()), objective, "the fixed-t loss must be finite")


def sample_spends_what_nfe_says(objective, ctx) -> None:
    """``sample`` returns x0's shape and dtype, finite, leaves x0 alone, and calls the network exactly
    ``nfe(solver, steps)`` times."""
    model, calls = ctx["model"], [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x0 = torch.randn(8, 2, generator=gen(ctx["seed"]))
    kept = x0.clone()
    try:
        for steps in (1, 3):
            calls[0] = 0
            with torch.no_grad():
                x1 = objective.sample(model, x0, {"cls": torch.arange(8) % 3}, solver=Euler(), num_steps=steps)
            require(torch.equal(x0, kept), objective, "sample modified x0 in place")
            require(x1.shape == x0.shape and x1.dtype == x0.dtype, objective, "samples must have x0's shape and dtype")
            require(bool(torch.isfinite(x1).all()), objective, "samples must be finite")
            require(
                calls[0] == objective.nfe(Euler(), steps),
                objective,
                f"nfe(Euler(), {steps}) = {objective.nfe(Euler(), steps)}, but sample made {calls[0]} network calls",
            )
    finally:
        handle.remove()


OBJECTIVE_RULES: tuple[Rule, ...] = (
    is_an_objective,
    loss_is_a_finite_per_sample_loss_from_the_draws,
    fixed_t_comes_back,
    sample_spends_what_nfe_says,
)


def check_objective(objective: Objective, *, n: int = 32, seed: int = 0) -> None:
    """Check a :class:`~rfkit.objectives.Objective` against :data:`OBJECTIVE_RULES`, on a small
    class-conditional MLP with a second time (random weights, so the second time matters)."""
    torch.manual_seed(seed)
    model = MLP(dim=2, width=16, depth=2, num_classes=3, second_time=True)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g = gen(seed)
    batch = {"latent": torch.randn(n, 2, generator=g) + 2, "cls": torch.randint(0, 3, (n,), generator=g)}
    run_rules(objective, OBJECTIVE_RULES, {"model": model, "batch": batch, "n": n, "seed": seed})
