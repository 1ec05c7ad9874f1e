"""The run record: the one owner of ``runs/<name>/`` and the one fold loop every verb goes through.

A *producer* makes one fold's predictions: training (``train``, a ``tune`` trial), a frozen-feature
classifier (``baseline``), fold weights of another run with other settings (``predict``) or a blend
of runs (``ensemble``). :func:`produce_run` opens the run (locked), hands each unfinished fold to
the producer, records what it returns, fires the event hooks and finishes the run once. Consumers
(``ensemble``, ``predict``) read finished runs through :meth:`RunRecord.open`.

On disk, every file written atomically::

    config.yaml        the resolved config, and ``produced_by``: how the predictions were made
                       (verb; the run holding the fold weights; baseline options; blend members)
    environment.json   package versions, git commit, torch threads, as the run started
    folds.csv          the fold of every train id, as the run started
    fold_<k>/          oof.csv, test_probs.npy, holdout_probs.npy, then result.json (fold done);
                       training adds last.pt (resume), best.pt, log.csv
    oof.csv            id, fold, target (class name), target_index, one probability per class
    cv.json            metric, per-fold scores, mean, std, pooled OOF, folds done of k, LB
    report.md          scores, curves, recall by frequency, confusions, calibration: figures in
                       report_*.png (competition.report builds them, write_report writes them)
    .lock, .lock.json  the run's lock (an OS lock: a crash releases it), held while a process
                       writes the run's own files; fold_<k>/.lock while a process makes fold k

Several processes may share one run (``--folds 0,1`` on one GPU, ``--folds 2,3`` on another, or
the same command twice): each fold is made by the process that claims it, a fold another
process holds is skipped, and whichever process finishes the last fold writes the complete run.

and ``submissions/<name>.csv`` (``<name>.partial.csv`` while folds are missing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from competition import distributed
from competition.config import (
    REPO_ROOT,
    Config,
    build,
    check_ranges,
    dump_yaml,
    flat_keys,
    load_yaml,
    plain_name,
)
from competition.errors import CompetitionError, ConfigError, DataError, DivergenceError
from competition.folds import FOLDS_DIR
from competition.io import (
    atomic_path,
    remove_orphan_temporaries,
    save_numpy,
    write_csv,
    write_json,
    write_text,
)
from competition.manager import get_plugin_manager
from competition.metrics import cv_scores, get_metric
from competition.submission import write_submission

#: Seconds a process waits for another one to finish writing a run's files before giving up.
LOCK_WAIT_S = 60.0
RUNS_DIR = REPO_ROOT / "runs"
SUBMISSIONS_DIR = REPO_ROOT / "submissions"
PACKAGES = ("torch", "torchvision", "timm", "albumentations", "kornia", "optuna", "pluggy", "numpy")
SPLITS = ("test", "holdout")


class RunLockedError(CompetitionError):
    """Another process is writing this run."""


@dataclass(frozen=True)
class OutputDirs:
    """Where runs, fold files and submissions go (the repo's folders unless a test says so)."""

    runs_dir: Path = RUNS_DIR
    folds_dir: Path = FOLDS_DIR
    submissions_dir: Path = SUBMISSIONS_DIR


@dataclass
class FoldResult:
    """What producing one fold took: the best epoch and score of training, timing, details."""

    fold: int
    best_epoch: int = 0
    best_score: float | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # producer details: baseline method, source run


@dataclass(frozen=True)
class FoldTask:
    """What a producer is asked for: one fold's rows, and a folder for its own files."""

    fold: int
    train_index: np.ndarray  # train rows of the fold (positions in the train table)
    valid_index: np.ndarray  # its validation rows: the OOF rows it predicts, in this order
    directory: Path  # fold_<k>/: checkpoints and logs of a training producer
    run_dir: Path


@dataclass
class FoldPredictions:
    """A producer's answer for one fold."""

    oof: np.ndarray  # (validation rows, K) probabilities, in the order of the fold's rows
    splits: dict[str, np.ndarray]  # "test" / "holdout" -> (N, K)
    result: FoldResult


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (``None`` where missing)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    """Package versions, git commit and CPU threads, saved beside each run's config."""
    versions = package_versions()
    try:
        git = {"cwd": REPO_ROOT, "capture_output": True, "text": True, "timeout": 10}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], **git).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit or None,
        "git_dirty": bool(dirty),
        # bit-identical resume holds at the same thread count (CPU kernels split work by threads)
        "torch_threads": torch.get_num_threads(),
    }


