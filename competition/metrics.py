"""Validation metrics, chosen by name in the config (``metric: accuracy``).

A metric is a :class:`Metric`; plugins register them through ``competition_register_metrics``
(the built-ins are in :mod:`plugins.metrics`) and :func:`get_metric` looks one up by name. Each
metric takes integer targets (N,) and class probabilities (N, K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from competition.errors import PluginError
from competition.manager import components, resolve


@dataclass(frozen=True)
class Metric:
    """A named score of integer targets (N,) and class probabilities (N, K)."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool = True

    def __call__(self, targets: np.ndarray, probs: np.ndarray) -> float:
        return float(self.fn(np.asarray(targets), np.asarray(probs)))

    def better(self, a: float, b: float | None) -> bool:
        """Whether score ``a`` beats ``b`` (``None`` is beaten by anything)."""
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b


def log_loss(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-probability of the true class, as Kaggle scores it: probabilities are
    clipped to [1e-15, 1] and each row renormalised to sum to one."""
    probs = np.clip(probs, 1e-15, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(probs[np.arange(len(targets)), targets])))


def cv_scores(metric: Metric, targets: np.ndarray, probs: np.ndarray, folds: np.ndarray) -> dict:
    """The ``cv.json`` scores of OOF rows: per fold (in fold order), mean, std, and pooled OOF."""
    done = sorted(set(np.asarray(folds).tolist()))
    scores = [metric(targets[folds == k], probs[folds == k]) for k in done]
    return {
        "metric": metric.name,
        "folds": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "oof": metric(targets, probs),
        "folds_done": done,
    }


def get_metric(name: str, pm=None) -> Metric:
    """The metric registered as ``name`` (config key ``metric``) by any plugin."""
    metric = resolve("metrics", name, "metric", pm)
    if not isinstance(metric, Metric) or metric.name != name:
        plugin = components("metrics", pm).provider(name)
        raise PluginError(
            f"metric: plugin '{plugin}' registers '{name}' as {metric!r}; register a "
            f"competition.metrics.Metric of the same name: {{'{name}': Metric('{name}', fn, "
            "higher_is_better=...)}"
        )
    return metric
