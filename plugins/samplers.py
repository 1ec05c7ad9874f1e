"""Built-in training samplers: which training rows an epoch visits, per fold and seeded.

Kang et al. 2020, "Decoupling Representation and Classifier for Long-Tailed Recognition" (ICLR),
write them as class-sampling probabilities ``p_j = n_j^q / sum_i n_i^q`` (a class is drawn with
``p_j``, then an image of it uniformly):

* ``instance_balanced`` (q = 1): every image once per epoch in a random order (the default; the
  same order as a shuffling DataLoader with the same generator).
* ``class_balanced`` (q = 0): every class equally often (with replacement).
* ``square_root`` (q = 1/2): between the two (Mahajan et al. 2018).
* ``progressively_balanced``: ``p_j(t) = (1 - t/T) p_j^IB + t/T p_j^CB`` at epoch ``t`` (from 0)
  of ``T``, from instance- to class-balanced over training.

All draw only from the loader's ``torch.Generator`` (re-seeded every epoch), so a resumed run
draws the same rows; an epoch has ``num_samples`` draws (default: the number of rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from competition import hookimpl
from competition.errors import ConfigError, DataError, reject_unknown_params


def class_probabilities(counts: np.ndarray, q: float) -> np.ndarray:
    """Kang et al.'s ``p_j = n_j^q / sum_i n_i^q`` over classes with rows (absent classes: 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = np.where(counts > 0, np.power(np.maximum(counts, 1e-300), q), 0.0)
    return p / p.sum()


class _ClassSampler(Sampler):
    """Draw ``num_samples`` rows with replacement: a class by ``probabilities()``, then a row."""

    name = ""

    def __init__(self, targets, num_classes: int, generator=None, num_samples: int | None = None):
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.ndim != 1 or len(self.targets) == 0:
            raise DataError(f"sampler '{self.name}': needs a non-empty 1-D array of class indices")
        if self.targets.min() < 0 or self.targets.max() >= num_classes:
            raise DataError(
                f"sampler '{self.name}': class indices must lie in [0, {num_classes}); got "
                f"{self.targets.min()}..{self.targets.max()}"
            )
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ConfigError(
                f"data.sampler.params.num_samples={num_samples!r}: expected an integer >= 1 "
                "(draws per epoch), or leave it out for one per training row"
            )
        self.num_classes = num_classes
        self.generator = generator
        self.num_samples = num_samples or len(self.targets)
        self.counts = np.bincount(self.targets, minlength=num_classes)
        self.epoch, self.epochs = 0, 1

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, max(1, epochs)

    def probabilities(self) -> np.ndarray:
        """Class-sampling probabilities ``p_j`` for the current epoch."""
        raise NotImplementedError

    def row_weights(self) -> np.ndarray:
        """Per-row probabilities: ``p_j / n_j`` for a row of class ``j``."""
        p = self.probabilities()
        return p[self.targets] / self.counts[self.targets]

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        weights = torch.as_tensor(self.row_weights(), dtype=torch.float64)
        draws = torch.multinomial(weights, self.num_samples, True, generator=self.generator)
        yield from draws.tolist()


class InstanceBalancedSampler(_ClassSampler):
    """Every row once per epoch in a random order (``q = 1``); extra draws start a new pass."""

    name = "instance_balanced"

    def probabilities(self) -> np.ndarray:
        return class_probabilities(self.counts, 1.0)

    def __iter__(self):
        n = len(self.targets)
        for _ in range(self.num_samples // n):
            yield from torch.randperm(n, generator=self.generator).tolist()
        yield from torch.randperm(n, generator=self.generator)[: self.num_samples % n].tolist()


class ClassBalancedSampler(_ClassSampler):
    """Every class equally often (``q = 0``; Kang et al. 2020, class-aware sampling)."""

    name = "class_balanced"

    def probabilities(self) -> np.ndarray:
        return class_probabilities(self.counts, 0.0)


class SquareRootSampler(_ClassSampler):
    """Classes in proportion to ``sqrt(n_j)`` (``q = 1/2``; Mahajan et al. 2018)."""

    name = "square_root"

    def probabilities(self) -> np.ndarray:
        return class_probabilities(self.counts, 0.5)


class ProgressivelyBalancedSampler(_ClassSampler):
    """``p_j(t) = (1 - t/T) p_j^IB + t/T p_j^CB`` (Kang et al. 2020); epoch ``t`` from 0 of T."""

    name = "progressively_balanced"

    def probabilities(self) -> np.ndarray:
        t = self.epoch / self.epochs
        return (1 - t) * class_probabilities(self.counts, 1.0) + t * class_probabilities(
            self.counts, 0.0
        )


SAMPLERS = {
    cls.name: cls
    for cls in (
        InstanceBalancedSampler,
        ClassBalancedSampler,
        SquareRootSampler,
        ProgressivelyBalancedSampler,
    )
}


def _factory(name: str, cls: type[_ClassSampler]):
    def factory(targets, num_classes: int, generator=None, **params):
        reject_unknown_params(f"sampler '{name}'", params, ["num_samples"])
        return cls(targets, num_classes, generator, **params)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = cls.__doc__
    factory.sampler_class = cls
    return factory


@hookimpl
def competition_register_samplers():
    """The built-in samplers by name."""
    return {name: _factory(name, cls) for name, cls in SAMPLERS.items()}
