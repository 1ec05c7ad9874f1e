"""Temperature scaling of class probabilities, fitted on out-of-fold (OOF) rows.

One scalar ``T`` per run: ``p' = softmax(log(p) / T)`` (Guo et al. 2017, "On Calibration of Modern
Neural Networks"). ``T`` minimises the log loss of the OOF rows it is fitted on; the argmax of
every row is unchanged, so accuracy-like metrics are untouched and log loss can only get better on
the rows ``T`` was fitted on. Fitted honestly:

* nested, per fold: fold ``k``'s OOF rows are scaled with ``T`` fitted on the other folds' rows;
* test (and holdout) rows: ``T`` fitted on all OOF rows.

Runs whose probabilities live on different scales (a k-NN vote at temperature 0.07 next to a
logistic regression) are calibrated before they are blended (``competition ensemble --calibrate``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from competition.metrics import log_loss

#: ``log T`` is searched in this interval (``T`` from 0.02 to 50).
LOG_T_BOUNDS = (-4.0, 4.0)
EPS = 1e-15


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)`` row by row; rows keep their argmax."""
    logits = _log_probs(probs) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the log loss of ``probs`` (N, K) on integer ``targets``."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return 1.0
    logp = _log_probs(probs)
    rows = np.arange(len(targets))

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, targets]))

    result = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(result.x))
    # never worse than leaving the probabilities alone on the rows it was fitted on
    return best if loss(result.x) <= loss(0.0) else 1.0


def nested_temperatures(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> dict:
    """``{fold: T}`` with each fold's ``T`` fitted on the other folds' rows only.

    With one fold there are no other rows: its ``T`` is fitted on itself (in-sample).
    """
    folds = np.asarray(folds)
    done = sorted(set(folds.tolist()))
    out = {}
    for fold in done:
        outside = folds != fold if len(done) > 1 else np.ones(len(folds), dtype=bool)
        out[int(fold)] = fit_temperature(probs[outside], targets[outside])
    return out


def calibrate_oof(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> tuple:
    """Nested temperature scaling of OOF rows: ``(scaled probs, {fold: T}, T of all rows)``.

    Fold ``k``'s rows are scaled with the ``T`` fitted without them; the ``T`` of all rows is the
    one to apply to test predictions.
    """
    folds = np.asarray(folds)
    per_fold = nested_temperatures(probs, targets, folds)
    scaled = np.empty_like(np.asarray(probs, dtype=np.float64))
    for fold, temperature in per_fold.items():
        rows = folds == fold
        scaled[rows] = apply_temperature(probs[rows], temperature)
    return scaled, per_fold, fit_temperature(probs, targets)


def calibration_report(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> dict:
    """OOF log loss before and after nested temperature scaling, and the temperatures."""
    scaled, per_fold, full = calibrate_oof(probs, targets, folds)
    return {
        "log_loss": log_loss(targets, probs),
        "log_loss_calibrated": log_loss(targets, scaled),
        "temperature": full,
        "temperatures": {str(k): v for k, v in per_fold.items()},
    }


__all__ = [
    "apply_temperature",
    "calibrate_oof",
    "calibration_report",
    "fit_temperature",
    "nested_temperatures",
]
