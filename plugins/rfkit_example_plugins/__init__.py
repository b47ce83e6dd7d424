"""Example rfkit plugins, one per axis, each a class that subclasses an rfkit ABC.

Importing this package (which ``rfkit`` does through the ``rfkit.plugins`` entry point) imports
every plugin module, so each class resolves by its short name in configs and on the command line.
"""

from __future__ import annotations

from rfkit_example_plugins.couplings import WithinClassOT
from rfkit_example_plugins.samplers import Beta
from rfkit_example_plugins.solvers import RK3
from rfkit_example_plugins.weightings import P2Weight

__all__ = ["RK3", "Beta", "P2Weight", "WithinClassOT"]
