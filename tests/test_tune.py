"""Optuna studies: suggestions applied to real runs, per-fold reports, resume from storage."""

import optuna
import pytest
import yaml

from competition.config import load_config
from competition.errors import ConfigError
from competition.tune import suggest_config, tune
from tests.conftest import trashnet_config


def test_builtin_space_opens_only_the_named_dimensions():
    config = load_config(None, ["tune.params=[optim.lr, loss.params.label_smoothing]"])
    trial = optuna.trial.FixedTrial({"optim.lr": 0.002, "loss.params.label_smoothing": 0.05})
    tuned = suggest_config(trial, config)
    assert tuned.optim.lr == 0.002 and tuned.loss.params["label_smoothing"] == 0.05
    assert tuned.optim.weight_decay == config.optim.weight_decay
    with pytest.raises(ConfigError, match=r"tune\.params: unknown built-in dimension"):
        suggest_config(trial, load_config(None, ["tune.params=[optim.momentum_x]"]))


def test_study_runs_reports_per_fold_and_resumes_from_storage(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, "tune.params=[optim.lr]", "name=study")
    runs_dir = run_paths.pop("runs_dir")
    study = tune(config, trials=1, runs_dir=runs_dir, **run_paths)
    assert len(study.trials) == 1
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert sorted(first.intermediate_values) == [0, 1]  # running CV mean after each fold
    assert (runs_dir / "study-study.db").is_file()

    resumed = tune(config, trials=2, runs_dir=runs_dir, **run_paths)  # one more, not two
    assert len(resumed.trials) == 2 and resumed.trials[0].params == first.params
    assert resumed.trials[1].params != first.params  # a resumed sampler does not replay trials
    best = yaml.safe_load((runs_dir / "study-best.yaml").read_text())
    assert best["optim"]["lr"] == pytest.approx(resumed.best_params["optim.lr"])
    # each trial's run folder holds a normal CV run
    assert all(
        (runs_dir / t.user_attrs["run_dir"].split("/")[-1] / "cv.json").is_file()
        for t in resumed.trials
    )
