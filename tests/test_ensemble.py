"""Blends of runs: weights fitted on OOF, a nested CV score, a valid submission."""

import json

import numpy as np
import pandas as pd
import pytest

from competition.cv import run_cv
from competition.ensemble import blend, fit_weights
from competition.errors import ConfigError
from tests.conftest import trashnet_config


def test_fit_weights_prefers_the_better_model():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 300)
    good = np.full((300, 3), 0.1)
    good[np.arange(300), targets] = 0.8
    noise = rng.dirichlet(np.ones(3), 300)
    weights = fit_weights(np.stack([noise, good]), targets)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[1] > 0.9


def test_blend_of_two_runs(kaggle_small, tmp_path, run_paths):
    run_cv(trashnet_config(kaggle_small, tmp_path, "name=a"), **run_paths)
    run_cv(
        trashnet_config(kaggle_small, tmp_path, "name=b", "model.backbone=test_resnet"),
        **run_paths,
    )
    runs = run_paths["runs_dir"]
    cv = blend(
        [runs / "a", runs / "b"], "ab", runs_dir=runs, submissions_dir=run_paths["submissions_dir"]
    )
    assert len(cv["weights"]) == 2 and sum(cv["weights"]) == pytest.approx(1.0)
    assert json.loads((runs / "ab" / "cv.json").read_text())["mean"] == cv["mean"]
    oof = pd.read_csv(runs / "ab" / "oof.csv")
    assert np.allclose(oof.iloc[:, 4:].sum(axis=1), 1.0, atol=1e-6)
    sample = pd.read_csv(kaggle_small / "sample_submission.csv", dtype=str)
    submission = pd.read_csv(cv["submission"], dtype=str)
    assert submission["image_id"].tolist() == sample["image_id"].tolist()

    # runs made on other folds cannot be blended honestly
    run_cv(trashnet_config(kaggle_small, tmp_path, "name=c", "folds.seed=7"), **run_paths)
    with pytest.raises(ConfigError, match="folds differ"):
        blend([runs / "a", runs / "c"], "ac", runs_dir=runs)
    with pytest.raises(ConfigError, match="at least two"):
        blend([runs / "a"], "a_only", runs_dir=runs)


def test_a_blend_never_overwrites_a_training_run(kaggle_small, tmp_path, run_paths):
    run_cv(trashnet_config(kaggle_small, tmp_path, "name=a"), **run_paths)
    run_cv(trashnet_config(kaggle_small, tmp_path, "name=b"), **run_paths)
    runs = run_paths["runs_dir"]
    with pytest.raises(ConfigError, match="is a training run"):
        blend([runs / "a", runs / "b"], "a", runs_dir=runs)
