"""Every plugin prints as the constructor call that built it, built-in or third-party."""

from __future__ import annotations

import inspect

import pytest

import rfkit.couplings
import rfkit.objectives
import rfkit.solvers
import rfkit.timesteps
import rfkit.weightings
from rfkit.plugin import Plugin

MODULES = (rfkit.timesteps, rfkit.couplings, rfkit.weightings, rfkit.solvers, rfkit.objectives)
BUILT_INS = sorted(
    (
        cls
        for module in MODULES
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, Plugin) and not inspect.isabstract(cls)
    ),
    key=lambda cls: cls.__name__,
)
NAMESPACE = {cls.__name__: cls for cls in BUILT_INS}
# arguments that differ from the defaults, for the classes that take any (the rest take none)
ARGUMENTS = {
    "LogitNormal": {"loc": 0.5, "scale": 1.5},
    "ModeSampler": {"scale": 0.81},
    "UShaped": {"a": 2.5},
    "Shifted": {"base": rfkit.timesteps.LogitNormal(0.5, 1.5), "shift": 2.0},
    "ResolutionShifted": {"base": rfkit.timesteps.CosMap(), "num_tokens": 1024, "max_shift": 1.2},
    "MinibatchOT": {"method": "sinkhorn", "reg": 0.1, "across_ranks": True},
    "Constant": {"value": 2.0},
    "SigmaSqrt": {"max_weight": 50.0},
    "MinSNR": {"gamma": 3.0},
    "Shortcut": {"fraction": 0.5, "levels": 5, "targets": "current"},
    "MeanFlow": {"ratio": 0.5, "power": 0.5, "eps": 0.01, "guidance": 2.0, "guidance_mix": 0.5},
    "DensityWeighting": {"sampler": rfkit.timesteps.ModeSampler(1.1)},
}


def test_the_list_covers_every_built_in_with_arguments():
    takes_arguments = {c.__name__ for c in BUILT_INS if len(inspect.signature(c).parameters) > 0}
    assert takes_arguments == set(ARGUMENTS)


@pytest.mark.parametrize("cls", BUILT_INS, ids=lambda c: c.__name__)
def test_repr_names_the_class_and_every_argument_and_rebuilds_it(cls):
    given = ARGUMENTS.get(cls.__name__, {})
    plugin = cls(**given)
    text = repr(plugin)
    parameters = inspect.signature(cls).parameters
    assert text.startswith(f"{cls.__name__}(") and "object at 0x" not in text
    for name in parameters:  # defaults included
        assert f"{name}=" in text, (name, text)
    for name, value in given.items():
        assert f"{name}={value!r}" in text
    rebuilt = eval(text, NAMESPACE)
    assert type(rebuilt) is cls and repr(rebuilt) == text


def test_a_third_party_plugin_gets_it_without_writing_one():
    class Triangular(rfkit.timesteps.TimestepSampler):
        def __init__(self, mode: float = 0.5, *, width: float = 1.0) -> None:
            self._m, self._w = mode, width  # attribute names need not match the arguments

        def __call__(self, n, *, device=None, generator=None): ...

        def density(self, t): ...

    class Narrow(Triangular):
        def __init__(self, mode: float = 0.3) -> None:
            super().__init__(mode, width=0.1)

    assert repr(Triangular(0.2)) == "Triangular(mode=0.2, width=1.0)"
    assert repr(Narrow()) == "Narrow(mode=0.3)"  # its own constructor call, not its parent's
    assert inspect.signature(Triangular).parameters["width"].kind is inspect.Parameter.KEYWORD_ONLY  # still readable
