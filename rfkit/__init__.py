"""rfkit: rectified-flow / flow-matching training in a latent space, with PyTorch Lightning.

The core math (``rfkit.timesteps``, ``rfkit.couplings``, ``rfkit.weightings``, ``rfkit.paths``,
``rfkit.solvers``) is pure torch; importing ``rfkit`` does not import Lightning.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the RectifiedFlow stored by ``rfkit fit`` at ``path`` (see :mod:`rfkit.checkpoint`)."""
    from rfkit.checkpoint import load_checkpoint as _load

    return _load(path, map_location)
