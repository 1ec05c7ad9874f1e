"""Per-sample CPU transforms: every albumentations transform by its class name, plus ``CenterCrop``.

Albumentations: Buslaev et al. 2020, "Albumentations: Fast and Flexible Image Augmentations".

``factory(image_size, **params)`` builds one transform, ``t(image) -> image`` on HWC uint8 numpy
arrays, reproducible through ``t.set_seed(seed)``. The factory fills in ``size=(image_size,
image_size)`` (or ``height``/``width``, or ``max_size`` for Longest/SmallestMaxSize) when the
transform takes it and the config does not give it, and turns YAML lists into tuples.

Images reach the pipeline decoded into a square uint8 cache of side ``round(image_size /
crop_pct)``, the centre crop of the original. Our ``CenterCrop`` (it replaces albumentations' own)
crops the central ``image_size / side`` of whatever square arrives (all of it when smaller), or
the central ``crop_pct`` when given, and resizes to exactly ``image_size``: the eval pipeline
``[CenterCrop]`` works for any cache side, FixRes evaluation at a larger size included, and is
deterministic.

Every pipeline (the list under ``augment.train`` or ``augment.eval``) must end at exactly
``image_size x image_size``; the core checks the first image of each pipeline and names the
pipeline when it does not (e.g. ``[HorizontalFlip]`` alone keeps the cache side).

Not offered (they cannot run on a lone uint8 image): 3D transforms, those that need boxes, masks or
metadata (``BBoxSafeRandomCrop``, ``MaskDropout``, ``FDA``, ``Mosaic``, ...), those that leave
uint8 (``Normalize``, ``ToFloat``, ``FromFloat``, ``ToTensorV2``: the model normalises itself)
and ``Lambda``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from competition import hookimpl
from competition.errors import ConfigError, PluginError, reject_unknown_params

#: Albumentations classes that cannot be a step of our pipelines, with the reason.
EXCLUDED = {
    "BasicTransform": "an abstract base",
    "DualTransform": "an abstract base",
    "ImageOnlyTransform": "an abstract base",
    "AtLeastOneBBoxRandomCrop": "needs bounding boxes",
    "BBoxSafeRandomCrop": "needs bounding boxes",
    "RandomSizedBBoxSafeCrop": "needs bounding boxes",
    "RandomCropNearBBox": "needs a cropping box",
    "CropNonEmptyMaskIfExists": "needs a mask",
    "MaskDropout": "needs a mask",
    "FDA": "needs reference-image metadata",
    "HistogramMatching": "needs reference-image metadata",
    "PixelDistributionAdaptation": "needs reference-image metadata",
    "Mosaic": "needs mosaic metadata",
    "OverlayElements": "needs overlay metadata",
    "TextImage": "needs text metadata and a font",
    "Normalize": "returns float; the model normalises itself",
    "ToFloat": "returns float",
    "FromFloat": "expects a float image",
    "ToTensorV2": "returns a tensor; the loader converts",
    "Lambda": "needs Python callables",
}

_CV2_INTERPOLATION = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3, "lanczos": 4}


def _require_albumentations(name: str):
    try:
        import albumentations
    except ImportError as exc:
        raise PluginError(
            f"sample transform '{name}' needs albumentations: pip install albumentations"
        ) from exc
    return albumentations


def _check_image(image, name: str) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise TypeError(f"sample transform '{name}' expects an HWC uint8 numpy array, got {got}")


def _tuples(value: Any) -> Any:
    """YAML lists -> tuples, recursively (albumentations wants tuples for ranges)."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _describe(exc: Exception) -> str:
    """One line per bad parameter from albumentations' (pydantic) validation error."""
    for err in (exc, exc.__cause__):
        errors = getattr(err, "errors", None)
        if callable(errors):
            parts = {}  # first error per parameter (a union type reports one per member)
            for e in errors():
                loc = e.get("loc") or ()
                key = f"parameter '{loc[0]}'" if loc else "parameters"
                if e.get("type") == "missing":
                    parts.setdefault(key, f"missing required {key}")
                else:
                    got = f" (got {e.get('input')!r})" if loc else ""
                    parts.setdefault(key, f"bad {key}: {str(e.get('msg')).rstrip('.')}{got}")
            if parts:
                return "; ".join(parts.values())
    return f"bad parameters: {' '.join(str(exc).split())}"


def _valid_params(cls) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


class AlbumentationsTransform:
    """One albumentations transform as ``t(image) -> image``; ``set_seed`` makes it reproducible."""

    def __init__(self, name: str, transform):
        albumentations = _require_albumentations(name)
        self.name = name
        self.transform = transform
        self._compose = albumentations.Compose([transform])

    def set_seed(self, seed: int | None) -> None:
        self._compose.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        _check_image(image, self.name)
        out = self._compose(image=image)["image"]
        _check_image(out, self.name)
        return out

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.transform!r})"