def run_reference(path: Path) -> str:
    """How ``config.yaml`` names another run: relative to the repo when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def resolve_reference(reference: str) -> Path:
    return (REPO_ROOT / reference).resolve()


def config_difference(old: dict, new: dict, limit: int = 6) -> str:
    """``optim.lr: 0.001 -> 0.1, ...``: the keys two configs disagree on."""
    a, b = flat_keys(old), flat_keys(new)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    shown = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def read_oof(path: Path) -> pd.DataFrame:
    """An ``oof.csv`` with ``target_index`` (runs written before it existed had only ``target``)."""
    try:
        oof = pd.read_csv(path, dtype={"id": str, "target": str}, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc}). Delete it to redo this fold.") from exc
    if "target_index" not in oof:
        oof["target_index"] = oof["target"].astype(int)
    return oof


def _check_writable(directory: Path, what: str) -> None:
    """Fail before any work if ``directory`` can't take new files (read-only, or a file)."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: {what} must be a folder, but a file is there. Move it.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{directory}: cannot write {what} here ({exc.strerror}). Make it writable, or run "
            "from a copy of the repository you can write to."
        ) from exc


class RunRecord:
    """One run folder. :meth:`create` opens it for writing (locked); :meth:`open` reads it."""

    def __init__(self, path: Path, config: Config, produced_by: dict, dirs: OutputDirs):
        self.path = Path(path)
        self.name = self.path.name
        self.config = config
        self.produced_by = produced_by
        self.dirs = dirs
        self.metric = get_metric(config.metric)
        self._lock = None
        self._fold_locks: dict[int, object] = {}

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, dirs: OutputDirs | None = None) -> RunRecord:
        """A run folder to read (a finished run, or one with some folds done)."""
        path = Path(path)
        config_path = path / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"{path}: not a run folder (no config.yaml). Pass runs/<name>.")
        data = _read_yaml(config_path)
        produced_by = data.pop("produced_by", None) or {"verb": "train"}
        try:
            config = check_ranges(build(Config, data))
        except ConfigError as exc:
            raise ConfigError(
                f"{config_path}: {exc}. It was written by another version of the template, "
                "or edited by hand: restore it, or delete the run."
            ) from None
        return cls(path, config, produced_by, dirs or OutputDirs(runs_dir=path.parent))

    @classmethod
    def create(cls, workspace, produced_by: dict, dirs: OutputDirs = OutputDirs()) -> RunRecord:
        """Start or resume ``runs/<config.name>`` for ``workspace``'s config; holds its lock.

        Use as a context manager (``with RunRecord.create(...) as record:``) so the lock is
        released when the work ends; a crash releases it too (it is an OS lock).
        """
        config = workspace.config
        name = plain_name(config.name, "name")
        runs_dir = Path(dirs.runs_dir)
        path = runs_dir / name
        if path.resolve().parent != runs_dir.resolve():
            raise ConfigError(f"name={name!r}: resolves outside {runs_dir}; choose a plain name")
        _check_writable(runs_dir, "runs")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: a file is where this run's folder goes. Move it or rename.")
        if workspace.competition.test is not None:
            _check_writable(Path(dirs.submissions_dir), "submissions")
        path.mkdir(exist_ok=True)
        record = cls(path, config, produced_by, dirs)
        record._acquire_lock(wait=LOCK_WAIT_S)
        try:
            removed = remove_orphan_temporaries(path, recursive=True)
            removed += remove_orphan_temporaries(dirs.submissions_dir)
            if removed:
                workspace.log(f"removed {len(removed)} temporary file(s) left by a killed process")
            record._write_config(workspace.log)
            record._check_folds(workspace)
        except BaseException:
            record.release()
            raise
        return record

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        for fold in list(self._fold_locks):
            self._release_fold(fold)

    def _acquire_lock(self, wait: float = 0.0) -> None:
        """Hold the run's lock, waiting up to ``wait`` seconds (``None``: as long as it takes)."""
        lock = _hold(self.path, wait)
        if lock is None:
            holder = _holder(self.path)
            waited = f" (waited {wait:g} s)" if wait else ""
            raise RunLockedError(
                f"{self.path} is in use by process {holder}{waited}. Two processes never write "
                "one run's files at once: wait for it to finish (or stop it), or choose another "
                "name (name=...)."
            ) from None
        self._lock = lock

    def release(self) -> None:
        """Release the run's lock (idempotent)."""
        if self._lock is not None:
            _unhold(self.path, self._lock)
            self._lock = None

    def claim_fold(self, fold: int) -> str:
        """``done``, ``claimed`` (this process makes the fold and holds ``fold_<k>/.lock``) or
        the description of the process that holds it."""
        if self.fold_done(fold):
            return "done"
        lock = _hold(self.fold_dir(fold), 0.0)
        if lock is None:
            return _holder(self.fold_dir(fold))
        if self.fold_done(fold):  # finished by another process while we looked
            _unhold(self.fold_dir(fold), lock)
            return "done"
        self._fold_locks[fold] = lock
        return "claimed"

    def _release_fold(self, fold: int) -> None:
        lock = self._fold_locks.pop(fold, None)
        if lock is not None:
            _unhold(self.fold_dir(fold), lock)

    def _write_config(self, log) -> None:
        path = self.path / "config.yaml"
        wanted = {**self.config.to_dict(), "produced_by": self.produced_by}
        if path.is_file():
            saved = _read_yaml(path)
            if saved != wanted:
                raise ConfigError(
                    f"{self.path} holds a run with another config "
                    f"({config_difference(saved, wanted)}). Choose a new run name (name=...) or "
                    f"delete {self.path} to start over."
                )
            previous = self.path / "environment.json"
            if previous.is_file():
                threads = json.loads(previous.read_text()).get("torch_threads")
                if threads not in (None, torch.get_num_threads()):
                    log(
                        f"note: this run started with {threads} torch threads, now "
                        f"{torch.get_num_threads()}: a resumed fold is then close to, not "
                        "bit-identical with, an uninterrupted one (set OMP_NUM_THREADS)"
                    )
            return
        write_text(path, dump_yaml(wanted))
        write_json(self.path / "environment.json", environment())

    def _check_folds(self, workspace) -> None:
        """A run keeps the split it started with; one with no finished fold may start over."""
        current = pd.DataFrame(
            {"id": workspace.competition.train["id"].astype(str), "fold": workspace.fold_of}
        )
        path = self.path / "folds.csv"
        if path.is_file():
            saved = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
            if saved.reset_index(drop=True).equals(current.reset_index(drop=True)):
                return
            if self.done_folds():
                raise ConfigError(
                    f"{self.path}: the train table or its folds changed since this run started "
                    f"(see {path}). Choose a new run name (name=...) or delete {self.path}."
                )
            workspace.log(f"{path}: no fold finished yet; the run starts over on the new table")
        write_csv(path, current)

    # -- folds ------------------------------------------------------------------------------------

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{fold}"

    def fold_result(self, fold: int) -> dict | None:
        """The fold's ``result.json`` (``None`` while the fold is unfinished)."""
        path = self.fold_dir(fold) / "result.json"
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{path} is damaged ({exc}). Delete it: fold {fold} is then predicted again "
                "from its checkpoints (rm " + str(path) + ")."
            ) from None
        if not (self.fold_dir(fold) / "oof.csv").is_file():
            raise DataError(
                f"{path} says fold {fold} is done but its oof.csv is missing. Delete "
                f"{path} to predict the fold again."
            )
        return result

    def fold_done(self, fold: int) -> bool:
        return self.fold_result(fold) is not None

    def done_folds(self) -> list[int]:
        return [k for k in range(self.config.folds.k) if self.fold_done(k)]

    def fold_oof(self, fold: int) -> pd.DataFrame:
        return read_oof(self.fold_dir(fold) / "oof.csv")

    def fold_score(self, fold: int) -> float:
        """The metric on one finished fold's OOF rows, as ``cv.json`` reports it."""
        oof = self.fold_oof(fold)
        return self.metric(oof["target_index"].to_numpy(), oof[self.classes()].to_numpy())

    def fold_probs(self, fold: int, split: str) -> np.ndarray | None:
        path = self.fold_dir(fold) / f"{split}_probs.npy"
        return np.load(path) if path.is_file() else None

    def record_fold(self, fold: int, predictions: FoldPredictions, workspace) -> None:
        """Write one fold's OOF rows and split probabilities; ``result.json`` last (fold done)."""
        valid_index = np.flatnonzero(workspace.fold_of == fold)
        classes = workspace.classes
        shape = (len(valid_index), len(classes))
        if predictions.oof.shape != shape:
            raise CompetitionError(
                f"fold {fold}: the producer returned OOF probabilities of shape "
                f"{predictions.oof.shape}, expected {shape}"
            )
        for what, probs in [("OOF", predictions.oof), *predictions.splits.items()]:
            if not np.isfinite(probs).all():
                raise DivergenceError(
                    f"fold {fold}: {what} probabilities are not finite (NaN or inf): the model "
                    f"diverged. Nothing was recorded for this fold; lower optim.lr or set "
                    f"optim.grad_clip, then run again."
                )
        # float64 rows summing to one to the last bit (float32 softmax is off by ~1e-7)
        predictions.oof = _normalised(predictions.oof)
        predictions.splits = {s: _normalised(p) for s, p in predictions.splits.items()}
        table = workspace.competition.train.iloc[valid_index]
        target_index = table["target"].to_numpy()
        oof = pd.DataFrame(
            {
                "id": table["id"].to_numpy(),
                "fold": fold,
                "target": np.asarray(classes, dtype=object)[target_index],
                "target_index": target_index,
            }
        )
        oof[classes] = predictions.oof
        fold_dir = self.fold_dir(fold)
        write_csv(fold_dir / "oof.csv", oof)
        for split, probs in predictions.splits.items():
            save_numpy(fold_dir / f"{split}_probs.npy", probs)
        write_json(fold_dir / "result.json", dataclasses.asdict(predictions.result))

    # -- the whole run ----------------------------------------------------------------------------

    def classes(self) -> list[str]:
        """The class columns of the OOF rows (the run's class list)."""
        done = self.done_folds()
        if not done:
            raise ConfigError(f"{self.path}: no finished fold yet; run its verb again")
        oof = read_oof(self.fold_dir(done[0]) / "oof.csv")
        return [c for c in oof.columns if c not in ("id", "fold", "target", "target_index")]

    def oof(self) -> pd.DataFrame:
        """The OOF rows of every finished fold, sorted by id."""
        done = self.done_folds()
        if not done:
            raise ConfigError(f"{self.path}: no finished fold yet; train it first")
        frames = [self.fold_oof(k) for k in done]
        return pd.concat(frames).sort_values("id").reset_index(drop=True)

    def cv(self) -> dict:
        """The finished run's ``cv.json``."""
        path = self.path / "cv.json"
        if not path.is_file():
            raise ConfigError(f"{self.path}: not finished (no cv.json); run its verb again")
        return json.loads(path.read_text())

    def weights_run(self) -> RunRecord:
        """The run whose ``fold_<k>/best.pt`` made these predictions (itself, for training)."""
        source = self.produced_by.get("weights")
        return RunRecord.open(resolve_reference(source)) if source else self

    def write_report(self, competition, cv=None, oof=None, explain=None) -> Path:
        """``report.md`` and its figures ``report_*.png``, built by
        :func:`competition.report.build_report`; figures of an older report are removed.

        ``competition`` gives training frequencies, thumbnails and holdout labels (``None``: the
        report does without); ``explain`` adds Grad-CAM. Holds the run's lock while it works
        (taken here when the caller does not hold it). Returns the path of ``report.md``.
        """
        from competition.report import build_report  # matplotlib loads only when reporting

        owned = self._lock is None
        if owned:
            self._acquire_lock()
        try:
            cv = self.cv() if cv is None else cv
            oof = self.oof() if oof is None else oof
            report = build_report(self, competition, cv, oof, explain)
            for name, png in report.figures.items():
                with atomic_path(self.path / name) as tmp:
                    tmp.write_bytes(png)
            for old in self.path.glob("report_*.png"):
                if old.name not in report.figures:
                    old.unlink()
            write_text(self.path / "report.md", report.text)
        finally:
            if owned:
                self.release()
        return self.path / "report.md"

    def finish(self, workspace) -> dict:
        """OOF table, ``cv.json``, report, submission and ``competition_run_end``, once."""
        done = self.done_folds()
        if not done:
            raise ConfigError(f"{self.path}: no finished fold to summarise")
        k = self.config.folds.k
        cv_path = self.path / "cv.json"
        if cv_path.is_file():
            saved = json.loads(cv_path.read_text())
            if saved.get("folds_done") == done:
                return saved  # finished already: a run never changes once finished
        oof = pd.concat([self.fold_oof(f) for f in done]).reset_index(drop=True)
        classes = workspace.classes
        write_csv(self.path / "oof.csv", oof)
        targets = oof["target_index"].to_numpy()
        cv = cv_scores(self.metric, targets, oof[classes].to_numpy(), oof["fold"].to_numpy())
        cv.update(
            run=str(self.path),
            k=k,
            complete=len(done) == k,
            produced_by=self.produced_by.get("verb", "train"),
            seconds=round(sum(self.fold_result(f).get("seconds", 0.0) for f in done), 1),
        )
        competition = workspace.competition
        if competition.holdout is not None:
            holdout = np.mean([self.fold_probs(f, "holdout") for f in done], axis=0)
            cv["lb"] = self.metric(competition.holdout["target"].to_numpy(), holdout)
        if competition.test is not None:
            test = np.mean([self.fold_probs(f, "test") for f in done], axis=0)
            submissions = Path(self.dirs.submissions_dir)
            path = submissions / f"{self.name}{'' if cv['complete'] else '.partial'}.csv"
            write_submission(path, competition, self.config, test)
            if cv["complete"]:
                (submissions / f"{self.name}.partial.csv").unlink(missing_ok=True)
            cv["submission"] = str(path)
        self.write_report(competition, cv, oof)
        write_json(cv_path, cv)
        get_plugin_manager().hook.competition_run_end(run_dir=self.path, cv=cv)
        return cv


