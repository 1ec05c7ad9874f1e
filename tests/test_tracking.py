"""TensorBoard and MLflow trackers (plugins/tracking.py), read back with each library's reader."""

from __future__ import annotations

import sys

import pytest

from competition.config import Config, load_config
from competition.cv import run_cv
from competition.errors import PluginError
from competition.runs import RunRecord
from plugins import tracking
from tests.conftest import trashnet_config

pytest.importorskip("tensorboard", reason="tensorboard not installed: pip install -e '.[dev]'")
pytest.importorskip("mlflow", reason="mlflow not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def tracked(kaggle_small, tmp_path_factory):
    """A 2-fold, 2-epoch run with both trackers on (MLflow in its default store)."""
    tmp = tmp_path_factory.mktemp("tracking")
    paths = {"runs_dir": tmp / "runs", "folds_dir": tmp / "folds", "submissions_dir": tmp / "sub"}
    config = trashnet_config(
        kaggle_small,
        tmp,
        "optim.epochs=2",
        "tracking.tensorboard=true",
        "tracking.mlflow={experiment: digits}",
    )
    cv = run_cv(config, log=lambda *_: None, **paths)
    return paths["runs_dir"] / "t", cv


def test_tensorboard_event_files_hold_epochs_folds_cv_and_report(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, cv = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for fold in (0, 1):
        losses = events.Scalars(f"fold_{fold}/train_loss")
        assert [e.step for e in losses] == [1, 2]
        log = RunRecord.open(run_dir).fold_dir(fold) / "log.csv"
        first = float(log.read_text().splitlines()[1].split(",")[2])  # epoch,lr,train_loss
        assert losses[0].value == pytest.approx(first, rel=1e-5)
    folds = events.Scalars("cv/fold_score")
    assert [e.value for e in folds] == pytest.approx(cv["folds"])
    assert events.Scalars("cv/mean")[0].value == pytest.approx(cv["mean"])
    assert "config/text_summary" in tags["tensors"] and "report/text_summary" in tags["tensors"]
    assert "report/report_confusion" in tags["images"]


def test_mlflow_run_holds_params_metrics_and_report_files(tracked):
    from mlflow import MlflowClient

    run_dir, cv = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "t" and run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "2"
    assert run.data.params["model.backbone"] == "resnet10t"
    assert run.data.metrics["cv_mean"] == pytest.approx(cv["mean"])
    history = client.get_metric_history(run.info.run_id, "fold_1/val_loss")
    assert [m.step for m in history] == [1, 2]
    scores = client.get_metric_history(run.info.run_id, "fold_score")
    assert sorted(m.step for m in scores) == cv["folds_done"]
    assert [m.value for m in sorted(scores, key=lambda m: m.step)] == pytest.approx(cv["folds"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "cv.json", "config.yaml", "report_confusion.png"} <= files
    assert (run_dir.parent / "mlartifacts").is_dir()  # beside the runs, not in the cwd


def test_trackers_are_off_unless_configured(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    tracking.competition_fold_start(fold=0, run_dir=run_dir, config=Config())
    assert tracking._SESSIONS.pop(run_dir) == []
    assert list(tmp_path.rglob("*")) == [run_dir.parent, run_dir]


@pytest.mark.parametrize("tracker, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_package_names_the_pip_extra(monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    setting = "tracking.tensorboard=true" if tracker == "tensorboard" else "tracking.mlflow={}"
    config = load_config(None, [setting])
    with pytest.raises(PluginError, match=rf"pip install 'competition-template\[{tracker}\]'"):
        tracking.competition_configure(config=config)
