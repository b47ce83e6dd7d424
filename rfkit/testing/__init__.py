"""Contract checks for plugins: call them from your own tests, one per axis.

Each check runs the named rules every implementation of an axis must keep (docs/design.md §3), in
order, and raises ``AssertionError`` naming the plugin, the rule it broke and what was seen, so it
works with plain ``assert``-style test runners and with pytest alike::

    from rfkit.testing import check_coupling, check_objective, check_sampler

    def test_my_sampler():
        check_sampler(MySampler(k=3))

    def test_my_coupling():
        check_coupling(MyCoupling(), permutation=True)

One module per axis (``rfkit.testing.timesteps``, ``.couplings``, ``.weightings``, ``.solvers``,
``.objectives``) holds its rules and its check. The rules of each axis are listed in
``SAMPLER_RULES``, ``COUPLING_RULES``, ``WEIGHTING_RULES``, ``SOLVER_RULES`` and ``OBJECTIVE_RULES``
(each rule a function whose name is the rule's name and whose docstring states it).
rfkit's own built-ins pass through the same checks in its test suite. The statistical checks use
fixed seeds, so a given plugin passes or fails deterministically; a correct sampler fails the KS
test at one seed in a thousand (``alpha``), and ``seed`` picks another draw.
"""

from rfkit.testing.couplings import COUPLING_RULES, check_coupling
from rfkit.testing.objectives import OBJECTIVE_RULES, check_objective
from rfkit.testing.solvers import SOLVER_RULES, check_solver
from rfkit.testing.timesteps import SAMPLER_RULES, check_sampler
from rfkit.testing.weightings import WEIGHTING_RULES, check_weighting

__all__ = [
    "COUPLING_RULES",
    "OBJECTIVE_RULES",
    "SAMPLER_RULES",
    "SOLVER_RULES",
    "WEIGHTING_RULES",
    "check_coupling",
    "check_objective",
    "check_sampler",
    "check_solver",
    "check_weighting",
]
