"""Conformance checks every sample transform, batch augmentation and TTA view must pass.

A plugin author checks their own factory in three lines::

    from competition.conformance.augment import check_batch_augment

    def test_my_augment():
        check_batch_augment(my_factory, params={"strength": 0.5})

Each check builds the component from ``factory`` and ``params``, runs it on real photographs
(scikit-image's bundled astronaut, chelsea, coffee and rocket) and fails with an AssertionError that
says which part of the contract (see :mod:`competition.hookspecs`) is broken. Each returns what the
component produced, for further checks of one's own.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@cache
def _photo(name: str, side: int) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()[..., :3]
    height, width = image.shape[:2]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = torch.from_numpy(np.ascontiguousarray(image[top : top + crop, left : left + crop]))
    square = square.permute(2, 0, 1)[None].float()
    small = F.interpolate(square, size=(side, side), mode="bilinear", antialias=True)
    return small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def photos(side: int, n: int = 4) -> list[np.ndarray]:
    """``n`` real photographs as square HWC uint8 arrays of ``side`` (centre crop, resized)."""
    return [_photo(PHOTOS[i % len(PHOTOS)], side).copy() for i in range(n)]


def image_batch(batch: int = 8, size: int = 32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Real photographs as float (batch, 3, size, size) in [0, 1] on ``device``."""
    arrays = np.stack(photos(size, batch))
    for i in range(len(PHOTOS), batch):  # repeated photos are flipped, so no two are equal
        arrays[i] = arrays[i][:, ::-1] if (i // len(PHOTOS)) % 2 else arrays[i][::-1]
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255).to(device)


def soft_targets(batch: int = 8, num_classes: int = 5, device="cpu") -> torch.Tensor:
    """Soft targets (batch, num_classes): one-hot rows with label smoothing 0.1, rows sum to one."""
    labels = torch.arange(batch) % num_classes
    onehot = F.one_hot(labels, num_classes).float()
    return (onehot * 0.9 + 0.1 / num_classes).to(device)


