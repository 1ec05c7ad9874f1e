"""Batch augmentations on the model's device: images float (B, 3, H, W) in [0, 1], soft targets.

* ``mixup``: Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization".
* ``cutmix``: Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features"; targets are mixed by the area actually pasted (after clipping the box).
* ``manifold_mixup``: Verma et al. 2019, "Manifold Mixup: Better Representations by Interpolating
  Hidden States"; mixes a stage's output on the next training forward.
* ``autoaugment``: Cubuk et al. 2019, "AutoAugment: Learning Augmentation Strategies from Data".
* ``randaugment``: Cubuk et al. 2020, "RandAugment: Practical Automated Data Augmentation with a
  Reduced Search Space".
* ``trivialaugment``: Müller & Hutter 2021, "TrivialAugment: Tuning-free Yet State-of-the-Art Data
  Augmentation".
* ``random_erasing``: Zhong et al. 2020, "Random Erasing Data Augmentation".
* ``hflip``, ``vflip``, ``color_jitter``: per-sample flips and colour jitter.

The policies, ``color_jitter`` and ``random_erasing`` come from kornia (imported when the factory
runs, so this module imports without it). kornia's policies draw one sub-policy per batch and
magnitudes per sample. Every draw uses the global torch RNG: ``torch.manual_seed(s)`` makes a run
reproducible. Scalars (lambda, permutations, boxes) are drawn on the CPU, so no augmentation syncs
the device.
"""

from __future__ import annotations

import difflib
import inspect
import math

import torch
from torch import nn

from competition import hookimpl
from competition.errors import ConfigError, PluginError, reject_unknown_params


def _kornia(name: str):
    try:
        import kornia.augmentation
        import kornia.augmentation.auto
    except ImportError as exc:
        raise PluginError(f"augmentation '{name}' needs kornia: pip install kornia") from exc
    return kornia.augmentation


def _check_probability(name: str, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"batch augmentation '{name}': {key}={value} must be in [0, 1]")


def _check_alpha(name: str, alpha: float) -> None:
    if not alpha > 0:
        raise ConfigError(f"batch augmentation '{name}': alpha={alpha} must be > 0")


def _beta(alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha), drawn on the CPU from the global RNG."""
    return float(torch.distributions.Beta(alpha, alpha).sample())


def _skip(p: float) -> bool:
    return p < 1.0 and float(torch.rand(())) >= p


class BatchAugment:
    """Base: ``augment(images, targets) -> (images, targets)``; ``mixes`` says if samples mix."""

    mixes = False

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        raise NotImplementedError


class KorniaAugment(BatchAugment):
    """A kornia module applied to the images; targets untouched."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, images, targets):
        self.module.to(images.device)  # a no-op after the first call on a device
        out = self.module(images)
        return out.clamp(0.0, 1.0).to(images.dtype), targets

    def __repr__(self) -> str:
        return f"KorniaAugment({self.module.__class__.__name__})"


class Flip(BatchAugment):
    """Flip each image with probability ``p`` along ``dim`` (-1 horizontal, -2 vertical)."""

    def __init__(self, p: float = 0.5, dim: int = -1):
        self.p = p
        self.dim = dim

    def __call__(self, images, targets):
        flip = (torch.rand(images.shape[0]) < self.p).to(images.device, non_blocking=True)
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(self.dim), images), targets


class Mixup(BatchAugment):
    """``x = lam x + (1 - lam) x[perm]``, same for targets; ``lam ~ Beta(alpha, alpha)``.

    Applied to a batch with probability ``p``. ``lam`` and ``perm`` keep the last draw.
    """

    mixes = True

    def __init__(self, alpha: float = 0.2, p: float = 1.0):
        _check_alpha("mixup", alpha)
        _check_probability("mixup", "p", p)
        self.alpha, self.p = alpha, p
        self.lam, self.perm = 1.0, None

    def __call__(self, images, targets):
        if _skip(self.p):
            return images, targets
        self.lam = lam = _beta(self.alpha)
        self.perm = torch.randperm(images.shape[0])
        perm = self.perm.to(images.device, non_blocking=True)
        images = torch.lerp(images[perm], images, lam)
        return images, torch.lerp(targets[perm], targets, lam)


