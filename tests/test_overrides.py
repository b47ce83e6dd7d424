"""Lightning hooks are marked ``@override`` (docs/design.md §7), and every marked method overrides one.

A misspelt hook (``on_train_epoch_ends``) is never called, silently. Marking each override makes the
mistake findable: this test fails on a marked method that overrides nothing, and on a method that
overrides a Lightning one without saying so.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import rfkit


def _rfkit_classes() -> list[type]:
    classes = {}
    for info in pkgutil.walk_packages(rfkit.__path__, "rfkit."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name:
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [classes[k] for k in sorted(classes)]


def _lightning_bases(cls: type) -> list[type]:
    return [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in ("lightning", "pytorch_lightning")]


CLASSES = [c for c in _rfkit_classes() if _lightning_bases(c)]


def test_there_are_lightning_subclasses_to_check():
    names = {c.__name__ for c in CLASSES}
    assert {"RectifiedFlow", "SampleGrid", "LatentShards", "RFKitCLI"} <= names


def override_problems(cls: type) -> list[str]:
    """Methods of ``cls`` marked @override that override nothing, and Lightning overrides not marked."""
    bases = _lightning_bases(cls)
    problems = []
    for name, member in vars(cls).items():
        if not inspect.isfunction(member) or name.startswith("__"):
            continue
        overrides = any(hasattr(b, name) for b in cls.__mro__[1:] if b is not object)
        marked = getattr(member, "__override__", False)
        if marked and not overrides:
            problems.append(f"{cls.__qualname__}.{name} is marked @override but overrides nothing")
        if not marked and any(name in vars(b) for b in bases):
            problems.append(f"{cls.__qualname__}.{name} overrides a Lightning method: mark it @override")
    return problems


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_lightning_overrides_are_marked_and_real(cls):
    assert override_problems(cls) == []


def test_a_misspelt_hook_and_an_unmarked_one_are_found():
    from lightning.pytorch import Callback
    from typing_extensions import override

    class Typo(Callback):
        @override
        def on_train_epoch_ends(self, trainer, pl_module): ...

        def on_fit_start(self, trainer, pl_module): ...

    assert override_problems(Typo) == [
        "test_a_misspelt_hook_and_an_unmarked_one_are_found.<locals>.Typo.on_train_epoch_ends is marked @override "
        "but overrides nothing",
        "test_a_misspelt_hook_and_an_unmarked_one_are_found.<locals>.Typo.on_fit_start overrides a Lightning "
        "method: mark it @override",
    ]
