"""Conformance checks every metric plugin must pass (see ``competition_register_metrics``).

A plugin's own test is three lines::

    from competition.conformance.metrics import check_metric

    def test_brier():
        check_metric(BRIER)
"""

from __future__ import annotations

import math

import numpy as np

from competition.metrics import Metric


def _problem(num_classes: int, n: int = 60, seed: int = 0):
    """Targets with every class present (shuffled) and random probabilities (rows sum to one)."""
    rng = np.random.default_rng(seed)
    targets = rng.permutation(np.arange(n) % num_classes)
    probs = rng.dirichlet(np.ones(num_classes), size=n)
    return targets, probs


def _confident(targets: np.ndarray, num_classes: int, p: float = 0.9) -> np.ndarray:
    """Probabilities putting ``p`` on ``targets`` and the rest evenly on the other classes."""
    probs = np.full((len(targets), num_classes), (1.0 - p) / (num_classes - 1))
    probs[np.arange(len(targets)), targets] = p
    return probs


def check_metric(metric: Metric, num_classes: tuple[int, ...] = (2, 5)) -> None:
    """Assert that ``metric`` is a well-behaved validation metric.

    Checks, for each K in ``num_classes`` (binary and multiclass): a :class:`Metric` with a name
    and a boolean ``higher_is_better``; a finite Python float for integer targets (N,) and
    float64 probabilities (N, K), also when a class is absent from the targets (a fold of a rare
    class); confident right predictions score better (by ``higher_is_better``) than random ones
    and than confident wrong ones; the same score for shuffled rows; deterministic; inputs left
    untouched.
    """
    assert isinstance(metric, Metric), f"{metric!r}: register a competition.metrics.Metric"
    name = metric.name
    assert isinstance(name, str) and name, f"{metric!r}: the metric needs a name"
    assert isinstance(metric.higher_is_better, bool), f"{name}: higher_is_better must be a bool"
    for k in num_classes:

        def score(targets, probs, what, k=k):
            before = (targets.copy(), probs.copy())
            try:
                value = metric(targets, probs)
            except Exception as exc:
                raise AssertionError(
                    f"{name}, K={k}, {what}: raised {type(exc).__name__}: {exc}"
                ) from exc
            assert isinstance(value, float), f"{name}, K={k}, {what}: got {type(value).__name__}"
            assert math.isfinite(value), f"{name}, K={k}, {what}: score is {value}"
            assert np.array_equal(targets, before[0]) and np.array_equal(probs, before[1]), (
                f"{name}, K={k}, {what}: the metric modified its inputs"
            )
            return value

        targets, probs = _problem(k)
        random = score(targets, probs, "random probabilities")
        again = score(targets, probs, "random probabilities")
        assert again == random, f"{name}, K={k}: two calls gave {random} and {again}"

        order = np.random.default_rng(1).permutation(len(targets))
        shuffled = score(targets[order], probs[order], "shuffled rows")
        assert math.isclose(shuffled, random, rel_tol=1e-9, abs_tol=1e-12), (
            f"{name}, K={k}: shuffling the rows changed the score ({random} -> {shuffled})"
        )

        right = score(targets, _confident(targets, k), "confident right predictions")
        wrong = score(targets, _confident((targets + 1) % k, k), "confident wrong predictions")
        assert metric.better(right, random), (
            f"{name}, K={k}: right predictions score {right}, not better than random ({random}) "
            f"with higher_is_better={metric.higher_is_better}"
        )
        assert metric.better(right, wrong), (
            f"{name}, K={k}: right predictions score {right}, not better than wrong ones "
            f"({wrong}) with higher_is_better={metric.higher_is_better}"
        )

        if k > 2:  # a fold without the last class: still a score, not a crash or NaN
            kept = targets != k - 1
            score(targets[kept], probs[kept], f"targets without class {k - 1}")
