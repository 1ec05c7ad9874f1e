"""Several workers on one study (journal file): one global budget, distinct parameters, a killed
trial retried from its last epoch whatever the budget says now, the best trial run on all folds."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd

from competition.config import REPO_ROOT, dump_yaml, replace
from competition.tune import spent, tune
from tests.conftest import trashnet_config

Trial = optuna.trial.TrialState


def test_two_workers_share_one_budget_and_never_repeat_parameters(
    kaggle_small, tmp_path, run_paths
):
    config = trashnet_config(
        kaggle_small,
        tmp_path,
        "name=par",
        "tune.params=[optim.lr, optim.weight_decay]",
        "tune.pruner=none",
        "tune.folds=[0]",  # trials score on fold 0; the best is then run on both folds
        "tune.workers=2",
        "tune.trials=3",
    )
    runs_dir = run_paths.pop("runs_dir")
    study = tune(config, runs_dir=runs_dir, **run_paths)
    trials = study.trials
    assert len(trials) == 3 and all(t.state == Trial.COMPLETE for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 3  # workers seeded by trial number: no two draws alike
    run_dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(run_dirs) == 3
    assert {t.user_attrs["worker"]["pid"] for t in trials} != {os.getpid()}  # run by workers
    best = study.best_trial.user_attrs["run_dir"]
    for run_dir in run_dirs:  # trials ran fold 0 only; the best was then completed
        done = list((runs_dir / run_dir.split("/")[-1]).glob("fold_*/result.json"))
        assert len(done) == (2 if run_dir == best else 1), run_dir
    assert tune(config, runs_dir=runs_dir, **run_paths).trials == trials  # budget spent: no more


def test_killed_trial_is_retried_from_its_last_epoch_whatever_the_budget(
    kaggle_small, tmp_path, run_paths
):
    config = trashnet_config(
        kaggle_small, tmp_path, "name=kill", "tune.params=[optim.lr]", "optim.epochs=2",
        "tune.pruner=none", "tune.trials=1",
    )  # fmt: skip
    runs_dir = run_paths.pop("runs_dir")
    path = tmp_path / "kill.yaml"
    path.write_text(dump_yaml(config.to_dict()))
    code = (
        "from pathlib import Path; from competition.config import load_config; "
        "from competition.tune import tune; "
        f"tune(load_config({str(path)!r}), runs_dir=Path({str(runs_dir)!r}), "
        + ", ".join(f"{k}=Path({str(v)!r})" for k, v in run_paths.items())
        + ")"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
    try:
        deadline = time.time() + 240
        logs = []
        while not logs and worker.poll() is None and time.time() < deadline:
            if list(runs_dir.glob("kill-*/fold_0/last.pt")):  # epoch 1 of fold 0 is saved
                logs = list(runs_dir.glob("kill-*/fold_0/log.csv"))
            time.sleep(0.1)
        assert logs, "the worker never finished an epoch"
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    killed_log = pd.read_csv(logs[0])
    assert len(killed_log) == 1

    # resumed at once, with tune.* changed and the budget spent: the trial still RUNNING is the
    # killed worker's; it is retried in the same run folder all the same
    config = replace(config, {"tune.pruner": "median", "tune.timeout_s": 600})
    study = tune(config, runs_dir=runs_dir, **run_paths)
    first, retry = study.trials[0], study.trials[1]
    assert first.state == Trial.FAIL
    assert retry.state == Trial.COMPLETE and retry.params == first.params
    assert retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["run_dir"] == first.user_attrs["run_dir"]  # the same run folder
    resumed_log = pd.read_csv(logs[0])
    assert len(resumed_log) == 2  # epochs 1..2: the killed worker's epoch kept, the rest trained
    pd.testing.assert_frame_equal(resumed_log.iloc[: len(killed_log)], killed_log)
    assert len(study.trials) == 2 and spent(study) == 1  # the retry is not a new trial
