"""A K-fold cross-validation template for image-classification competitions.

Plugins implement the hooks in :mod:`competition.hookspecs` and mark them with :data:`hookimpl`.
"""

import os

import pluggy

# albumentations asks PyPI for a newer version on every import; nothing may reach the network
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

PROJECT = "competition"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

__all__ = ["PROJECT", "__version__", "hookimpl", "hookspec"]
