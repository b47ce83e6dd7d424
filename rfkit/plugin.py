"""What every plugin shares: it prints as the constructor call that built it.

Configs, logs, error messages and ``rfkit.testing`` name plugins by ``repr``; ``<object at 0x...>``
says nothing. Every axis's abstract base class derives from :class:`Plugin`, so every built-in and
every third-party plugin prints as ``LogitNormal(loc=0.0, scale=1.0)`` without writing a
``__repr__``: the arguments its constructor was called with, defaults included, are recorded when
it is built (``eval(repr(p))`` builds an equal plugin where the arguments' own reprs allow it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["Plugin"]


def _recording(init: Callable[..., None]) -> Callable[..., None]:
    """``init``, which first records its bound arguments on the instance (the outermost call wins)."""
    signature = inspect.signature(init)

    @functools.wraps(init)  # keeps the signature and docstring that jsonargparse reads
    def wrapped(self, *args: Any, **kwargs: Any) -> None:
        if "_init_args" not in self.__dict__:  # a subclass's __init__ calling super().__init__ keeps its own record
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                pass  # the call itself raises it, with Python's message
            else:
                bound.apply_defaults()
                self._init_args = dict(list(bound.arguments.items())[1:])
        init(self, *args, **kwargs)

    return wrapped


class Plugin:
    """Base of the plugin axes' ABCs: ``repr`` is ``ClassName(arg=value, ...)`` from the constructor call."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__dict__["__init__"])

    def __repr__(self) -> str:
        args = self.__dict__.get("_init_args", {})  # nothing recorded: a class without constructor arguments
        return f"{type(self).__name__}({', '.join(f'{name}={value!r}' for name, value in args.items())})"
