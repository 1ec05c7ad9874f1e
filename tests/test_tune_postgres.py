"""A real PostgreSQL 15 server: two worker processes on one study, every trial recorded once."""

import pytest

from tests.conftest import trashnet_config
from tests.postgres import postgres_bin, throwaway_postgres

pytestmark = pytest.mark.skipif(
    postgres_bin() is None,
    reason="no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql",
)


def test_two_workers_on_postgresql_keep_one_budget(kaggle_small, tmp_path, run_paths):
    import optuna

    from competition.tune import tune

    runs_dir = run_paths.pop("runs_dir")
    with throwaway_postgres() as url:
        config = trashnet_config(
            kaggle_small, tmp_path, "name=pg", "tune.params=[optim.lr, optim.weight_decay]",
            "tune.pruner=hyperband", "tune.folds=[0]", "tune.workers=2", "tune.trials=3",
            f"tune.storage={url}",
        )  # fmt: skip
        study = tune(config, runs_dir=runs_dir, **run_paths)
        trials = optuna.load_study(study_name="pg", storage=url).trials
        assert len(study.trials) == 3  # what tune returns, read back from the server
    assert [t.number for t in trials] == [0, 1, 2]  # exactly the budget, each trial once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3
    assert len({t.user_attrs["run_dir"] for t in trials}) == 3