class CutMix(BatchAugment):
    """Paste a box of ``x[perm]`` into ``x``; targets weighted by the pasted area.

    The box has area ``(1 - lam) H W`` with ``lam ~ Beta(alpha, alpha)`` and a uniform centre; it
    is clipped to the image, and ``lam`` is recomputed from the clipped box. ``box`` (top, bottom,
    left, right), ``lam`` and ``perm`` keep the last draw.
    """

    mixes = True

    def __init__(self, alpha: float = 1.0, p: float = 1.0):
        _check_alpha("cutmix", alpha)
        _check_probability("cutmix", "p", p)
        self.alpha, self.p = alpha, p
        self.lam, self.perm, self.box = 1.0, None, None

    def __call__(self, images, targets):
        if _skip(self.p):
            return images, targets
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - _beta(self.alpha))
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        self.box = (top, bottom, left, right)
        self.lam = lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        self.perm = torch.randperm(images.shape[0])
        perm = self.perm.to(images.device, non_blocking=True)
        images = images.clone()
        images[:, :, top:bottom, left:right] = images[perm][:, :, top:bottom, left:right]
        return images, torch.lerp(targets[perm], targets, lam)


class ManifoldMixup(BatchAugment):
    """Mix the hidden output of one stage; the images pass unchanged, the targets are mixed.

    ``attach(model)`` hooks the candidate stages: ``stage`` (an index, or a list, into
    ``model.stages()``) or ``module`` (a dotted name, or a list, from ``model.named_modules()``);
    neither: every stage but the last, as in the paper. Each call draws ``lam ~ Beta(alpha,
    alpha)``, a permutation and one candidate, mixes the targets and arms the hook: the next forward
    in training mode mixes that stage's output, then disarms. Eval-mode forwards (validation, an
    EMA copy) are never mixed and leave the hook armed.
    """

    mixes = True

    def __init__(
        self,
        alpha: float = 2.0,
        stage: int | list[int] | None = None,
        module: str | list[str] | None = None,
        p: float = 1.0,
    ):
        _check_alpha("manifold_mixup", alpha)
        _check_probability("manifold_mixup", "p", p)
        if stage is not None and module is not None:
            raise ConfigError("batch augmentation 'manifold_mixup': give stage or module, not both")
        self.alpha, self.p = alpha, p
        self.stage, self.module = stage, module
        self.lam, self.perm = 1.0, None
        self.armed: int | None = None  # index into self.targets of the stage to mix next
        self.targets: list[str] = []  # names of the hooked modules
        self._handles = []

    def _candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        named = dict(model.named_modules())
        if self.module is not None:
            names = [self.module] if isinstance(self.module, str) else list(self.module)
            for name in names:
                if name not in named:
                    close = difflib.get_close_matches(name, list(named), n=5)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError(
                        f"batch augmentation 'manifold_mixup': module '{name}' is not in the "
                        f"model.{hint} See model.named_modules()."
                    )
            return [(name, named[name]) for name in names]
        if not callable(getattr(model, "stages", None)):
            raise PluginError(
                "batch augmentation 'manifold_mixup': the model has no stages(); give "
                "module=<dotted name> (one of model.named_modules()) instead of stage"
            )
        stages = list(model.stages())
        by_id = {id(m): name for name, m in named.items()}
        if self.stage is None:
            indices = list(range(max(len(stages) - 1, 1)))
        else:
            indices = [self.stage] if isinstance(self.stage, int) else list(self.stage)
        for index in indices:
            if not -len(stages) <= index < len(stages):
                raise ConfigError(
                    f"batch augmentation 'manifold_mixup': stage={index} out of range; the model "
                    f"has {len(stages)} stages (0..{len(stages) - 1}, or negative from the end)"
                )
        return [(by_id.get(id(stages[i]), f"stages()[{i}]"), stages[i]) for i in indices]

    def attach(self, model: nn.Module) -> None:
        """Hook the candidate stages of ``model`` (once, after the model is built)."""
        self.detach()
        candidates = self._candidates(model)
        self.targets = [name for name, _ in candidates]
        for index, (_, module) in enumerate(candidates):
            self._handles.append(module.register_forward_hook(self._hook(index)))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.armed = [], None

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if self.armed != index or not module.training:
                return None
            self.armed = None
            if not torch.is_tensor(output) or output.shape[0] != len(self.perm):
                shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
                raise RuntimeError(
                    f"manifold_mixup: stage '{self.targets[index]}' returned {shape} for a "
                    f"permutation of {len(self.perm)} samples; call the augmentation on the very "
                    "batch that is forwarded next, and hook a module that returns one tensor"
                )
            perm = self.perm.to(output.device, non_blocking=True)
            return torch.lerp(output[perm], output, self.lam)

        return hook

    def __call__(self, images, targets):
        if not self._handles:
            raise PluginError(
                "batch augmentation 'manifold_mixup': call attach(model) once after the model "
                "is built (the core does this for every augmentation that has attach)"
            )
        if _skip(self.p):
            return images, targets
        self.lam = _beta(self.alpha)
        self.perm = torch.randperm(images.shape[0])
        self.armed = int(torch.randint(len(self._handles), ()))
        perm = self.perm.to(targets.device, non_blocking=True)
        return images, torch.lerp(targets[perm], targets, self.lam)


