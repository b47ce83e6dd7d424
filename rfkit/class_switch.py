"""What a config says is what runs: a component whose class changes starts from the new class's defaults.

jsonargparse, under LightningCLI, merges configuration in layers (the signature defaults, each
``--config`` file, each command-line argument). When a layer names a different ``class_path`` for a
component, jsonargparse keeps every argument of the previous class that the new class also accepts,
by design (its maintainer explains why in jsonargparse issue #460). In rfkit that silently changed
recipes: ``torch.optim.Adam`` in a YAML kept ``weight_decay=0.01`` from ``AdamW``, the module's
default optimizer, and ``--model.timesteps ModeSampler`` kept ``scale=1.0`` from the YAML's
``LogitNormal``, where ``ModeSampler``'s own default is 1.29.

rfkit's rule instead: switching a component's class, anywhere (model, sampler, coupling, weighting,
solver, optimizer, scheduler, data, trainer callbacks, logger), gives the new class its own
defaults plus exactly the arguments written for it *after* the switch, in the same layer or a later
one. An argument the new class does not take is an error naming it (jsonargparse's own check).

jsonargparse has one function that decides what survives a switch; :func:`class_switch_resets`
swaps it for one that keeps nothing while rfkit parses. It is the only place rfkit reaches into
jsonargparse's internals, and ``tests/test_class_switch.py`` fails if a jsonargparse release moves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from jsonargparse import _typehints

__all__ = ["class_switch_resets"]

_HOOK = "discard_init_args_on_class_path_change"


def _same_class(a: str | None, b: str | None) -> bool:
    """Whether two import paths name one class (``torch.optim.AdamW`` is ``torch.optim.adamw.AdamW``)."""
    if a == b:
        return True
    try:
        return _typehints.import_object(a) is _typehints.import_object(b)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False


def _discard_all(parser_or_action, prev_val, value) -> None:
    """On a class switch, drop every argument of the previous class from ``prev_val`` (in place)."""
    del parser_or_action  # the original uses it to test which arguments the new class accepts
    if not prev_val or "init_args" not in prev_val or _same_class(prev_val["class_path"], value["class_path"]):
        return
    args = prev_val["init_args"]
    for key in list(args.keys() if isinstance(args, dict) else vars(args)):
        args.pop(key, None)


@contextmanager
def class_switch_resets() -> Iterator[None]:
    """Within this context, a class switch keeps none of the previous class's arguments.

    Raises:
        RuntimeError: if the installed jsonargparse no longer has the function this replaces.
    """
    original = getattr(_typehints, _HOOK, None)
    if original is None:
        raise RuntimeError(
            f"this jsonargparse has no _typehints.{_HOOK}, which rfkit replaces so that a class switch in a "
            "config starts from the new class's defaults; install a jsonargparse that rfkit's tests passed with "
            "(see pyproject.toml), or report the new version to rfkit"
        )
    setattr(_typehints, _HOOK, _discard_all)
    try:
        yield
    finally:
        setattr(_typehints, _HOOK, original)
