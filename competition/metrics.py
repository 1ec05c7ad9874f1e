"""Validation metrics, chosen by name in the config (``metric: accuracy``).

Each metric takes integer targets (N,) and class probabilities (N, K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from competition.errors import ConfigError


@dataclass(frozen=True)
class Metric:
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


def _log_loss(targets: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(probs, 1e-15, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(probs[np.arange(len(targets)), targets])))


METRICS = {
    m.name: m
    for m in [
        Metric("accuracy", lambda t, p: skm.accuracy_score(t, p.argmax(1))),
        Metric("balanced_accuracy", lambda t, p: skm.balanced_accuracy_score(t, p.argmax(1))),
        Metric(
            "macro_f1",
            lambda t, p: skm.f1_score(t, p.argmax(1), average="macro", labels=range(p.shape[1])),
        ),
        Metric("log_loss", _log_loss, higher_is_better=False),
    ]
}


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


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"metric: unknown metric '{name}'; choose one of {', '.join(METRICS)}")
    return METRICS[name]