def build_albumentations(name: str, image_size: int, **params) -> AlbumentationsTransform:
    """Build albumentations' ``name`` with ``params``; size parameters default to ``image_size``."""
    albumentations = _require_albumentations(name)
    cls = getattr(albumentations, name)
    valid = _valid_params(cls)
    reject_unknown_params(f"sample transform '{name}'", params, valid)
    params = _tuples(params)
    if "size" in valid and "size" not in params:
        params["size"] = (image_size, image_size)
    if "height" in valid and "width" in valid:
        params.setdefault("height", image_size)
        params.setdefault("width", image_size)
    if name in ("LongestMaxSize", "SmallestMaxSize") and not {"max_size", "max_size_hw"} & set(
        params
    ):
        params["max_size"] = image_size
    try:
        transform = cls(**params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"sample transform '{name}': {_describe(exc)}. Given: {params}. "
            f"Valid parameters: {', '.join(valid)}"
        ) from None
    return AlbumentationsTransform(name, transform)


class CenterCrop:
    """Central square crop resized to exactly ``image_size``; deterministic (eval and FixRes).

    ``crop_pct`` None: crop the central ``image_size`` pixels of the side (the whole image when the
    side is smaller), so a cache at ``round(image_size / crop_pct)`` gives the usual eval crop.
    ``crop_pct`` given: crop the central ``crop_pct`` of the side whatever its size.
    ``interpolation``: ``auto`` (area to shrink, cubic to enlarge), nearest, linear, cubic, area
    or lanczos.
    """

    def __init__(self, image_size: int, crop_pct: float | None = None, interpolation: str = "auto"):
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ConfigError(f"sample transform 'CenterCrop': crop_pct={crop_pct} not in (0, 1]")
        if interpolation != "auto" and interpolation not in _CV2_INTERPOLATION:
            raise ConfigError(
                f"sample transform 'CenterCrop': interpolation={interpolation!r}; valid: auto, "
                f"{', '.join(_CV2_INTERPOLATION)}"
            )
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.interpolation = interpolation

    def set_seed(self, seed: int | None) -> None:
        """Nothing random here; present so the loader can treat every transform alike."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import cv2

        _check_image(image, "CenterCrop")
        height, width = image.shape[:2]
        side = min(height, width)
        if self.crop_pct is None:
            crop = min(side, self.image_size)
        else:
            crop = max(1, round(side * self.crop_pct))
        top, left = (height - crop) // 2, (width - crop) // 2
        out = image[top : top + crop, left : left + crop]
        if crop != self.image_size:
            mode = self.interpolation
            if mode == "auto":
                mode = "area" if crop > self.image_size else "cubic"
            size = (self.image_size, self.image_size)
            out = cv2.resize(out, size, interpolation=_CV2_INTERPOLATION[mode])
            if out.ndim == 2:  # cv2 drops a single channel
                out = out[:, :, None]
        return np.ascontiguousarray(out)


def _center_crop(image_size: int, **params) -> CenterCrop:
    valid = ["crop_pct", "interpolation"]
    unknown = [key for key in params if key not in valid]
    if unknown:
        raise ConfigError(
            f"sample transform 'CenterCrop': unknown parameter(s) {', '.join(map(repr, unknown))}."
            f" Valid parameters: {', '.join(valid)}"
        )
    return CenterCrop(image_size, **params)


#: Transforms of our own; they take precedence over albumentations classes of the same name.
BUILTINS = {"CenterCrop": _center_crop}


class SampleTransforms(Mapping):
    """Lazy ``{name: factory}``: albumentations is imported on first lookup, not at plugin load."""

    @functools.cached_property
    def _albumentations_names(self) -> tuple[str, ...]:
        try:
            import albumentations
            from albumentations.core.transforms_interface import BasicTransform, Transform3D
        except ImportError:
            return ()
        names = []
        for name in dir(albumentations):
            cls = getattr(albumentations, name)
            if (
                isinstance(cls, type)
                and issubclass(cls, BasicTransform)
                and not issubclass(cls, Transform3D)
                and name not in EXCLUDED
                and name not in BUILTINS
            ):
                names.append(name)
        return tuple(names)

    def __getitem__(self, name: str):
        if name in BUILTINS:
            return BUILTINS[name]
        if name in self._albumentations_names:
            return functools.partial(build_albumentations, name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in BUILTINS or name in self._albumentations_names

    def __iter__(self):
        yield from BUILTINS
        yield from self._albumentations_names

    def __len__(self) -> int:
        return len(BUILTINS) + len(self._albumentations_names)


_REGISTRY = SampleTransforms()


@hookimpl
def competition_register_sample_transforms():
    return _REGISTRY
