"""Frozen-feature baselines: run outputs, the embedding cache, no leakage, k-NN, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from competition.baseline import (
    METHODS,
    NORMS,
    BaselineOptions,
    EmbeddingStore,
    Normaliser,
    embeddings_dir,
    fit_predict,
    l2,
    run_baseline,
)
from competition.cli import main
from competition.config import REPO_ROOT, load_config
from competition.errors import ConfigError
from competition.runs import RunRecord
from competition.workspace import Workspace
from tests.conftest import tiny_overrides, trashnet_config


@pytest.fixture(scope="module")
def digits():
    """Real features: the 8x8 digit images of scikit-learn as 64-d vectors."""
    x, y = load_digits(return_X_y=True)
    return x[:400].astype(np.float64), y[:400]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_the_outputs_of_a_training_run(
    method, kaggle_small, tmp_path, run_paths
):
    config = trashnet_config(kaggle_small, tmp_path)
    cv = run_baseline(config, BaselineOptions(method=method, k=3), log=lambda *a: None, **run_paths)
    run_dir = Path(cv["run"])
    assert run_dir == run_paths["runs_dir"] / {"knn": "t-knn-k3"}.get(method, f"t-{method}")
    for fold in range(2):
        for name in ("oof.csv", "test_probs.npy", "result.json"):
            assert (run_dir / f"fold_{fold}" / name).is_file()
        test_probs = np.load(run_dir / f"fold_{fold}" / "test_probs.npy")
        assert test_probs.shape == (12, 6)
        np.testing.assert_allclose(test_probs.sum(1), 1.0)
    oof = pd.read_csv(run_dir / "oof.csv")
    assert len(oof) == 48 and sorted(oof["fold"].unique()) == [0, 1]
    np.testing.assert_allclose(oof.iloc[:, 4:].sum(axis=1), 1.0)
    saved = json.loads((run_dir / "cv.json").read_text())
    assert saved["k"] == 2 and len(saved["folds"]) == 2 and 0 <= saved["oof"] <= 1
    assert RunRecord.open(run_dir).produced_by["baseline"]["method"] == method
    assert (run_dir / "report.md").is_file()
    submission = pd.read_csv(cv["submission"])
    assert len(submission) == 12 and set(submission["label"]) <= set(oof.columns[4:])


def test_embeddings_are_cached_and_reused(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path)
    quiet = lambda *a: None  # noqa: E731
    first = run_baseline(config, BaselineOptions(method="ncm"), log=quiet, **run_paths)
    assert sorted(first["embeddings"]["computed"]) == ["test/identity", "train/identity"]
    files = sorted(embeddings_dir(config).glob("*.npy"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = run_baseline(config, BaselineOptions(method="knn"), log=quiet, **run_paths)
    assert second["embeddings"]["computed"] == []
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    store = EmbeddingStore(Workspace(config, run_paths["folds_dir"], quiet), quiet)
    assert store.get("train").shape[0] == 48
    assert store.model is None, "a cached embedding must not build (or run) the model"

    flipped = run_baseline(
        config, BaselineOptions(method="knn", hflip=True), log=quiet, **run_paths
    )
    assert sorted(flipped["embeddings"]["computed"]) == ["test/hflip", "train/hflip"]
    other_size = trashnet_config(kaggle_small, tmp_path, "data.image_size=40")
    assert (
        EmbeddingStore(Workspace(other_size, run_paths["folds_dir"], quiet), quiet).path(
            "train", "identity"
        )
        not in files
    )


@pytest.mark.parametrize("kind", ["center_l2", "pca", "pca_whiten"])
def test_normaliser_is_fitted_on_the_train_rows_only(kind, digits):
    x, _ = digits
    train, query = x[:300], x[300:]
    norm = Normaliser(kind, pca_dim=16).fit(train)
    np.testing.assert_allclose(norm.mean_, train.mean(0))
    moved = Normaliser(kind, pca_dim=16).fit(np.vstack([train, query]))
    assert not np.allclose(moved.transform(query), norm.transform(query))
    if kind == "center_l2":
        np.testing.assert_allclose(norm.transform(query), l2(query - train.mean(0)))
    out = norm.transform(query)
    assert out.shape == (100, 64 if kind == "center_l2" else 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("method", METHODS)
def test_a_prediction_depends_on_the_train_rows_and_itself_only(method, norm, digits):
    x, y = digits
    options = BaselineOptions(method=method, norm=norm, pca_dim=16, k=5)
    train_x, train_y, query = x[:300], y[:300], x[300:]
    together, alone = fit_predict(train_x, train_y, [query, query[:1]], 10, options)
    np.testing.assert_allclose(together[:1], alone)
    (shifted,) = fit_predict(
        train_x, train_y, [np.vstack([query[:1], query[1:] * 3 + 7])], 10, options
    )
    np.testing.assert_allclose(shifted[:1], alone)
    assert (together.argmax(1) == y[300:]).mean() > 0.8


@pytest.mark.parametrize("norm", NORMS)
def test_1nn_on_its_own_train_set_is_perfect(norm, digits):
    x, y = digits
    (probs,) = fit_predict(x, y, [x], 10, BaselineOptions(method="knn", k=1, norm=norm, pca_dim=32))
    assert (probs.argmax(1) == y).all()
    np.testing.assert_allclose(probs.max(1), 1.0)


def test_unknown_method_or_norm_is_a_clear_error(capsys):
    with pytest.raises(ConfigError, match=r"--method='svm'.*knn, ncm, linear"):
        BaselineOptions(method="svm")
    with pytest.raises(ConfigError, match="Did you mean center_l2"):
        BaselineOptions(norm="centre_l2")
    code = main(["baseline", str(REPO_ROOT / "configs" / "trashnet.yaml"), "--method", "kmn"])
    assert code == 2
    assert "Did you mean knn" in capsys.readouterr().err


def test_holdout_is_scored_as_lb(folders_small, tmp_path, run_paths):
    """Class folders with a labelled val/ (hymenoptera): fold-mean LB and LB fitted on all train."""
    config = load_config(
        REPO_ROOT / "configs" / "hymenoptera.yaml",
        [f"competition.root={folders_small}", "folds.k=2", "name=h", *tiny_overrides(tmp_path)],
    )
    cv = run_baseline(config, BaselineOptions(method="linear"), log=lambda *a: None, **run_paths)
    assert 0 <= cv["lb"] <= 1 and 0 <= cv["lb_full"] <= 1
    assert np.load(run_paths["runs_dir"] / "h-linear" / "fold_1" / "holdout_probs.npy").shape == (
        8,
        2,
    )