def _hold(folder: Path, wait: float | None):
    """The OS lock ``folder/.lock`` (its holder written to ``.lock.json``), or ``None`` if another
    process still holds it after ``wait`` seconds (``None``: wait as long as it takes)."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock", timeout=-1 if wait is None else wait)
    try:
        lock.acquire()
    except Timeout:
        return None
    write_json(
        folder / ".lock.json",
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv[:1] + sys.argv[1:])[-300:],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    return lock


def _unhold(folder: Path, lock) -> None:
    (folder / ".lock.json").unlink(missing_ok=True)
    lock.release()


def _holder(folder: Path) -> str:
    """Who holds ``folder/.lock``: ``<pid> on <host> (<command>, since <time>)``."""
    try:
        holder = json.loads((folder / ".lock.json").read_text())
    except (OSError, ValueError):
        holder = {}
    return (
        f"{holder.get('pid', '?')} on {holder.get('host', '?')} "
        f"({holder.get('command', '?')}, since {holder.get('since', '?')})"
    )


def _normalised(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def _read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML ({exc}). Restore it, or delete {path.parent} to start over."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping; restore it or delete {path.parent}")
    return data


def run_folds(record: RunRecord, workspace, produce, folds=None, after_fold=None) -> dict:
    """The one fold loop: produce each unfinished fold, record it, fire events, finish once.

    ``produce(FoldTask) -> FoldPredictions``; ``after_fold(fold, record)``
    runs after each requested fold, done now or before (a tuning trial reports and prunes there).
    """
    config, pm, log = workspace.config, workspace.pm, workspace.log
    k = config.folds.k
    folds = list(range(k)) if folds is None else list(folds)
    bad = [f for f in folds if not 0 <= f < k]
    if bad:
        raise ConfigError(f"--folds: fold(s) {bad} out of range 0..{k - 1}")
    pm.hook.competition_configure(config=config)
    main = distributed.is_main()  # under torchrun every process produces; rank 0 records
    for fold in folds:
        state = distributed.from_main(lambda f=fold: record.claim_fold(f))
        if state == "done":
            log(f"fold {fold}: already done, skipped ({record.fold_dir(fold)})")
        elif state != "claimed":
            log(
                f"fold {fold}: process {state} is making it; skipped here. The process that "
                "finishes the last fold writes the complete run."
            )
        else:
            task = FoldTask(
                fold,
                np.flatnonzero(workspace.fold_of != fold),
                np.flatnonzero(workspace.fold_of == fold),
                record.fold_dir(fold),
                record.path,
            )
            if main:
                pm.hook.competition_fold_start(fold=fold, run_dir=record.path, config=config)
                record.release()  # other processes may claim and record other folds meanwhile
            predictions = produce(task)
            if main:
                record._acquire_lock(wait=None)
                record.record_fold(fold, predictions, workspace)
                record._release_fold(fold)
                pm.hook.competition_fold_end(
                    fold=fold, result=predictions.result, run_dir=record.path
                )
                score = record.fold_score(fold)
                log(f"fold {fold}: {record.metric.name} {score:.4f} {_how(config)}")
            distributed.barrier()
        if after_fold is not None:
            after_fold(fold, record)
    if not record.done_folds():
        raise RunLockedError(
            f"{record.path}: every fold asked for is being made by another process and none is "
            "finished yet; run this command again when they are done"
        )
    return distributed.from_main(lambda: record.finish(workspace))


def _how(config: Config) -> str:
    views = ", ".join(spec.name for spec in config.tta)
    return f"(the fold's OOF score, TTA: {views})"


def produce_run(
    workspace, produced_by: dict, produce, folds=None, dirs=OutputDirs(), after_fold=None
) -> dict:
    """Open ``runs/<name>`` (locked), run :func:`run_folds`, release the lock; the ``cv`` dict.

    Under torchrun rank 0 opens the run for writing; the other processes read it.
    """
    if not distributed.is_main():
        distributed.barrier()  # rank 0 has created (or resumed) the run
        record = RunRecord.open(Path(dirs.runs_dir) / workspace.config.name, dirs)
        return run_folds(record, workspace, produce, folds, after_fold)
    with RunRecord.create(workspace, produced_by, dirs) as record:
        distributed.barrier()
        return run_folds(record, workspace, produce, folds, after_fold)


def write_audit(audit, competition_name: str, dirs: OutputDirs = OutputDirs()) -> Path:
    """``runs/check-<competition>/``: the data audit's findings.csv, summary.json and report.md."""
    name = "check-" + plain_name(competition_name, "competition.name")
    path = Path(dirs.runs_dir) / name
    _check_writable(Path(dirs.runs_dir), "runs")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: a file is where the audit's folder goes. Move it.")
    write_csv(path / "findings.csv", audit.findings)
    write_json(path / "summary.json", audit.summary)
    write_text(path / "report.md", audit.to_markdown())
    return path


