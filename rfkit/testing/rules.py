"""What the contract checks of every axis share: a rule is a function ``rule(plugin, ctx)`` that
raises :class:`Broken` saying what it saw; :func:`run_rules` names the plugin and the rule it broke."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class Broken(Exception):
    """A rule saw a violation; :func:`run_rules` turns it into an AssertionError naming plugin and rule."""


def require(ok: bool, plugin: object, what: str) -> None:
    del plugin  # named by run_rules, with the rule
    if not ok:
        raise Broken(what)


Rule = Callable[..., None]


def run_rules(plugin: object, rules: Sequence[Rule], *args: Any) -> None:
    """Run ``rule(plugin, *args)`` for each rule in order; the first broken one raises AssertionError
    ``"<repr> breaks the rule '<name>': <what was seen>"``."""
    for rule in rules:
        try:
            rule(plugin, *args)
        except Broken as err:
            raise AssertionError(f"{plugin!r} breaks the rule {rule.__name__!r}: {err}") from None


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rng_untouched(plugin: object, call) -> object:
    """Run ``call()`` and require that it left torch's global RNG as it was (it must use its generator)."""
    state = torch.get_rng_state()
    out = call()
    require(
        torch.equal(state, torch.get_rng_state()),
        plugin,
        "given a generator, it drew from torch's global RNG too; draw only from `generator` so runs reproduce",
    )
    return out
