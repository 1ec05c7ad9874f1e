"""Blends of runs: weights fitted on OOF, a nested CV score, a valid submission."""

import json

import numpy as np
import pandas as pd
import pytest

from competition.calibration import apply_temperature
from competition.cv import run_cv
from competition.ensemble import (
    METHODS,
    Blender,
    blend,
    combine,
    fit_method,
    fit_weights,
    hill_climb,
)
from competition.errors import ConfigError
from competition.metrics import get_metric, log_loss
from competition.runs import FoldPredictions, FoldResult, OutputDirs, RunRecord, produce_run
from competition.workspace import Workspace
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


# -- methods, nested choice, calibration ---------------------------------------------------------

METRIC = get_metric("accuracy")


def _scenario(n=600, k=5, seed=0):
    """The issue's case: A is more accurate but underconfident; B is better calibrated."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, n)
    folds = np.arange(n) % 3

    def member(accuracy, top):
        right = rng.random(n) < accuracy
        guess = np.where(right, targets, (targets + rng.integers(1, k, n)) % k)
        probs = np.full((n, k), (1 - top) / (k - 1))
        probs[np.arange(n), guess] = top
        return probs

    return np.stack([member(0.92, 0.25), member(0.84, 0.84)]), targets, folds


def test_hill_climbs_on_the_metric_where_log_loss_prefers_the_worse_member():
    stack, targets, _ = _scenario()
    assert METRIC(targets, stack[0]) > METRIC(targets, stack[1])
    assert log_loss(targets, stack[0]) > log_loss(targets, stack[1])
    assert fit_weights(stack, targets)[1] > 0.5  # the surrogate follows calibration
    weights = hill_climb(stack, targets, METRIC)
    assert weights.sum() == pytest.approx(1.0) and weights[0] > weights[1]
    assert METRIC(targets, combine("hill", weights, stack)) >= METRIC(targets, stack[0])


def test_optimize_is_accepted_only_where_no_worse_than_hill_on_nested_oof():
    stack, targets, folds = _scenario()
    messages = []
    chosen, candidates = Blender(stack, targets, folds, METRIC).choose("optimize", messages.append)
    assert set(candidates) == {"hill", "optimize"}
    assert candidates["optimize"].nested < candidates["hill"].nested
    assert chosen.method == "hill" and "worse than hill" in messages[0]


def test_auto_keeps_the_best_nested_score_and_reports_in_sample_beside_it():
    stack, targets, folds = _scenario(seed=1)
    chosen, candidates = Blender(stack, targets, folds, METRIC).choose("auto", print)
    assert set(candidates) == set(METHODS)
    assert chosen.nested == max(c.nested for c in candidates.values())
    for c in candidates.values():
        # nested rows of fold k come from weights fitted without fold k
        for k in range(3):
            rest = folds != k
            expected = fit_method(c.method, stack[:, rest], targets[rest], METRIC)
            np.testing.assert_allclose(c.fold_weights[k], expected)
        assert 0 <= c.in_sample <= 1 and c.nested_log_loss > 0
    with pytest.raises(ConfigError, match="Did you mean: hill"):
        Blender(stack, targets, folds, METRIC).choose("hil", print)


def test_combine_methods():
    rng = np.random.default_rng(2)
    stack = rng.dirichlet(np.ones(4), (2, 30))
    half = np.array([0.5, 0.5])
    np.testing.assert_allclose(combine("mean", half, stack), stack.mean(0))
    product = np.sqrt(stack[0] * stack[1])
    np.testing.assert_allclose(
        combine("geometric", half, stack), product / product.sum(1, keepdims=True)
    )
    ranked = combine("rank", half, stack)
    np.testing.assert_allclose(ranked.sum(1), 1.0)
    # only the order within each class column counts: a monotone change of a member is invisible
    squashed = np.stack([stack[0] ** 3, stack[1]])
    np.testing.assert_allclose(combine("rank", half, squashed), ranked)


def _fixed_runs(root, tmp_path, run_paths, members: dict, *extra):
    """Runs whose probabilities are given (a producer like any other), on the same folds."""
    for name, make in members.items():
        config = trashnet_config(root, tmp_path, f"name={name}", *extra)
        workspace = Workspace(config, run_paths["folds_dir"], lambda *a: None)
        oof = make(workspace.targets, len(workspace.classes))
        test = make(np.arange(12) % 6, len(workspace.classes))

        def produce(task, oof=oof, test=test):
            splits = {"test": test}
            return FoldPredictions(oof[task.valid_index], splits, FoldResult(task.fold))

        produce_run(workspace, {"verb": "train"}, produce, dirs=OutputDirs(**run_paths))
    return [run_paths["runs_dir"] / name for name in members]


def _confident(accuracy, top, seed):
    def make(targets, k):
        rng = np.random.default_rng(seed)
        right = rng.random(len(targets)) < accuracy
        guess = np.where(right, targets, (targets + 1) % k)
        probs = np.full((len(targets), k), (1 - top) / (k - 1))
        probs[np.arange(len(targets)), guess] = top
        return probs

    return make


def test_a_blend_below_its_best_member_says_so_loudly(kaggle_small, tmp_path, run_paths):
    runs = _fixed_runs(
        kaggle_small,
        tmp_path,
        run_paths,
        {"good": _confident(0.9, 0.5, 0), "bad": _confident(0.0, 0.9, 1)},
    )
    lines = []
    cv = blend(runs, "gb", log=lines.append, method="mean", **run_paths)
    assert cv["mean"] < cv["members"][str(runs[0])]
    assert "below its best member" in cv["warning"] and str(runs[0]) in cv["warning"]
    assert any("WARNING" in line and "!!" in line for line in lines)
    # auto never picks a method whose nested score is below the best member's here
    auto = blend(runs, "gb-auto", log=lines.append, **run_paths)
    assert "warning" not in auto and auto["mean"] >= cv["members"][str(runs[0])]
    record = RunRecord.open(run_paths["runs_dir"] / "gb-auto")
    assert (
        record.produced_by["method"]
        == auto["method"]
        == max(
            auto["methods"],
            key=lambda m: (auto["methods"][m]["nested"], -auto["methods"][m]["nested_log_loss"]),
        )
    )
    assert [m["weight"] for m in record.produced_by["members"]] == pytest.approx(auto["weights"])
    assert record.produced_by["scores"] == auto["methods"]
    assert auto["mean"] == pytest.approx(auto["methods"][auto["method"]]["nested"])


def test_calibrate_scales_members_before_blending(kaggle_small, tmp_path, run_paths):
    runs = _fixed_runs(
        kaggle_small,
        tmp_path,
        run_paths,
        {"sharp": _confident(0.7, 0.999, 0), "soft": _confident(0.8, 0.3, 1)},
        "metric=log_loss",
    )
    assert not blend(runs, "raw", log=print, method="mean", calibrate=False, **run_paths)[
        "calibrate"
    ]
    assert blend(runs, "cal", log=print, method="mean", **run_paths)["calibrate"]  # log loss
    oof = {n: pd.read_csv(run_paths["runs_dir"] / n / "oof.csv") for n in ("raw", "cal")}
    losses = {
        n: log_loss(o["target_index"].to_numpy(), o.iloc[:, 4:].to_numpy()) for n, o in oof.items()
    }
    assert losses["cal"] < losses["raw"]
    members = RunRecord.open(run_paths["runs_dir"] / "cal").produced_by["members"]
    temperatures = [m["temperature"] for m in members]
    assert temperatures[0] > 1 > temperatures[1]  # the sharp member is softened, the soft sharpened
    # test rows: each member's test probabilities scaled by its temperature, then averaged
    member_test = [np.load(r / "fold_0" / "test_probs.npy") for r in runs]
    expected = np.mean(
        [apply_temperature(p, t) for p, t in zip(member_test, temperatures, strict=True)], 0
    )
    np.testing.assert_allclose(
        np.load(run_paths["runs_dir"] / "cal" / "fold_0" / "test_probs.npy"), expected
    )
