"""Experiment tracking on the event hooks: TensorBoard and MLflow, each off unless configured.

``tracking.tensorboard: true`` writes TensorBoard event files (``torch.utils.tensorboard``) under
``runs/<name>/tensorboard``; ``tracking.mlflow: {}`` (or ``{tracking_uri, experiment}``) logs one
MLflow run per run of the template, by default into a SQLite store beside the runs
(``runs/mlflow.db``, artifacts in ``runs/mlartifacts``). Both log the config (as MLflow params
and TensorBoard text), every epoch's ``log.csv`` row per fold, each fold's OOF score, the CV
scores and the report's files (``report.md`` and its figures; MLflow artifacts, TensorBoard
images). A configured tracker whose package is missing is an error naming the pip extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from competition import hookimpl
from competition.config import flat_keys
from competition.errors import PluginError

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: The files of a finished run sent to the trackers (besides the report's figures).
RUN_FILES = ("report.md", "cv.json", "config.yaml")


def _require(tracker: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PluginError(
            f"tracking.{tracker} is on but {exc.name} is not installed: "
            f"pip install 'competition-template[{EXTRAS[tracker]}]' (or set "
            f"tracking.{tracker} off)"
        ) from None


def _numbers(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (``epoch`` is the step, not a metric)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _cv_numbers(cv: dict) -> dict[str, float]:
    return {f"cv_{k}": float(cv[k]) for k in ("mean", "std", "oof", "lb") if cv.get(k) is not None}


class TensorBoardSession:
    """Event files under ``<run>/tensorboard``: ``fold_<k>/<metric>`` by epoch, ``cv/...``."""

    def __init__(self, run_dir: Path, config):
        module = _require("tensorboard", "torch.utils.tensorboard")
        _require("tensorboard", "tensorboard")
        self.writer = module.SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        params = json.dumps(flat_keys(config.to_dict()), indent=1, default=str)
        self.writer.add_text("config", f"```\n{params}\n```")

    def epoch(self, fold: int, step: int, metrics: dict) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(f"fold_{fold}/{key}", value, step)
        self.writer.flush()

    def fold(self, fold: int, score: float) -> None:
        self.writer.add_scalar("cv/fold_score", score, fold)
        self.writer.flush()

    def run(self, run_dir: Path, cv: dict) -> None:
        import numpy as np
        from PIL import Image

        for key, value in _cv_numbers(cv).items():
            self.writer.add_scalar(f"cv/{key.removeprefix('cv_')}", value, 0)
        report = run_dir / "report.md"
        if report.is_file():
            self.writer.add_text("report", report.read_text())
        for png in sorted(run_dir.glob("report_*.png")):
            with Image.open(png) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"report/{png.stem}", pixels, 0, dataformats="HWC")
        self.close()

    def close(self) -> None:
        self.writer.close()


class MlflowSession:
    """One MLflow run per run folder (reused when a killed run resumes): params, metrics, files."""

    def __init__(self, run_dir: Path, config):
        mlflow = _require("mlflow", "mlflow")
        settings = config.tracking.mlflow
        uri = settings.tracking_uri or f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = settings.experiment or config.competition.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = settings.artifact_location
            if location is None and settings.tracking_uri is None:
                location = (run_dir.parent / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        key = str(run_dir.resolve())
        previous = self.client.search_runs(
            [experiment_id], filter_string=f"tags.competition_run_dir = '{key}'", max_results=1
        )
        if previous:
            self.run_id = previous[0].info.run_id
            return
        run = self.client.create_run(
            experiment_id, run_name=config.name, tags={"competition_run_dir": key}
        )
        self.run_id = run.info.run_id
        params = [
            mlflow.entities.Param(k, json.dumps(v, default=str) if not isinstance(v, str) else v)
            for k, v in flat_keys(config.to_dict()).items()
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def epoch(self, fold: int, step: int, metrics: dict) -> None:
        for key, value in _numbers(metrics).items():
            self.client.log_metric(self.run_id, f"fold_{fold}/{key}", value, step=step)

    def fold(self, fold: int, score: float) -> None:
        self.client.log_metric(self.run_id, "fold_score", score, step=fold)

    def run(self, run_dir: Path, cv: dict) -> None:
        for key, value in _cv_numbers(cv).items():
            self.client.log_metric(self.run_id, key, value)
        for path in [run_dir / n for n in RUN_FILES] + sorted(run_dir.glob("report_*.png")):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)

    def close(self) -> None:
        pass


#: Open sessions by run folder (one process may run many runs: a tuning study).
_SESSIONS: dict[Path, list] = {}


def _sessions(run_dir: Path, config=None) -> list:
    run_dir = Path(run_dir)
    if run_dir not in _SESSIONS:
        if config is None:
            from competition.runs import RunRecord

            config = RunRecord.open(run_dir).config
        sessions = []
        if config.tracking.tensorboard:
            sessions.append(TensorBoardSession(run_dir, config))
        if config.tracking.mlflow is not None:
            sessions.append(MlflowSession(run_dir, config))
        _SESSIONS[run_dir] = sessions
    return _SESSIONS[run_dir]


@hookimpl
def competition_configure(config):
    """Fail before any work when a configured tracker's package is missing."""
    if config.tracking.tensorboard:
        _require("tensorboard", "tensorboard")
    if config.tracking.mlflow is not None:
        _require("mlflow", "mlflow")


@hookimpl
def competition_fold_start(fold, run_dir, config):
    _sessions(run_dir, config)


@hookimpl
def competition_epoch_end(fold, epoch, metrics, run_dir):
    for session in _SESSIONS.get(Path(run_dir), []):
        session.epoch(fold, epoch + 1, metrics)


@hookimpl
def competition_fold_end(fold, result, run_dir):
    sessions = _SESSIONS.get(Path(run_dir), [])
    if sessions:
        from competition.runs import RunRecord

        score = RunRecord.open(run_dir).fold_score(fold)  # the OOF score cv.json reports
        for session in sessions:
            session.fold(fold, score)


@hookimpl
def competition_run_end(run_dir, cv):
    for session in _sessions(run_dir):
        session.run(Path(run_dir), cv)
    _SESSIONS.pop(Path(run_dir), None)
