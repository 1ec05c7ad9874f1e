"""Temperature scaling on OOF rows: recovers a known temperature, nested per fold, argmax kept."""

import numpy as np
import pytest

from competition.calibration import (
    apply_temperature,
    calibrate_oof,
    calibration_report,
    fit_temperature,
    nested_temperatures,
)
from competition.metrics import log_loss


def _overconfident(n=4000, k=4, sharpen=3.0, seed=0):
    """Targets drawn from softmax(z); the 'model' reports softmax(z * sharpen)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    targets = np.array([rng.choice(k, p=p) for p in true])
    sharp = np.exp(z * sharpen)
    return sharp / sharp.sum(1, keepdims=True), targets


def test_fit_temperature_recovers_a_known_temperature():
    probs, targets = _overconfident(sharpen=3.0)
    assert fit_temperature(probs, targets) == pytest.approx(3.0, rel=0.15)
    soft, targets = _overconfident(sharpen=0.5, seed=1)
    assert fit_temperature(soft, targets) == pytest.approx(0.5, rel=0.15)


def test_apply_temperature_keeps_the_argmax_and_lowers_the_log_loss():
    probs, targets = _overconfident()
    scaled = apply_temperature(probs, fit_temperature(probs, targets))
    np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))
    np.testing.assert_allclose(scaled.sum(1), 1.0)
    assert log_loss(targets, scaled) < log_loss(targets, probs) - 0.05
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)


def test_a_fold_is_scaled_with_a_temperature_fitted_without_it():
    probs, targets = _overconfident(n=900)
    folds = np.arange(900) % 3
    per_fold = nested_temperatures(probs, targets, folds)
    for k in range(3):
        assert per_fold[k] == pytest.approx(fit_temperature(probs[folds != k], targets[folds != k]))
    # changing fold 0's rows leaves fold 0's temperature alone and moves the others'
    changed = probs.copy()
    changed[folds == 0] = apply_temperature(probs[folds == 0], 0.2)
    moved = nested_temperatures(changed, targets, folds)
    assert moved[0] == pytest.approx(per_fold[0])
    assert moved[1] != pytest.approx(per_fold[1])
    scaled, per_fold_again, full = calibrate_oof(probs, targets, folds)
    assert per_fold_again == per_fold
    assert full == pytest.approx(fit_temperature(probs, targets))
    rows = folds == 2
    np.testing.assert_allclose(scaled[rows], apply_temperature(probs[rows], per_fold[2]))
    report = calibration_report(probs, targets, folds)
    assert report["log_loss_calibrated"] < report["log_loss"]
    assert set(report["temperatures"]) == {"0", "1", "2"}


def test_a_temperature_never_makes_the_fitted_rows_worse():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, 200)
    calibrated = np.full((200, 3), 0.2)
    calibrated[np.arange(200), targets] = 0.6
    temperature = fit_temperature(calibrated, targets)
    scaled = apply_temperature(calibrated, temperature)
    assert log_loss(targets, scaled) <= log_loss(targets, calibrated) + 1e-12
    assert fit_temperature(calibrated[:0], targets[:0]) == 1.0
