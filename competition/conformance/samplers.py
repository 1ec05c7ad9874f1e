"""Conformance checks every sampler plugin must pass (see ``competition_register_samplers``).

A plugin's own test is three lines::

    from competition.conformance.samplers import check_sampler

    def test_my_sampler():
        check_sampler(my_sampler_factory, expected=lambda counts, epoch, epochs: counts ** 0.25)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch


def long_tailed_targets(num_classes: int = 5, largest: int = 160, ratio: float = 20.0):
    """Class indices with an exponential profile ``n_j = largest * ratio^(-j / (K - 1))``."""
    counts = [
        max(1, round(largest * ratio ** (-j / (num_classes - 1)))) for j in range(num_classes)
    ]
    targets = np.repeat(np.arange(num_classes), counts)
    return np.random.default_rng(0).permutation(targets)


def check_sampler(
    factory: Callable,
    params: Mapping | None = None,
    expected: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    num_classes: int = 5,
    epochs: int = 4,
    draws: int = 20_000,
    tolerance: float = 0.02,
) -> None:
    """Assert that ``factory(targets, num_classes, generator, **params)`` is a sound sampler.

    Checks on a long-tailed problem: ``len(sampler)`` indices per epoch, all in range and ints;
    the same generator seed gives the same order (a resumed run), another seed another order;
    ``set_epoch`` (when offered) is accepted for every epoch. With ``expected(counts, epoch,
    epochs) -> class weights`` the class frequencies of ``draws`` draws (the factory's
    ``num_samples``) at each epoch match the normalised weights within ``tolerance`` (absolute).
    """
    params = dict(params or {})
    targets = long_tailed_targets(num_classes)
    counts = np.bincount(targets, minlength=num_classes)
    name = getattr(factory, "__name__", repr(factory))

    def draw(seed: int, epoch: int = 0, **extra) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        sampler = factory(targets, num_classes, generator, **{**params, **extra})
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch, epochs)
        order = list(sampler)
        assert len(order) == len(sampler), f"{name}: yielded {len(order)}, len() {len(sampler)}"
        generator.manual_seed(seed)
        assert list(sampler) == order, f"{name}: a re-seeded generator must repeat the order"
        return order

    order = draw(0)
    assert len(order) > 0, f"{name}: an epoch has no indices"
    assert all(isinstance(i, int) for i in order), f"{name}: indices must be Python ints"
    assert min(order) >= 0 and max(order) < len(targets), f"{name}: an index is out of range"
    assert draw(0) == order, f"{name}: the same seed must give the same order"
    assert draw(1) != order, f"{name}: another seed must give another order"
    if expected is None:
        return
    for epoch in range(epochs):
        sample = targets[draw(epoch + 7, epoch, num_samples=draws)]
        seen = np.bincount(sample, minlength=num_classes) / len(sample)
        want = np.asarray(expected(counts, epoch, epochs), dtype=np.float64)
        want = want / want.sum()
        worst = float(np.abs(seen - want).max())
        assert worst <= tolerance, (
            f"{name}: class frequencies {np.round(seen, 3).tolist()} at epoch {epoch} differ from "
            f"the expected {np.round(want, 3).tolist()} by {worst:.3f} > {tolerance}"
        )
