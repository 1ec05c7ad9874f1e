"""Conformance checks every loss plugin must pass (see ``competition_register_losses``).

A plugin's own test is three lines::

    from competition.conformance.losses import check_loss

    def test_poly1():
        check_loss(PolyLoss)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _name(factory) -> str:
    return getattr(factory, "__name__", repr(factory))


def _fixed_problem(num_classes: int, n: int = 64, dim: int = 8):
    """A tiny separable problem: features, hard labels (every class present), a linear model."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % num_classes
    centres = torch.randn(num_classes, dim, generator=gen) * 2.0
    features = centres[labels] + torch.randn(n, dim, generator=gen)
    model = nn.Linear(dim, num_classes)
    with torch.no_grad():
        model.weight.copy_(torch.randn(num_classes, dim, generator=gen) * 0.1)
        model.bias.zero_()
    return features, labels, model


def check_loss(
    factory: Callable[..., nn.Module],
    num_classes: int = 5,
    params: Mapping | None = None,
    class_counts: Sequence[int] | None = None,
) -> None:
    """Assert that ``factory(num_classes, class_counts, **params)`` builds a well-behaved loss.

    Checks: an ``nn.Module`` returning a finite scalar; gradients reach the logits; a hard target
    and its one-hot soft target give the same value; a mixed soft target (0.7/0.3) works and the
    value depends on the target; confident right logits cost less than wrong ones; a few optimiser
    steps on a fixed tiny separable problem lower it and fit the problem; it runs
    on CPU, is deterministic and leaves its inputs untouched. ``class_counts`` defaults to a
    long-tailed profile (imbalance losses need it).
    """
    name = _name(factory)
    params = dict(params or {})
    if class_counts is None:
        class_counts = [max(2, 200 // (k + 1) ** 2) for k in range(num_classes)]

    def build() -> nn.Module:
        return factory(num_classes, list(class_counts), **params)

    loss_fn = build()
    assert isinstance(loss_fn, nn.Module), f"{name}: factory must return an nn.Module"

    gen = torch.Generator().manual_seed(1)
    batch = 2 * num_classes
    logits = torch.randn(batch, num_classes, generator=gen)
    hard = torch.arange(batch) % num_classes
    one_hot = F.one_hot(hard, num_classes).float()
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, dims=0)
    inputs_before = (logits.clone(), hard.clone(), mixed.clone())

    # Scalar, finite, differentiable, on CPU, for hard and soft targets.
    values = {}
    for kind, targets in (("hard", hard), ("one-hot soft", one_hot), ("mixed soft", mixed)):
        x = logits.clone().requires_grad_(True)
        value = loss_fn(x, targets)
        assert isinstance(value, torch.Tensor), f"{name}: {kind} target: must return a tensor"
        assert value.ndim == 0, (
            f"{name}: {kind} target: expected a scalar, got {tuple(value.shape)}"
        )
        assert value.device.type == "cpu", f"{name}: {kind} target: result left the CPU"
        assert torch.isfinite(value), f"{name}: {kind} target: loss is {value.item()}"
        assert value.requires_grad, f"{name}: {kind} target: the value has no autograd graph"
        value.backward()
        assert x.grad is not None, f"{name}: {kind} target: no gradient reaches the logits"
        assert torch.isfinite(x.grad).all(), f"{name}: {kind} target: non-finite gradient"
        assert x.grad.abs().sum() > 0, f"{name}: {kind} target: gradient is zero"
        values[kind] = value.detach()

    torch.testing.assert_close(
        values["one-hot soft"],
        values["hard"],
        rtol=1e-6,
        atol=1e-6,
        msg=lambda m: f"{name}: a one-hot soft target must equal the hard target. {m}",
    )
    assert not torch.allclose(values["mixed soft"], values["hard"]), (
        f"{name}: the value ignores the soft target (0.7/0.3 mix gives the hard-target value)"
    )
    for before, after in zip(inputs_before, (logits, hard, mixed), strict=True):
        assert torch.equal(before, after), f"{name}: the loss modified its inputs in place"

    # Right answers cost less than wrong ones.
    right = loss_fn(20.0 * one_hot, hard)
    wrong = loss_fn(20.0 * one_hot.roll(1, dims=1), hard)
    assert right < wrong, f"{name}: confident right logits cost {right} >= wrong ones {wrong}"

    # Deterministic: the same value from the same instance twice and from a fresh instance.
    again = loss_fn(logits, mixed)
    fresh = build()(logits, mixed)
    assert torch.equal(again, values["mixed soft"]), f"{name}: two calls gave different values"
    assert torch.equal(fresh, values["mixed soft"]), f"{name}: two instances gave different values"

    # Trainable: a few Adam steps (scale-free, so large logit scales are fine) lower the loss.
    features, labels, model = _fixed_problem(num_classes)
    loss_fn = build()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        start = loss_fn(model(features), labels).item()
    for _ in range(20):
        optimiser.zero_grad()
        loss_fn(model(features), labels).backward()
        optimiser.step()
    with torch.no_grad():
        end = loss_fn(model(features), labels).item()
    assert end < start * 0.9, (
        f"{name}: 20 optimiser steps did not lower the loss ({start} -> {end})"
    )
