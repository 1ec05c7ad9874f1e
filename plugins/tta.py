"""Test-time augmentation views: ``view(images) -> images`` on float (B, 3, H, W) in [0, 1].

Predictions are averaged over the views. Multi-scale views follow Simonyan & Zisserman 2015, "Very
Deep Convolutional Networks for Large-Scale Image Recognition" (dense multi-scale evaluation), and
Touvron et al. 2019, "Fixing the train-test resolution discrepancy" (FixRes): a model with global
pooling can be evaluated at another size. Every view is deterministic. Plain torch, no kornia.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from competition import hookimpl
from competition.errors import ConfigError


class Identity:
    """The images as they are."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Flip:
    """Mirror along ``dim`` (-1: horizontal, -2: vertical)."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(self.dim)


class Scale:
    """Resize to ``size`` (int: square; [h, w]) or by ``factor`` (antialiased bilinear)."""

    def __init__(self, size: int | list[int] | None = None, factor: float | None = None):
        if (size is None) == (factor is None):
            raise ConfigError(
                "TTA view 'scale': give exactly one of size (e.g. size: 256) or factor "
                "(e.g. factor: 1.15)"
            )
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                raise ConfigError(f"TTA view 'scale': size={size!r} must be an int or [h, w] > 0")
        if factor is not None and not factor > 0:
            raise ConfigError(f"TTA view 'scale': factor={factor} must be > 0")
        self.size, self.factor = size, factor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            size = self.size
        else:
            height, width = images.shape[-2:]
            size = (max(1, round(height * self.factor)), max(1, round(width * self.factor)))
        if tuple(images.shape[-2:]) == size:
            return images
        out = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.clamp_(0.0, 1.0)


def _identity() -> Identity:
    return Identity()


def _hflip() -> Flip:
    return Flip(-1)


def _vflip() -> Flip:
    return Flip(-2)


def _checked(name: str, build, valid: tuple[str, ...]):
    def factory(**params):
        unknown = [key for key in params if key not in valid]
        if unknown:
            raise ConfigError(
                f"TTA view '{name}': unknown parameter(s) {', '.join(map(repr, unknown))}. "
                f"Valid parameters: {', '.join(valid) or '(none)'}"
            )
        return build(**params)

    factory.__name__ = f"{name}_factory"
    return factory


@hookimpl
def competition_register_tta():
    return {
        "identity": _checked("identity", _identity, ()),
        "hflip": _checked("hflip", _hflip, ()),
        "vflip": _checked("vflip", _vflip, ()),
        "scale": _checked("scale", Scale, ("size", "factor")),
    }