class StagedNet(nn.Module):
    """A tiny CNN that offers ``stages()``: for augmentations with ``attach(model)``."""

    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def stages(self) -> list[nn.Module]:
        return [self.stage1, self.stage2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _seeded(seed: int, fn, *args):
    torch.manual_seed(seed)
    return fn(*args)


def check_sample_transform(factory, image_size: int = 32, params: dict | None = None, seed=0):
    """A per-sample transform: HWC uint8 in, HWC uint8 out, input untouched, seedable.

    Fed images of side ``image_size`` it must return ``image_size``; fed a larger cache
    (``round(image_size / 0.875)``) it must return ``image_size`` or keep the side.
    """
    params = dict(params or {})
    transform = factory(image_size, **params)
    assert callable(transform), f"factory returned {transform!r}, which is not callable"
    cache_side = round(image_size / 0.875)
    outputs = []
    for side in (image_size, cache_side):
        for image in photos(side, 3):
            before = image.copy()
            out = transform(image)
            assert np.array_equal(image, before), "the transform modified its input in place"
            assert isinstance(out, np.ndarray), f"returned {type(out).__name__}, not a numpy array"
            assert out.dtype == np.uint8, f"returned dtype {out.dtype}, not uint8"
            assert out.ndim == 3 and out.shape[2] == 3, f"returned shape {out.shape}, not HWC RGB"
            allowed = {(image_size, image_size), (side, side)}
            assert out.shape[:2] in allowed, (
                f"a {side}x{side} input became {out.shape[:2]}; expected one of {sorted(allowed)}"
            )
            outputs.append(out)
    if hasattr(transform, "set_seed"):
        runs = []
        for _ in range(2):
            transform.set_seed(seed)
            runs.append([transform(image) for image in photos(cache_side, 3)])
        for a, b in zip(*runs, strict=True):
            assert np.array_equal(a, b), "set_seed(seed) does not make the transform reproducible"
    return outputs


def check_batch_augment(
    factory,
    params: dict | None = None,
    device: str | torch.device = "cpu",
    batch: int = 8,
    size: int = 32,
    num_classes: int = 5,
    seed: int = 0,
):
    """A batch augmentation: shape, dtype and device kept, images in [0, 1], soft targets kept
    summing to one in [0, 1], ``mixes`` a bool, targets untouched when it does not mix, and the
    same output under ``torch.manual_seed``. An ``attach(model)`` is given a :class:`StagedNet`.
    """
    params = dict(params or {})
    augment = factory(**params)
    assert callable(augment), f"factory returned {augment!r}, which is not callable"
    mixes = getattr(augment, "mixes", None)
    assert isinstance(mixes, bool), f"augment.mixes must be a bool, got {mixes!r}"
    model = None
    if hasattr(augment, "attach"):
        model = StagedNet(num_classes).to(device).train()
        augment.attach(model)

    def run(n: int):
        images, targets = image_batch(n, size, device), soft_targets(n, num_classes, device)
        result = augment(images.clone(), targets.clone())
        assert isinstance(result, tuple) and len(result) == 2, "must return (images, targets)"
        logits = model(result[0]) if model is not None else None
        return images, targets, result[0], result[1], logits

    first = None
    for n in (batch, 1):
        images, targets, out, out_targets, logits = _seeded(seed, run, n)
        assert torch.is_tensor(out) and torch.is_tensor(out_targets), "must return tensors"
        assert out.shape == images.shape, f"image shape {tuple(out.shape)} != {tuple(images.shape)}"
        assert out.dtype == images.dtype, f"image dtype {out.dtype} != {images.dtype}"
        assert out.device == images.device, f"images moved to {out.device}"
        assert torch.isfinite(out).all(), "images contain NaN or inf"
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6, "images left [0, 1]"
        assert out_targets.shape == targets.shape, "targets changed shape"
        assert out_targets.dtype == targets.dtype, "targets changed dtype"
        assert out_targets.device == targets.device, "targets moved"
        assert out_targets.min() >= -1e-6 and out_targets.max() <= 1 + 1e-6, "targets left [0, 1]"
        sums = out_targets.sum(dim=1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), "targets don't sum to one"
        if not mixes:
            assert torch.equal(out_targets, targets), "mixes is False but the targets changed"
        if first is None:
            first = (out, out_targets, logits)
    again = _seeded(seed, run, batch)
    assert torch.equal(first[0], again[2]), "images differ under the same torch.manual_seed"
    assert torch.equal(first[1], again[3]), "targets differ under the same torch.manual_seed"
    if model is not None:
        assert torch.equal(first[2], again[4]), "forward differs under the same torch.manual_seed"
    return augment, first


def check_tta_view(
    factory,
    params: dict | None = None,
    device: str | torch.device = "cpu",
    batch: int = 4,
    size: int = 32,
):
    """A TTA view: batch and channels, dtype and device kept, in [0, 1], deterministic, input
    untouched; the size may change (models pool globally). A group factory (``d4``, ``ten_crop``)
    returns a non-empty list of views, each checked, and no two of them equal in output.

    Returns the view's output, or the list of the group's outputs.
    """
    params = dict(params or {})
    built = factory(**params)
    group = isinstance(built, list | tuple)
    views = list(built) if group else [built]
    assert views, "a group factory returned an empty list of views"
    images = image_batch(batch, size, device)
    outputs = []
    for i, view in enumerate(views):
        what = f"view {i} of the group ({view!r})" if group else "the view"
        assert callable(view), f"{what}: {view!r} is not callable"
        before = images.clone()
        out = view(images)
        assert torch.equal(images, before), f"{what} modified its input in place"
        assert torch.is_tensor(out), f"{what} returned {type(out).__name__}, not a tensor"
        assert out.ndim == 4 and out.shape[:2] == images.shape[:2], (
            f"{what}: bad shape {tuple(out.shape)} (batch and channels must be kept)"
        )
        assert out.dtype == images.dtype and out.device == images.device, (
            f"{what}: dtype or device changed"
        )
        assert torch.isfinite(out).all(), f"{what}: NaN or inf"
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6, f"{what}: left [0, 1]"
        assert torch.equal(out, view(images)), f"{what}: a TTA view must be deterministic"
        outputs.append(out)
    for i, a in enumerate(outputs):
        for j in range(i):
            b = outputs[j]
            assert a.shape != b.shape or not torch.equal(a, b), (
                f"views {j} and {i} of the group give the same images: a repeated view only "
                "re-weights the merge"
            )
    return outputs if group else outputs[0]
