"""``predict RUN --tta auto``: greedy selection of TTA views on OOF, written as a new run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from competition.cli import main
from competition.config import TransformSpec
from competition.cv import predict_run, run_cv
from competition.errors import ConfigError
from competition.metrics import get_metric
from competition.runs import RunRecord
from competition.tta_select import _describe, _Scorer, greedy, label, parse_specs
from tests.conftest import trashnet_config

CANDIDATES = ["vflip", "rot90", "five_crop", {"name": "scale", "factor": 1.5}]


@pytest.fixture(scope="module")
def source(kaggle_small, tmp_path_factory):
    """A finished 2-fold run (views identity + hflip) and the folders it lives in."""
    tmp = tmp_path_factory.mktemp("tta_auto")
    paths = {k: tmp / k for k in ("runs_dir", "folds_dir", "submissions_dir")}
    cv = run_cv(trashnet_config(kaggle_small, tmp), log=lambda *a: None, **paths)
    return paths["runs_dir"] / "t", cv, paths


@pytest.fixture(scope="module")
def auto(source):
    run_dir, _, paths = source
    lines = []
    cv = predict_run(run_dir, {"tta": "auto"}, log=lines.append, candidates=CANDIDATES, **paths)
    return RunRecord.open(cv["run"]), cv, lines


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_auto_writes_a_new_run_with_the_chosen_views_and_every_candidates_score(source, auto):
    run_dir, source_cv, _ = source
    record, cv, lines = auto
    summary = record.produced_by["tta_auto"]
    assert record.produced_by["verb"] == "predict" and record.produced_by["changed"] == {
        "tta": "auto"
    }
    assert record.name.startswith("t-tta-auto-")
    assert summary["tried"] == [label(s) for s in parse_specs(CANDIDATES, "c")]
    assert summary["metric"] == "accuracy" and summary["higher_is_better"] is True
    assert set(summary["candidates"]) == {"vflip", "rot90", "five_crop", "scale(factor=1.5)"}
    for scores in summary["candidates"].values():
        assert 0.0 <= scores["alone"] <= 1.0 and 0.0 <= scores["added_first"] <= 1.0
    # the config holds the chosen views; the run's OOF score is the one selection reported
    assert [label(s) for s in record.config.tta] == summary["chosen"]
    assert cv["oof"] == pytest.approx(summary["oof"], abs=1e-6)
    # kept rounds raise the OOF metric; the last round tried found no gain (or nothing was left)
    kept = [r["oof"] for r in summary["rounds"] if r["kept"]]
    start = summary[f"{summary['start']}_oof"] if summary["start"] == "identity" else None
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    assert all(r["kept"] for r in summary["rounds"][:-1])
    if start is not None and kept:
        assert kept[0] > start
    assert summary["nested"] is not None and len(summary["nested"]["folds"]) == 2
    assert any("tta auto" in line and "chosen" in line for line in lines)
    assert RunRecord.open(run_dir).cv() == source_cv  # the source run is unchanged


def test_auto_never_lowers_the_oof_metric(source, auto):
    _, source_cv, _ = source
    record, cv, _ = auto
    summary = record.produced_by["tta_auto"]
    assert summary["source_oof"] == pytest.approx(source_cv["oof"], abs=1e-6)
    assert cv["oof"] >= source_cv["oof"] - 1e-9
    assert cv["oof"] >= summary["identity_oof"] - 1e-6  # recorded to 6 decimals


def test_a_candidates_score_is_its_views_on_each_folds_own_rows(source, auto):
    """A candidate's OOF score is what `predict` with that view alone records (each fold's
    model on its own validation rows), and the auto run's OOF rows are a plain predict's."""
    run_dir, _, paths = source
    record, _, _ = auto
    summary = record.produced_by["tta_auto"]
    alone = predict_run(run_dir, {"tta": ["rot90"]}, name="t-rot90", log=print, **paths)
    assert alone["oof"] == pytest.approx(summary["candidates"]["rot90"]["alone"], abs=1e-6)
    chosen = [{"name": s.name, **s.params} for s in record.config.tta]
    plain = predict_run(run_dir, {"tta": chosen}, name="t-chosen", **paths)
    ours = pd.read_csv(record.path / "oof.csv").sort_values("id")
    theirs = pd.read_csv(paths["runs_dir"] / "t-chosen" / "oof.csv").sort_values("id")
    classes = record.classes()
    assert np.allclose(ours[classes].to_numpy(), theirs[classes].to_numpy(), atol=1e-5)
    assert plain["oof"] == pytest.approx(summary["oof"], abs=1e-6)


def test_a_rerun_reuses_the_recorded_choice(source, auto):
    run_dir, _, paths = source
    record, cv, _ = auto
    before = _snapshot(record.path)
    lines = []
    again = predict_run(run_dir, {"tta": "auto"}, log=lines.append, candidates=CANDIDATES, **paths)
    assert again == cv and _snapshot(record.path) == before
    assert any("reusing the choice recorded" in line for line in lines)


def test_bad_requests_are_clear_errors(source, capsys):
    run_dir, _, paths = source
    with pytest.raises(ConfigError, match="--candidates: only with --tta auto"):
        predict_run(run_dir, {"tta": ["hflip"]}, candidates=["vflip"], **paths)
    # the command line: unknown candidate names suggest close ones, bad YAML names the option
    assert main(["predict", str(run_dir), "--tta", "auto", "--candidates", "[hflp]"]) == 2
    assert "unknown TTA view 'hflp'. Did you mean: hflip" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--tta", "auto", "--candidates", "[hflip"]) == 2
    assert "--candidates: not valid YAML" in capsys.readouterr().err


# -- the greedy selection itself, on logits made here ----------------------------------------------


def _scorer(seed: int, metric: str = "accuracy", views: int = 6, rows: int = 60):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, rows)
    signal = np.eye(3)[targets] * rng.uniform(0.0, 2.0, (views, rows, 1))
    logits = (signal + rng.normal(0.0, 1.0, (views, rows, 3))).astype(np.float32)
    return _Scorer(logits, targets, get_metric(metric), "mean_probs")


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_greedy_never_ends_below_its_start_and_keeps_only_gains(metric):
    for seed in range(20):
        scorer = _scorer(seed, metric)
        starts = {"identity": {0}, "source": {0, 1}}
        pool = {f"v{i}": {i} for i in range(1, 6)} | {"group": {2, 3}}
        start, added, chosen, log = greedy(scorer, starts, pool)
        first = scorer.score(starts[start])
        final = scorer.score(chosen)
        best_start = max if get_metric(metric).higher_is_better else min
        assert final[0] == best_start(final[0], first[0])
        assert not scorer.better(scorer.score(starts["identity"]), first)
        assert not scorer.better(scorer.score(starts["source"]), first)
        for step in log["rounds"][:-1]:
            assert step["kept"]
        # no remaining candidate would raise the metric
        for name, views in pool.items():
            if name not in added:
                assert not scorer.improves(scorer.score(chosen | views), final)


def test_greedy_adds_a_helpful_view_and_skips_a_harmful_one():
    targets = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(3)[targets] * 3.0
    wrong = np.eye(3)[(targets + 1) % 3] * 3.0
    identity = right.copy()
    identity[:3] = wrong[:3]  # the raw model gets half the rows wrong
    helpful = right * 2.0  # confidently right everywhere
    harmful = wrong * 5.0
    logits = np.stack([identity, helpful, harmful]).astype(np.float32)
    scorer = _Scorer(logits, targets, get_metric("accuracy"), "mean_probs")
    start, added, chosen, log = greedy(scorer, {"identity": {0}}, {"helpful": {1}, "harmful": {2}})
    assert (start, added, chosen) == ("identity", ["helpful"], {0, 1})
    assert log["rounds"][0]["scores"]["helpful"][0] == 1.0
    assert [r["kept"] for r in log["rounds"]] == [True, False]


def test_candidate_labels_and_specs():
    specs = parse_specs(["hflip", {"name": "scale", "factor": 1.3}], "c")
    assert specs == [TransformSpec("hflip"), TransformSpec("scale", {"factor": 1.3})]
    assert [label(s) for s in specs] == ["hflip", "scale(factor=1.3)"]
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_specs([], "--candidates")


def test_a_gain_that_does_not_survive_nested_selection_is_flagged():
    summary = {
        "metric": "accuracy",
        "higher_is_better": True,
        "merge": "mean_probs",
        "source_views": ["identity"],
        "source_oof": 0.70,
        "identity_oof": 0.70,
        "candidates": {"hflip": {"alone": 0.69, "added_first": 0.72}},
        "rounds": [{"best": "hflip", "kept": True, "oof": 0.72}],
        "chosen": ["identity", "hflip"],
        "oof": 0.72,
        "nested": {"mean": 0.68, "source_mean": 0.70},
    }
    assert "likely selection noise" in _describe(summary)
    summary["nested"]["mean"] = 0.71
    assert "warning" not in _describe(summary)