def cv_gain(before: dict, after: dict) -> dict:
    """``after``'s CV minus ``before``'s (two ``cv.json`` dicts), on the folds both finished."""
    first = dict(zip(before["folds_done"], before["folds"], strict=True))
    second = dict(zip(after["folds_done"], after["folds"], strict=True))
    common = sorted(first.keys() & second.keys())
    if not common:
        return {"folds": [], "before": None, "after": None, "gain": None}
    a = float(np.mean([first[k] for k in common]))
    b = float(np.mean([second[k] for k in common]))
    return {"folds": common, "before": a, "after": b, "gain": b - a}


def summary_table(cv: dict) -> str:
    """A short text table of a run's scores; says so when folds are missing."""
    lines = [f"{'fold':>6}  {cv['metric']:>10}"]
    for fold, score in zip(cv["folds_done"], cv["folds"], strict=True):
        lines.append(f"{fold:>6}  {score:>10.4f}")
    done, k = len(cv["folds_done"]), cv.get("k", len(cv["folds_done"]))
    if done == 1:
        lines.append(f"{'CV':>6}  {cv['mean']:>10.4f}  over 1 of {k} folds (no spread yet)")
    else:
        over = "" if done == k else f"  over {done} of {k} folds"
        lines.append(f"{'CV':>6}  {cv['mean']:>10.4f} ± {cv['std']:.4f}{over}")
    lines.append(f"{'OOF':>6}  {cv['oof']:>10.4f}")
    if "lb" in cv:
        lines.append(f"{'LB':>6}  {cv['lb']:>10.4f}")
    if "submission" in cv:
        partial = "" if cv.get("complete", True) else f"  (partial: {done} of {k} folds)"
        lines.append(f"submission: {cv['submission']}{partial}")
    return "\n".join(lines)


__all__ = [
    "RUNS_DIR",
    "SUBMISSIONS_DIR",
    "FoldPredictions",
    "FoldResult",
    "FoldTask",
    "OutputDirs",
    "RunLockedError",
    "RunRecord",
    "cv_gain",
    "environment",
    "produce_run",
    "read_oof",
    "run_folds",
    "summary_table",
    "write_audit",
]
