"""Post-hoc logit adjustment (Menon et al. 2021) of a finished run, as a new run."""

from __future__ import annotations

import numpy as np
import pytest

from competition.adjust import adjust_probs, adjust_run, choose_tau, fold_priors
from competition.cli import parse
from competition.cv import run_cv
from competition.errors import ConfigError
from competition.metrics import get_metric
from competition.runs import RunRecord
from tests.conftest import trashnet_config


@pytest.fixture(scope="module")
def finished(kaggle_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adjust")
    paths = {k: tmp / k for k in ("runs", "folds", "submissions")}
    paths = {
        "runs_dir": paths["runs"],
        "folds_dir": paths["folds"],
        "submissions_dir": paths["submissions"],
    }
    config = trashnet_config(kaggle_small, tmp, "metric=balanced_accuracy")
    run_cv(config, log=lambda *_: None, **paths)
    return paths


def test_adjust_probs_hand_worked():
    # p = (0.5, 0.5), prior = (0.8, 0.2), tau = 1: proportional to (0.625, 2.5) -> (0.2, 0.8)
    out = adjust_probs(np.array([[0.5, 0.5]]), np.array([0.8, 0.2]), 1.0)
    assert np.allclose(out, [[0.2, 0.8]])
    assert np.allclose(
        adjust_probs(np.array([[0.3, 0.7]]), np.array([0.8, 0.2]), 0.0), [[0.3, 0.7]]
    )
    # tau = 2 divides by prior^2: (0.5/0.64, 0.5/0.04) -> (1/17, 16/17)
    assert np.allclose(
        adjust_probs(np.array([[0.5, 0.5]]), np.array([0.8, 0.2]), 2.0), [[1 / 17, 16 / 17]]
    )


def test_fold_priors_are_the_training_frequencies():
    targets = np.array([0, 0, 0, 1, 0, 1])
    fold_of = np.array([0, 0, 1, 1, 1, 0])
    priors = fold_priors(targets, fold_of, [0, 1], 2)
    assert np.allclose(priors[0], [2 / 3, 1 / 3])  # fold 0 trains on rows 2, 3, 4
    assert np.allclose(priors[1], [2 / 3, 1 / 3])  # fold 1 trains on rows 0, 1, 5


def test_choose_tau_prefers_the_balanced_answer():
    # one rare-class row predicted 0.6/0.4 for the head: tau 1 with prior 0.9/0.1 fixes it
    metric = get_metric("balanced_accuracy")
    targets = np.array([0, 0, 1])
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4]])
    tau, scores = choose_tau(metric, [(targets, probs, np.array([0.9, 0.1]))], taus=(0.0, 1.0))
    assert tau == 1.0 and scores[0.0] == 0.5 and scores[1.0] == 1.0


def test_adjust_run_is_nested_and_a_new_run(finished):
    source = RunRecord.open(finished["runs_dir"] / "t")
    cv = adjust_run(source.path, "auto", log=lambda *_: None, **finished)
    assert cv["nested"] and cv["complete"]
    new = RunRecord.open(finished["runs_dir"] / "t-adjust-tauauto")
    assert new.produced_by["verb"] == "adjust"
    # fold 0's tau is the best on fold 1's OOF rows only (never on fold 0's own rows)
    ws_targets = source.fold_oof(1)["target_index"].to_numpy()
    counts = np.bincount(ws_targets, minlength=6).astype(float)
    prior = np.maximum(counts, 1) / np.maximum(counts, 1).sum()  # fold 0 trains on fold 1
    want, _ = choose_tau(
        source.metric, [(ws_targets, source.fold_oof(1)[source.classes()].to_numpy(), prior)]
    )
    assert cv["taus"][0] == want
    oof = new.fold_oof(0)[new.classes()].to_numpy()
    expected = adjust_probs(source.fold_oof(0)[source.classes()].to_numpy(), prior, want)
    assert np.allclose(oof, expected)
    test = adjust_probs(source.fold_probs(0, "test"), prior, want)
    assert np.allclose(new.fold_probs(0, "test"), test)
    assert (finished["submissions_dir"] / "t-adjust-tauauto.csv").is_file()


def test_fixed_tau_and_bad_values(finished):
    cv = adjust_run(finished["runs_dir"] / "t", 1, name="la1", log=lambda *_: None, **finished)
    assert cv["taus"] == {0: 1.0, 1: 1.0}
    with pytest.raises(ConfigError, match="--tau"):
        adjust_run(finished["runs_dir"] / "t", "big", **finished)
    with pytest.raises(ConfigError, match="source run"):
        adjust_run(finished["runs_dir"] / "t", 1, name="t", **finished)


def test_cli_parses_adjust():
    args = parse(["adjust", "runs/x", "--tau", "0.5", "--name", "y"])
    assert (args.run_dir, args.tau, args.name) == ("runs/x", "0.5", "y")
