"""Frozen-feature baselines: run outputs, the embedding cache, no leakage, k-NN, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from competition.baseline import (
    C_GRID,
    METHODS,
    NORMS,
    BaselineOptions,
    EmbeddingStore,
    Linear,
    Normaliser,
    backbone_configs,
    embeddings_dir,
    fit_predict,
    l2,
    run_baseline,
)
from competition.cli import main
from competition.config import REPO_ROOT, load_config, replace
from competition.cv import run_cv
from competition.errors import ConfigError
from competition.metrics import get_metric
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
    fixed_c = None if norm == "center_l2" else 1.0  # the inner CV of C once: it is slow
    options = BaselineOptions(method=method, norm=norm, pca_dim=16, k=5, C=fixed_c)
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


# -- the linear probe's C, several backbones -----------------------------------------------------


def test_linear_picks_C_by_inner_cv_on_the_train_rows_only(digits):
    x, y = digits
    train_x, train_y = x[:150] / 16, y[:150]
    probe = Linear(10, C=None, metric=get_metric("accuracy")).fit(train_x, train_y)
    assert probe.C_ in C_GRID and sorted(probe.scores_) == sorted(C_GRID)
    # the same inner CV by hand: stratified 3-fold on the train rows, accuracy per C
    inner = StratifiedKFold(3, shuffle=True, random_state=0)
    by_hand = {
        c: np.mean(
            [
                LogisticRegression(C=c, max_iter=2000)
                .fit(train_x[a], train_y[a])
                .score(train_x[b], train_y[b])
                for a, b in inner.split(train_x, train_y)
            ]
        )
        for c in C_GRID
    }
    for c in C_GRID:
        assert probe.scores_[c][0] == pytest.approx(by_hand[c], abs=0.02)
    assert by_hand[probe.C_] >= max(by_hand.values()) - 0.02
    # then refitted on all train rows with the chosen C
    refit = LogisticRegression(C=probe.C_, max_iter=2000).fit(train_x, train_y)
    np.testing.assert_allclose(
        probe.predict_proba(x[300:]), refit.predict_proba(x[300:]), atol=1e-4
    )
    fixed = Linear(10, C=1.0).fit(train_x, train_y)
    assert fixed.C_ == 1.0 and fixed.scores_ == {}
    details = {}
    options = BaselineOptions("linear", norm="none")
    fit_predict(train_x, train_y, [x[300:]], 10, options, metric=probe.metric, details=details)
    assert details["C"] == probe.C_


def test_blocks_are_each_centred_and_l2_normalised_on_the_train_rows(digits):
    x, _ = digits
    train, query = x[:300], x[300:]
    norm = Normaliser("none", blocks=[24, 40]).fit(train)
    out = norm.transform(query)
    mean = train.mean(0)
    np.testing.assert_allclose(out[:, :24], l2(query[:, :24] - mean[:24]))
    np.testing.assert_allclose(out[:, 24:], l2(query[:, 24:] - mean[24:]))
    np.testing.assert_allclose(np.linalg.norm(out[:, :24], axis=1), 1.0)
    with pytest.raises(ConfigError, match="width 64"):
        Normaliser("none", blocks=[24, 24]).fit(train)


def test_a_list_of_backbones_concatenates_their_cached_embeddings(
    kaggle_small, tmp_path, run_paths
):
    quiet = lambda *a: None  # noqa: E731
    single = trashnet_config(kaggle_small, tmp_path)
    run_baseline(single, BaselineOptions(method="ncm"), log=quiet, **run_paths)
    both = trashnet_config(
        kaggle_small, tmp_path, "model.backbone=[resnet10t, test_resnet]", "name=two"
    )
    cv = run_baseline(both, BaselineOptions(method="ncm"), log=quiet, **run_paths)
    # resnet10t's embeddings come from the cache of the one-backbone run; test_resnet's are new
    assert sorted(cv["embeddings"]["computed"]) == ["test/identity", "train/identity"]
    workspace = Workspace(both, run_paths["folds_dir"], quiet)
    parts = [EmbeddingStore(workspace, quiet, c).get("train") for c in backbone_configs(both)]
    assert cv["embeddings"]["dims"] == [p.shape[1] for p in parts] and len(parts) == 2
    # fold 0's OOF rows are the ncm of the blockwise-normalised concatenation
    valid = workspace.fold_of == 0
    (expected,) = fit_predict(
        np.hstack(parts)[~valid],
        workspace.targets[~valid],
        [np.hstack(parts)[valid]],
        6,
        BaselineOptions(method="ncm"),
        blocks=cv["embeddings"]["dims"],
    )
    oof = pd.read_csv(run_paths["runs_dir"] / "two-ncm" / "fold_0" / "oof.csv")
    np.testing.assert_allclose(oof.iloc[:, 4:].to_numpy(), expected, atol=1e-6)


def test_a_list_of_backbones_is_for_baselines_only(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, "model.backbone=[resnet10t, test_resnet]")
    with pytest.raises(ConfigError, match="list of backbones is for frozen-feature baselines"):
        run_cv(config, **run_paths)
    assert not (run_paths["runs_dir"] / "t").exists()
    with pytest.raises(ConfigError, match="null or a list of 2"):
        backbone_configs(replace(config, {"model.pretrained": "efficientnet_lite0_imagenet"}))
    one = replace(config, {"model.backbone": "resnet10t", "model.pretrained": ["a", "b"]})
    with pytest.raises(ConfigError, match="one name"):
        backbone_configs(one)
    weights = ["efficientnet_lite0_imagenet", "w.pt"]
    configs = backbone_configs(replace(config, {"model.pretrained": weights}))
    assert [(c.model.backbone, c.model.pretrained) for c in configs] == [
        ("resnet10t", "efficientnet_lite0_imagenet"),
        ("test_resnet", "w.pt"),
    ]
