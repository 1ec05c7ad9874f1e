"""Built-in validation metrics, registered as any plugin's would be (``metric: <name>``).

* ``accuracy``, ``macro_f1`` and ``balanced_accuracy`` (mean per-class recall; Brodersen et al.
  2010, "The balanced accuracy and its posterior distribution") score the most probable class,
  with scikit-learn.
* ``log_loss``: mean negative log-probability of the true class, clipped and renormalised as
  Kaggle does (:func:`competition.metrics.log_loss`); lower is better.
* ``qwk``: quadratic weighted kappa (Cohen 1968, "Weighted kappa: nominal scale agreement with
  provision for scaled disagreement or partial credit"), for ordered classes (disease grades,
  ratings): predicting class j for class i costs (i - j)^2, class indices giving the order.
* ``map_at_3``: mean average precision at 3 as Kaggle scores it: a row scores 1/rank of its true
  class among its three most probable classes, 0 beyond; tied probabilities rank the lower class
  index first.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from competition import hookimpl
from competition.metrics import Metric, log_loss


def accuracy(targets: np.ndarray, probs: np.ndarray) -> float:
    return skm.accuracy_score(targets, probs.argmax(1))


def balanced_accuracy(targets: np.ndarray, probs: np.ndarray) -> float:
    return skm.balanced_accuracy_score(targets, probs.argmax(1))


def macro_f1(targets: np.ndarray, probs: np.ndarray) -> float:
    """F1 averaged over all K classes; a class neither present nor predicted in a fold scores 0."""
    labels = range(probs.shape[1])
    return skm.f1_score(targets, probs.argmax(1), average="macro", labels=labels, zero_division=0)


def qwk(targets: np.ndarray, probs: np.ndarray) -> float:
    """Quadratic weighted kappa of the argmax class. ``labels=range(K)``: without it sklearn
    weighs by position among the classes present, and a fold lacking a middle grade would
    put grades 1 and 3 at distance 1."""
    labels = range(probs.shape[1])
    return skm.cohen_kappa_score(targets, probs.argmax(1), labels=labels, weights="quadratic")


def map_at_3(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean over rows of 1/rank of the true class if it is among the 3 most probable, else 0."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    hits = top == np.asarray(targets)[:, None]
    return float((hits / np.arange(1, top.shape[1] + 1)).sum(axis=1).mean())


BUILTIN = (
    Metric("accuracy", accuracy),
    Metric("balanced_accuracy", balanced_accuracy),
    Metric("macro_f1", macro_f1),
    Metric("log_loss", log_loss, higher_is_better=False),
    Metric("qwk", qwk),
    Metric("map_at_3", map_at_3),
)


@hookimpl
def competition_register_metrics():
    return {metric.name: metric for metric in BUILTIN}
