"""``competition pseudo``: a new run trained with the fold ensemble's confident test labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from competition.cli import parse
from competition.cv import run_cv
from competition.errors import ConfigError
from competition.pseudo import (
    PseudoTrainFold,
    fold_ensemble,
    make_pseudo_labels,
    pseudo_run,
)
from competition.runs import FoldTask, RunRecord
from competition.workspace import Workspace
from tests.conftest import trashnet_config

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def source(kaggle_small, tmp_path_factory):
    """A finished 2-fold run on ``kaggle_small`` and its output folders."""
    tmp = tmp_path_factory.mktemp("pseudo")
    paths = {"runs_dir": tmp / "runs", "folds_dir": tmp / "folds", "submissions_dir": tmp / "sub"}
    config = trashnet_config(kaggle_small, tmp, "name=src", "optim.epochs=2")
    cv = run_cv(config, **QUIET, **paths)
    return paths["runs_dir"] / "src", paths, cv, kaggle_small


def median_confidence(run_dir) -> float:
    return float(np.median(fold_ensemble(RunRecord.open(run_dir)).max(1)))


def test_labels_are_the_confident_rows_of_the_fold_mean():
    probs = np.array([[0.9, 0.1, 0.0], [0.4, 0.35, 0.25], [0.05, 0.15, 0.8]])
    hard = make_pseudo_labels(probs, 0.8, soft=False)
    assert hard.index.tolist() == [0, 2] and hard.targets.tolist() == [0, 2]
    assert hard.per_class(["a", "b", "c"]) == {"a": 1, "b": 0, "c": 1}
    soft = make_pseudo_labels(probs, 0.8, soft=True)
    np.testing.assert_allclose(soft.targets, probs[[0, 2]])
    with pytest.raises(ConfigError, match=r"most confident is 0\.900\); lower it"):
        make_pseudo_labels(probs, 0.95, soft=False)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        make_pseudo_labels(probs, 1.5, soft=False)


def test_hard_pseudo_run_records_its_source_and_scores_only_real_rows(source, tmp_path):
    src, paths, source_cv, _ = source
    threshold = median_confidence(src)
    cv = pseudo_run(src, threshold, name="ph", **QUIET, **paths)
    run = RunRecord.open(paths["runs_dir"] / "ph")
    produced = yaml.safe_load((run.path / "config.yaml").read_text())["produced_by"]
    ensemble = fold_ensemble(RunRecord.open(src))
    taken = np.flatnonzero(ensemble.max(1) >= threshold)
    assert produced["verb"] == "pseudo" and produced["source"] == str(src)
    assert produced["labels"] == "hard" and produced["threshold"] == threshold
    assert produced["taken"] == len(taken) > 0 and produced["of"] == len(ensemble)
    assert sum(produced["per_class"].values()) == len(taken)
    # OOF: the train table's rows with their real labels, never a test image
    oof, train = run.oof(), run_train_table(run)
    assert sorted(oof["id"]) == sorted(train["image_id"])
    labels = dict(zip(train["image_id"], train["label"], strict=True))
    assert (oof["target"] == oof["id"].map(labels)).all()
    assert cv["gain"]["before"] == pytest.approx(source_cv["mean"])
    assert cv["gain"]["gain"] == pytest.approx(cv["mean"] - source_cv["mean"])
    report = (run.path / "report.md").read_text()
    assert f"## Gain over `{src}`" in report and "taken per class" in report
    assert (paths["submissions_dir"] / "ph.csv").is_file()


def run_train_table(run: RunRecord) -> pd.DataFrame:
    root = run.config.data_root()
    return pd.read_csv(root / run.config.competition.train_csv, dtype=str)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_the_fold_trains_on_its_rows_plus_pseudo_labelled_test_images(source, soft):
    src, paths, _, _ = source
    record = RunRecord.open(src)
    workspace = Workspace(record.config, paths["folds_dir"], **QUIET)
    ensemble = fold_ensemble(record)
    pseudo = make_pseudo_labels(ensemble, median_confidence(src), soft)
    train_index = np.flatnonzero(workspace.fold_of != 0)
    task = FoldTask(0, train_index, np.flatnonzero(workspace.fold_of == 0), src, src)
    dataset = PseudoTrainFold(workspace, pseudo).train_loader(task).dataset
    n = len(train_index)
    assert len(dataset) == n + len(pseudo.index)
    # the added images are the test images taken, in order (train images get no pseudo-label)
    test = workspace.images("test")
    for i, row in enumerate(pseudo.index):
        np.testing.assert_array_equal(np.array(dataset.images[n + i]), np.array(test[row]))
    real = workspace.targets[train_index]
    if soft:
        np.testing.assert_allclose(dataset.soft[:n], np.eye(len(workspace.classes))[real])
        np.testing.assert_allclose(dataset.soft[n:], ensemble[pseudo.index], rtol=1e-6)
        _, targets = next(iter(PseudoTrainFold(workspace, pseudo).train_loader(task)))
        assert targets.dtype == torch.float32 and targets.shape[1] == len(workspace.classes)
    else:
        assert dataset.soft is None
        assert dataset.targets[:n].tolist() == real.tolist()
        assert dataset.targets[n:].tolist() == ensemble[pseudo.index].argmax(1).tolist()


def test_soft_labels_train_with_mixup(source):
    src, paths, _, _ = source
    overrides = {"augment.batch": [{"name": "mixup", "alpha": 0.4}]}
    cv = pseudo_run(
        src, median_confidence(src), soft=True, overrides=overrides, folds=[0], **QUIET, **paths
    )
    run = RunRecord.open(paths["runs_dir"] / f"src-pseudo-soft-t{median_confidence(src):g}")
    assert cv["folds_done"] == [0] and run.produced_by["labels"] == "soft"
    assert run.config.augment.batch[0].name == "mixup"


def test_refuses_the_source_name_and_a_run_without_test_predictions(source):
    src, paths, _, _ = source
    with pytest.raises(ConfigError, match="that is the source run"):
        pseudo_run(src, 0.5, name="src", **QUIET, **paths)
    with pytest.raises(ConfigError, match="no finished fold"):
        empty = paths["runs_dir"] / "empty"
        empty.mkdir()
        (empty / "config.yaml").write_text((src / "config.yaml").read_text())
        pseudo_run(empty, 0.5, **QUIET, **paths)


def test_cli_parses_pseudo():
    args = parse(["pseudo", "runs/a", "--threshold", "0.9", "--soft", "optim.epochs=3"])
    assert (args.run_dir, args.threshold, args.soft, args.overrides) == (
        "runs/a",
        0.9,
        True,
        ["optim.epochs=3"],
    )
