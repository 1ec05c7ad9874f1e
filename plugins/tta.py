"""Test-time augmentation views: ``view(images) -> images`` on float (B, 3, H, W) in [0, 1].

Predictions are merged over the views (mean of probabilities or of logits: ``tta_merge``). Views:

- the dihedral group D4 (``identity``, ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``,
  ``transpose``, ``antitranspose``; the group ``d4``): flips and 90-degree rotations, exact on
  the pixel grid, as in rotation-invariant TTA for overhead and microscopy images (Dieleman et al.
  2015, "Rotation-invariant convolutional neural networks for galaxy morphology prediction");
- crops of the eval batch resized back to its size (``crop``; the groups ``five_crop`` and
  ``ten_crop``, the four corners and the centre, and their mirror images: Krizhevsky et al. 2012,
  "ImageNet Classification with Deep Convolutional Neural Networks");
- other test sizes (``scale``; the group ``multiscale``): dense multi-scale evaluation (Simonyan &
  Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition") and
  FixRes (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"): a model with
  global pooling trained on random-resized crops sees objects larger than a centre crop shows
  them, so testing at a larger size than training helps. Resizing happens on the device.

A factory returns one view, or a list of views for a group. Views are frozen dataclasses: equal
views (``hflip`` alone and inside ``d4``) are one view, predicted once. Plain torch, no kornia.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from competition import hookimpl
from competition.errors import ConfigError, reject_unknown_params

POSITIONS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class D4:
    """An element of the dihedral group D4: ``k`` quarter turns, then a mirror if ``flip``."""

    k: int = 0
    flip: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.k == 2 and self.flip:  # vflip, without the rotation's copy
            return images.flip(-2)
        out = torch.rot90(images, self.k, dims=(-2, -1)) if self.k % 4 else images
        return out.flip(-1) if self.flip else out


#: The eight elements of D4 by name (transpose mirrors along the main diagonal).
D4_NAMES = {
    "identity": D4(0, False),
    "hflip": D4(0, True),
    "vflip": D4(2, True),
    "rot90": D4(1, False),
    "rot180": D4(2, False),
    "rot270": D4(3, False),
    "transpose": D4(3, True),
    "antitranspose": D4(1, True),
}


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class Scale:
    """Resize to ``size`` (int: square; [h, w]) or by ``factor`` (antialiased bilinear)."""

    size: tuple[int, int] | None = None
    factor: float | None = None

    def __post_init__(self):
        size, factor = self.size, self.factor
        if (size is None) == (factor is None):
            raise ConfigError(
                "TTA view 'scale': give exactly one of size (e.g. size: 256) or factor "
                "(e.g. factor: 1.15)"
            )
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
            ):
                raise ConfigError(f"TTA view 'scale': size={size!r} must be an int or [h, w] > 0")
            object.__setattr__(self, "size", size)
        if factor is not None and not (isinstance(factor, int | float) and factor > 0):
            raise ConfigError(f"TTA view 'scale': factor={factor} must be > 0")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            size = self.size
        else:
            height, width = images.shape[-2:]
            size = (max(1, round(height * self.factor)), max(1, round(width * self.factor)))
        return _resize(images, size)


@dataclass(frozen=True)
class Crop:
    """A crop of ``fraction`` of each side at ``position``, resized back to the batch's size,
    mirrored if ``flip`` (one of the ten crops of Krizhevsky et al. 2012)."""

    position: str = "center"
    fraction: float = 0.875
    flip: bool = False

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ConfigError(
                f"TTA view 'crop': position={self.position!r} must be one of {', '.join(POSITIONS)}"
            )
        if not (isinstance(self.fraction, int | float) and 0 < self.fraction <= 1):
            raise ConfigError(
                f"TTA view 'crop': fraction={self.fraction} must be in (0, 1], e.g. 0.875"
            )
        if not isinstance(self.flip, bool):
            raise ConfigError(f"TTA view 'crop': flip={self.flip!r} must be true or false")

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of this crop in an image of that size."""
        ch, cw = max(1, round(height * self.fraction)), max(1, round(width * self.fraction))
        vertical, _, horizontal = self.position.partition("_")
        if self.position == "center":
            top, left = (height - ch) // 2, (width - cw) // 2
        else:
            top = 0 if vertical == "top" else height - ch
            left = 0 if horizontal == "left" else width - cw
        return top, left, ch, cw

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        top, left, ch, cw = self.box(height, width)
        out = _resize(images[..., top : top + ch, left : left + cw], (height, width))
        return out.flip(-1) if self.flip else out


def five_crop(fraction: float = 0.875) -> list[Crop]:
    """The centre and the four corner crops."""
    return [Crop(position, fraction) for position in POSITIONS]


def ten_crop(fraction: float = 0.875) -> list[Crop]:
    """The five crops and their mirror images."""
    return five_crop(fraction) + [Crop(position, fraction, True) for position in POSITIONS]


def multiscale(factors: list[float] | None = None, sizes: list[int] | None = None) -> list:
    """The batch at several sizes (default factors 1, 1.15, 1.3: FixRes tests larger).

    Factor 1 is the identity view (so it is predicted once beside ``identity``).
    """
    if factors is not None and sizes is not None:
        raise ConfigError("TTA view 'multiscale': give factors or sizes, not both")
    if sizes is not None:
        return [Scale(size=s) for s in _nonempty_list("sizes", sizes)]
    factors = _nonempty_list("factors", factors or [1.0, 1.15, 1.3])
    return [D4() if f == 1 else Scale(factor=f) for f in factors]


def _nonempty_list(key: str, value) -> list:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"TTA view 'multiscale': {key}={value!r} must be a non-empty list")
    return list(value)


def _checked(name: str, build, valid: tuple[str, ...]):
    def factory(**params):
        reject_unknown_params(f"TTA view '{name}'", params, valid)
        return build(**params)

    factory.__name__ = f"{name}_factory"
    factory.__doc__ = build.__doc__ if callable(build) else None
    return factory


def _element(name: str):
    element = D4_NAMES[name]
    return _checked(name, lambda: element, ())


@hookimpl
def competition_register_tta():
    return {
        **{name: _element(name) for name in D4_NAMES},
        "d4": _checked("d4", lambda: list(D4_NAMES.values()), ()),
        "scale": _checked("scale", Scale, ("size", "factor")),
        "multiscale": _checked("multiscale", multiscale, ("factors", "sizes")),
        "crop": _checked("crop", Crop, ("position", "fraction", "flip")),
        "five_crop": _checked("five_crop", five_crop, ("fraction",)),
        "ten_crop": _checked("ten_crop", ten_crop, ("fraction",)),
    }
