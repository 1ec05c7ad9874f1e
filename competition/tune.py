"""Optuna studies over the recipe, scored by the CV mean, with pruning and resumable storage.

Every plugin suggests ``{"dotted.key": value}`` for a trial (:func:`suggest_config`); the
suggestions are merged (a later plugin overrides an earlier one) and validated by the config. A
trial trains its folds one by one and reports the running CV mean after each, so a pruner
(median rule) stops a bad recipe after its first folds. The study lives in SQLite storage
(``runs/<name>-study.db``): a killed study resumes, and a trial killed mid-way is retried with the
same parameters, its run folder (named by a hash of its parameters) resuming from ``last.pt``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from competition.config import Config, dump_yaml, replace
from competition.cv import run_cv
from competition.errors import ConfigError, DivergenceError
from competition.io import write_text
from competition.manager import get_plugin_manager
from competition.metrics import get_metric
from competition.runs import RUNS_DIR


def suggest_config(trial, config: Config, pm=None) -> Config:
    """The config for one Optuna ``trial``: ``config`` with every plugin's suggestions applied."""
    pm = pm or get_plugin_manager()
    overrides: dict = {}
    for suggestions in reversed(pm.hook.competition_search_space(trial=trial, config=config)):
        overrides.update(suggestions or {})
    try:
        return replace(config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"a search space suggested a bad value: {exc}") from exc


def _trial_name(config: Config, params: dict) -> str:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    return f"{config.name}-{digest[:10]}"


def study_storage(config: Config, runs_dir: Path = RUNS_DIR) -> str:
    if config.tune.storage:
        return config.tune.storage
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(runs_dir).resolve() / (config.name + '-study.db')}"


def tune(config: Config, trials: int | None = None, runs_dir: Path = RUNS_DIR, **paths):
    """Run (or resume) the study for ``config``; returns the Optuna study."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    metric = get_metric(config.metric)
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            study_storage(config, runs_dir),
            heartbeat_interval=60,
            grace_period=120,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    if config.tune.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=config.name,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if metric.higher_is_better else "minimize",
        pruner=pruner,
    )
    # a resumed study must not replay the same random start-up trials: seed by progress
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))

    def objective(trial) -> float:
        trial_config = suggest_config(trial, config)
        trial_config = replace(trial_config, {"name": _trial_name(config, trial.params)})
        trial.set_user_attr("run_dir", str(Path(runs_dir) / trial_config.name))
        scores = []

        def report(fold: int, record) -> None:  # the running CV mean after each fold
            scores.append(record.fold_score(fold))
            trial.report(sum(scores) / len(scores), step=fold)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return run_cv(trial_config, after_fold=report, runs_dir=runs_dir, **paths)["mean"]

    done = sum(t.state.is_finished() for t in study.trials)
    remaining = max(0, (trials or config.tune.trials) - done)
    # a diverging recipe is a failed trial, not the end of the study
    study.optimize(
        objective, n_trials=remaining, timeout=config.tune.timeout_s, catch=(DivergenceError,)
    )
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if finished:
        best = suggest_config(optuna.trial.FixedTrial(study.best_params), config)
        path = Path(runs_dir) / f"{config.name}-best.yaml"
        write_text(path, dump_yaml(best.to_dict()))
    return study