# -- factories ------------------------------------------------------------------------------------


def _autoaugment(policy: str = "imagenet") -> KorniaAugment:
    """AutoAugment with a learned policy: imagenet, cifar10 or svhn."""
    auto = _kornia("autoaugment").auto
    try:
        return KorniaAugment(auto.AutoAugment(policy=policy))
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError(
            f"batch augmentation 'autoaugment': policy={policy!r} ({exc}); "
            "use imagenet, cifar10 or svhn"
        ) from None


def _randaugment(n: int = 2, m: int = 9) -> KorniaAugment:
    """RandAugment: ``n`` operations per image at magnitude ``m`` (0 < m < 30)."""
    auto = _kornia("randaugment").auto
    if not 0 < m < 30 or n < 1:
        raise ConfigError(
            f"batch augmentation 'randaugment': need n >= 1, 0 < m < 30; got {n}, {m}"
        )
    return KorniaAugment(auto.RandAugment(n=n, m=m))


def _trivialaugment() -> KorniaAugment:
    """TrivialAugment: one random operation at a random magnitude."""
    return KorniaAugment(_kornia("trivialaugment").auto.TrivialAugment())


def _color_jitter(
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.0,
    p: float = 0.8,
) -> KorniaAugment:
    """Random brightness, contrast, saturation and hue, per image with probability ``p``."""
    kornia = _kornia("color_jitter")
    _check_probability("color_jitter", "p", p)
    return KorniaAugment(kornia.ColorJitter(brightness, contrast, saturation, hue, p=p))


def _random_erasing(
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    p: float = 0.25,
) -> KorniaAugment:
    """Erase a random rectangle (area ``scale``, aspect ``ratio``) with probability ``p``."""
    kornia = _kornia("random_erasing")
    _check_probability("random_erasing", "p", p)
    return KorniaAugment(kornia.RandomErasing(tuple(scale), tuple(ratio), value=value, p=p))


def _hflip(p: float = 0.5) -> Flip:
    _check_probability("hflip", "p", p)
    return Flip(p, dim=-1)


def _vflip(p: float = 0.5) -> Flip:
    _check_probability("vflip", "p", p)
    return Flip(p, dim=-2)


def _checked(name: str, build):
    """``factory(**params)`` that names the augmentation and its valid parameters on a bad key."""
    valid = list(inspect.signature(build).parameters)

    def factory(**params):
        reject_unknown_params(f"batch augmentation '{name}'", params, valid)
        return build(**params)

    factory.__name__ = f"{name}_factory"
    factory.__doc__ = build.__doc__
    return factory


FACTORIES = {
    "mixup": Mixup,
    "cutmix": CutMix,
    "manifold_mixup": ManifoldMixup,
    "autoaugment": _autoaugment,
    "randaugment": _randaugment,
    "trivialaugment": _trivialaugment,
    "color_jitter": _color_jitter,
    "random_erasing": _random_erasing,
    "hflip": _hflip,
    "vflip": _vflip,
}


@hookimpl
def competition_register_batch_augments():
    return {name: _checked(name, build) for name, build in FACTORIES.items()}
