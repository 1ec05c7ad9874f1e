"""Optuna studies over the whole recipe, scored by the CV mean: many workers, one trial budget.

A trial is a run: its config is the base config with the suggestions of every
``competition_search_space`` plugin and of the YAML space (``tune.space``, :mod:`competition.space`)
applied, and it is produced by the one fold loop (:func:`competition.cv.run_cv`). Its run folder is
named by a hash of that config (``tune.*`` left at the defaults), so it depends on the parameters
and the base config only: a retried or repeated trial resumes or reuses it.

Workers (``tune.workers`` processes here, or ``competition tune`` on other machines) share a study
in its storage: a journal file (one machine; the default), SQLite (one process) or an RDB URL such
as PostgreSQL (many machines). Under a study lock (a file lock; a PostgreSQL advisory lock) a worker
counts the trials spent, asks for a trial, draws its parameters with a sampler seeded by the trial's
number and checks them against the trials already running or done, so the budget (``tune.trials``)
is global and no two workers train the same parameters. A killed trial (its worker's process is
gone, or its heartbeat is stale) is retried from its last epoch when a worker next looks, whatever
the budget says now.

Pruners (Optuna's median rule; successive halving, Jamieson & Talwalkar 2016; Hyperband, Li et al.
2018) see one step per epoch; a step is the number of epochs the trial has trained, counted across
its folds (the resource successive halving and Hyperband allot). Its value is the running CV mean
with the current fold at its current epoch; at a fold's last epoch, that fold's recorded OOF score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from competition import hookimpl
from competition.config import Config, TuneConfig, dump_yaml, plain_name, replace
from competition.cv import run_cv
from competition.errors import CompetitionError, ConfigError, DivergenceError
from competition.io import atomic_path, write_csv, write_text
from competition.manager import get_plugin_manager
from competition.metrics import get_metric
from competition.runs import RUNS_DIR
from competition.space import apply_space, check_space, parse_space

HEARTBEAT_S = (
    20  # RDB storages: a trial's heartbeat; stale after GRACE_S (a worker on another host)
)
GRACE_S = 60
MAX_RETRY = 3  # a killed trial is retried this many times
LOCK_TIMEOUT_S = 600


# -- suggestions ----------------------------------------------------------------------------------


def suggest_config(trial, config: Config, pm=None) -> Config:
    """The config for one Optuna ``trial``: ``config`` with every plugin's suggestions applied,
    then the YAML space (``tune.space``)."""
    pm = pm or get_plugin_manager()
    overrides: dict = {}
    for suggestions in reversed(pm.hook.competition_search_space(trial=trial, config=config)):
        overrides.update(suggestions or {})
    try:
        suggested = replace(config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"a search space suggested a bad value: {exc}") from exc
    return apply_space(trial, suggested, parse_space(config.tune.space))


def trial_config(trial, config: Config, pm=None) -> Config:
    """The run a trial produces: suggestions applied, ``tune.*`` at the defaults, and named
    ``<name>-<hash of the config>`` so the folder depends on the recipe only."""
    suggested = replace(suggest_config(trial, config, pm), {"tune": _default_tune()})
    recipe = {k: v for k, v in suggested.to_dict().items() if k != "name"}
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    return replace(suggested, {"name": f"{config.name}-{digest[:10]}"})


def _default_tune() -> dict:
    return dataclasses.asdict(TuneConfig())


# -- where the study lives ------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPlace:
    """A study's storage: ``kind`` journal, sqlite or rdb; ``target`` a file path or a URL."""

    kind: str
    target: str
    name: str

    def __str__(self) -> str:
        return self.target


STORAGE_FORMS = (
    "a journal file (runs/x.journal: several workers on one machine), a SQLite file (x.db or "
    "sqlite:///x.db: one process) or an RDB URL (postgresql+psycopg://user@host/db: many machines)"
)


def study_place(config: Config, runs_dir: Path = RUNS_DIR) -> StudyPlace:
    """Where ``config``'s study lives (``tune.storage``; default ``runs/<study>-study.journal``)."""
    name = plain_name(config.tune.study or config.name, "tune.study")
    storage = config.tune.storage
    if not storage:
        legacy = Path(runs_dir) / f"{name}-study.db"  # studies started before journal storage
        if legacy.is_file() and config.tune.workers == 1:
            return StudyPlace("sqlite", f"sqlite:///{legacy.resolve()}", name)
        return StudyPlace(
            "journal", str((Path(runs_dir) / f"{name}-study.journal").resolve()), name
        )
    if "://" not in storage:
        path = Path(storage).expanduser()
        if path.suffix == ".journal":
            return StudyPlace("journal", str(path.resolve()), name)
        if path.suffix in (".db", ".sqlite", ".sqlite3"):
            return StudyPlace("sqlite", f"sqlite:///{path.resolve()}", name)
        raise ConfigError(f"tune.storage={storage!r}: not a storage. Give {STORAGE_FORMS}.")
    scheme = storage.split("://", 1)[0].lower()
    if scheme == "sqlite":
        return StudyPlace("sqlite", storage, name)
    if scheme.startswith("postgresql"):
        return StudyPlace("rdb", _postgres_url(storage), name)
    if scheme.startswith(("mysql", "mariadb", "oracle", "mssql")):
        return StudyPlace("rdb", storage, name)
    raise ConfigError(f"tune.storage={storage!r}: unknown scheme '{scheme}'. Give {STORAGE_FORMS}.")


def _postgres_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed (psycopg 3 from the extra, psycopg2)."""
    import importlib.util

    scheme, rest = url.split("://", 1)
    driver = scheme.partition("+")[2] or None
    has = {d: importlib.util.find_spec(d) is not None for d in ("psycopg", "psycopg2")}
    if driver is None and not has["psycopg2"] and has["psycopg"]:
        return f"postgresql+psycopg://{rest}"
    if not has.get(driver or "psycopg2", True):
        raise ConfigError(
            f"tune.storage={scheme}://...: PostgreSQL needs a driver: "
            "pip install -e '.[postgres]' (psycopg 3; then postgresql+psycopg://user@host/db)"
        )
    return url


def open_storage(place: StudyPlace):
    """The Optuna storage object for ``place`` (heartbeats and retries on RDB storages)."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if place.kind == "journal":
        Path(place.target).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(place.target))
    kwargs = {}
    if place.kind == "sqlite":
        Path(place.target.split("sqlite:///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            place.target,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=_retry_callback(),
            **kwargs,
        )


def _retry_callback():
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_RETRY, inherit_intermediate_values=True
        )


def _transient_errors() -> tuple:
    import optuna
    import sqlalchemy.exc

    return (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)


def _retrying(what: str, place: StudyPlace, action, attempts: int = 10):
    """``action()``, retried with jitter while concurrent workers race to create the schema."""
    errors = _transient_errors()
    for attempt in range(attempts):
        try:
            return action()
        except errors as exc:
            if attempt == attempts - 1:
                raise CompetitionError(
                    f"{what} {place}: {str(exc).splitlines()[0][:300]}. Check the server and "
                    "its URL, then run again: the study resumes."
                ) from exc
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


def pruner_for(config: Config, steps: int):
    """The pruner ``tune.pruner`` names, for trials of ``steps`` steps (epochs x folds)."""
    import optuna

    name = config.tune.pruner
    if name == "median":  # prune against the median of earlier trials at the same step
        return optuna.pruners.MedianPruner(n_startup_trials=3)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=steps, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def open_study(config: Config, place: StudyPlace, storage=None, create: bool = True):
    """Create the study once (safe when many workers start together) or load it."""
    import optuna

    folds = _trial_folds(config)
    direction = "maximize" if get_metric(config.metric).higher_is_better else "minimize"
    pruner = pruner_for(config, len(folds) * config.optim.epochs)

    def attempt():
        store = storage if storage is not None else open_storage(place)
        if not create:
            return optuna.load_study(study_name=place.name, storage=store, pruner=pruner)
        return optuna.create_study(
            study_name=place.name,
            storage=store,
            load_if_exists=True,
            direction=direction,
            pruner=pruner,
        )

    try:
        return _retrying("cannot open the study in", place, attempt)
    except KeyError:
        raise ConfigError(
            f"no study '{place.name}' in {place}: run `competition tune` first, or name the "
            "study with --study"
        ) from None


# -- the study lock -------------------------------------------------------------------------------


@contextmanager
def study_lock(place: StudyPlace, storage):
    """Held while a worker counts the budget and starts a trial: a file lock beside a journal or
    SQLite file, a PostgreSQL advisory lock (released by the server if the worker dies)."""
    if place.kind in ("journal", "sqlite"):
        from filelock import FileLock, Timeout

        path = place.target.split("sqlite:///", 1)[-1] + ".tune.lock"
        lock = FileLock(path, timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise CompetitionError(
                f"{path}: held by another worker for {LOCK_TIMEOUT_S} s; is one stuck? Stop it "
                "and run again."
            ) from None
        try:
            yield lock.release
        finally:
            lock.release()
        return
    engine = storage.engine if hasattr(storage, "engine") else None
    if engine is None or engine.dialect.name != "postgresql":
        warnings.warn(
            f"{place}: no study lock for this database; with several workers the trial budget "
            "may be overrun by a few trials (use PostgreSQL or a journal file)",
            stacklevel=2,
        )
        yield lambda: None
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha1(place.name.encode()).digest()[:8], "big", signed=True)
    connection = engine.connect()
    held = True
    try:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        connection.commit()

        def release():
            nonlocal held
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()
                held = False

        yield release
        release()
    finally:
        connection.close()


# -- one worker -----------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The process's start time (Linux), so a reused PID is not taken for the old worker."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _worker_identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def _is_dead(worker: dict | None) -> bool:
    """Whether a trial's worker was on this host and is gone (other hosts: heartbeats tell)."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = worker.get("start")
    return start is not None and _process_start(pid) not in (None, start)


def retry_dead_trials(study, log=print) -> list[int]:
    """Fail every RUNNING trial whose worker on this host is gone and queue its retry."""
    from optuna.trial import TrialState

    retried = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(frozen.user_attrs.get("worker")):
            continue
        try:
            study.tell(frozen.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker got there first
            continue
        failed = next(t for t in study.get_trials(deepcopy=True) if t.number == frozen.number)
        _retry_callback()(study, failed)
        retried.append(frozen.number)
        log(f"trial {frozen.number}: its worker was killed; retried from its last epoch")
    return retried


def spent(study) -> int:
    """Trials counted against the budget: all but the queued and the retries of killed ones."""
    from optuna.trial import TrialState

    return sum(
        t.state != TrialState.WAITING and "failed_trial" not in t.system_attrs
        for t in study.get_trials(deepcopy=False)
    )


def _trial_folds(config: Config) -> list[int]:
    k = config.folds.k
    folds = list(range(k)) if config.tune.folds is None else list(config.tune.folds)
    bad = [f for f in folds if not 0 <= f < k] + [f for i, f in enumerate(folds) if f in folds[:i]]
    if bad or not folds:
        raise ConfigError(
            f"tune.folds={config.tune.folds}: fold numbers in 0..{k - 1}, each once "
            "(null: all folds)"
        )
    return folds


class _Pruning:
    """A trial's epoch reports, registered as a plugin (``competition_epoch_end``) while it runs."""

    def __init__(self, trial, run_dir: Path, folds: list[int], epochs: int, key: str):
        self.trial, self.run_dir, self.folds, self.epochs, self.key = (
            trial,
            Path(run_dir),
            folds,
            epochs,
            key,
        )
        self.scores: list[float] = []

    def report(self, step: int, value: float) -> None:
        import optuna

        with warnings.catch_warnings():  # a retried trial reports its inherited steps again
            warnings.simplefilter("ignore")
            self.trial.report(value, step=step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (running CV {value:.4f})")

    @hookimpl
    def competition_epoch_end(self, fold, epoch, metrics, run_dir):
        if Path(run_dir) != self.run_dir or epoch >= self.epochs - 1 or self.key not in metrics:
            return  # a fold's last step is its recorded OOF score (after_fold)
        value = (sum(self.scores) + float(metrics[self.key])) / (len(self.scores) + 1)
        self.report(self.folds.index(fold) * self.epochs + epoch + 1, value)

    def after_fold(self, fold: int, record) -> None:
        self.scores.append(record.fold_score(fold))
        step = (self.folds.index(fold) + 1) * self.epochs
        self.report(step, sum(self.scores) / len(self.scores))


def _same_params(study, trial_number: int, params: dict):
    from optuna.trial import TrialState

    states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    for other in study.get_trials(deepcopy=False, states=states):
        if other.number != trial_number and other.params == params:
            return other
    return None


def _wait_for(study, number: int, poll_s: float = 5.0):
    from optuna.trial import TrialState

    while True:
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if frozen.state != TrialState.RUNNING or _is_dead(frozen.user_attrs.get("worker")):
            return frozen
        time.sleep(poll_s)


def run_worker(
    config: Config,
    place: StudyPlace,
    runs_dir: Path = RUNS_DIR,
    deadline: float | None = None,
    log=print,
    **paths,
) -> int:
    """Run trials of the study until its budget is spent (or ``deadline``); trials run here."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(place)
    study = open_study(config, place, storage)
    pm = get_plugin_manager()
    folds = _trial_folds(config)
    metric_key = f"val_{get_metric(config.metric).name}"
    ran = 0
    while True:
        with study_lock(place, storage) as release:
            retry_dead_trials(study, log)
            if deadline is not None and time.time() >= deadline:
                log(f"tune.timeout_s reached; {spent(study)} trials spent")
                return ran
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting and spent(study) >= config.tune.trials:
                return ran
            # a seed per trial number: workers never draw with the same seed; a resumed study
            # does not replay its start-up trials; one worker alone is reproducible
            with warnings.catch_warnings():  # constant_liar is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.sampler = optuna.samplers.TPESampler(
                    seed=config.seed + len(study.get_trials(deepcopy=False)), constant_liar=True
                )
            asked: dict = {}

            def objective(trial, release=release, asked=asked):
                asked["number"] = trial.number
                run_config = trial_config(trial, config, pm)
                run_dir = Path(runs_dir) / run_config.name
                trial.set_user_attr("run_dir", str(run_dir))
                trial.set_user_attr("worker", _worker_identity())
                twin = _same_params(study, trial.number, trial.params)
                release()  # the parameters are in the storage: other workers may ask now
                if twin is not None:  # the same parameters: never trained twice at once
                    if twin.state == TrialState.RUNNING:
                        log(
                            f"trial {trial.number}: waits for trial {twin.number} (same parameters)"
                        )
                        twin = _wait_for(study, twin.number)
                    trial.set_user_attr("duplicate_of", twin.number)
                    if twin.state == TrialState.COMPLETE:
                        log(f"trial {trial.number}: same parameters as trial {twin.number}")
                        return twin.value
                    if twin.state == TrialState.PRUNED:
                        raise optuna.TrialPruned(f"same parameters as pruned trial {twin.number}")
                pruning = _Pruning(trial, run_dir, folds, config.optim.epochs, metric_key)
                pm.register(pruning, name=f"tune-trial-{trial.number}-{os.getpid()}")
                try:
                    run_cv(
                        run_config,
                        folds=folds,
                        log=log,
                        after_fold=pruning.after_fold,
                        runs_dir=runs_dir,
                        **paths,
                    )
                finally:
                    pm.unregister(pruning)
                return sum(pruning.scores) / len(pruning.scores)

            try:
                # a diverging recipe is a failed trial, not the end of the study
                study.optimize(objective, n_trials=1, catch=(DivergenceError,))
            except KeyboardInterrupt:
                _requeue_interrupted(study, asked.get("number"))
                raise
        ran += 1


def _requeue_interrupted(study, number: int | None) -> None:
    """A trial stopped by Ctrl-C is retried from its last epoch when the study resumes."""
    from optuna.trial import TrialState

    if number is None:
        return
    frozen = next((t for t in study.get_trials(deepcopy=True) if t.number == number), None)
    if frozen is not None and frozen.state == TrialState.FAIL:
        _retry_callback()(study, frozen)


def _worker_main(config, place, runs_dir, deadline, threads, index, paths) -> int:
    """A spawned worker process: its share of the CPU threads, its own log prefix."""
    import torch

    torch.set_num_threads(threads)
    prefix = f"[worker {index}] "
    return run_worker(
        config, place, runs_dir, deadline, log=lambda *a: print(prefix, *a, flush=True), **paths
    )


# -- the study ------------------------------------------------------------------------------------


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def tune(config: Config, trials: int | None = None, runs_dir: Path = RUNS_DIR, log=print, **paths):
    """Run (or resume) ``config``'s study with ``tune.workers`` processes; the Optuna study.

    Writes ``runs/<study>-best.yaml`` (the best trial's config: ``competition train`` it) and
    ``runs/<study>-best.overrides.yaml`` (only what the study changed); with ``tune.folds`` the
    best trial is then run on all folds.
    """
    import multiprocessing

    if trials is not None:
        config = replace(config, {"tune.trials": trials})
    place = study_place(config, runs_dir)
    if place.kind == "sqlite" and config.tune.workers > 1:
        raise ConfigError(
            f"tune.workers={config.tune.workers} on SQLite ({place}): SQLite locks up under "
            "parallel writers. Use a journal file (--storage runs/<study>.journal) or PostgreSQL."
        )
    check_space(config, parse_space(config.tune.space))
    _trial_folds(config)
    study = open_study(config, place)  # created once here, before any worker starts
    deadline = None if config.tune.timeout_s is None else time.time() + config.tune.timeout_s
    workers = config.tune.workers
    log(f"study '{place.name}' in {place}: budget {config.tune.trials} trials, {workers} worker(s)")
    if workers == 1:
        run_worker(config, place, runs_dir, deadline, log, **paths)
    else:
        threads = max(1, _cpus() // workers)
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(
                target=_worker_main,
                args=(config, place, Path(runs_dir), deadline, threads, i, paths),
                name=f"tune-worker-{i}",
            )
            for i in range(workers)
        ]
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            for process in processes:
                process.join(timeout=30)
            raise
        failed = [p.name for p in processes if p.exitcode != 0]
        if failed:
            raise CompetitionError(
                f"{', '.join(failed)} stopped with an error (see above); run the same command "
                "again to resume the study"
            )
    study = open_study(config, place)
    _write_best(study, config, runs_dir, log, **paths)
    return study


def _write_best(study, config: Config, runs_dir: Path, log=print, **paths) -> None:
    import optuna
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    best = study.best_trial
    best_config = trial_config(optuna.trial.FixedTrial(best.params), config)
    name = study.study_name
    write_text(Path(runs_dir) / f"{name}-best.yaml", dump_yaml(best_config.to_dict()))
    overlay: dict = {}
    for key, value in best.params.items():
        node = overlay
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _value_of(config, key, value)
    write_text(Path(runs_dir) / f"{name}-best.overrides.yaml", dump_yaml(overlay))
    if config.tune.folds is not None and len(config.tune.folds) < config.folds.k:
        log(f"best trial {best.number}: running it on all {config.folds.k} folds")
        try:
            cv = run_cv(best_config, log=log, runs_dir=runs_dir, **paths)
        except CompetitionError as exc:
            log(f"best trial on all folds: not run now ({exc})")
        else:
            log(f"best trial on all folds: {config.metric} {cv['mean']:.4f} ± {cv['std']:.4f}")


def _value_of(config: Config, key: str, recorded):
    """A parameter's config value (a YAML space's categorical records its choice's text)."""
    for dim in parse_space(config.tune.space):
        if dim.key == key and dim.kind == "categorical":
            labels = dim.labels()
            if recorded in labels:
                return dim.choices[labels.index(recorded)]
    return recorded


# -- the report -----------------------------------------------------------------------------------


def report(config: Config, runs_dir: Path = RUNS_DIR, log=print) -> Path:
    """``runs/<study>-report/``: history, importance and parallel-coordinate plots (PNG) and a
    table of trials (``trials.csv``); the storage itself stays readable by optuna-dashboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    place = study_place(config, runs_dir)
    if place.kind != "rdb" and not Path(place.target.split("sqlite:///", 1)[-1]).is_file():
        raise ConfigError(f"no study at {place}: run `competition tune` first, or pass --storage")
    study = open_study(config, place, create=False)
    out = Path(runs_dir) / f"{place.name}-report"
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    write_csv(out / "trials.csv", table)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figures = {
        "history.png": lambda: plots.plot_optimization_history(study),
        "importance.png": lambda: plots.plot_param_importances(study),
        "parallel.png": lambda: plots.plot_parallel_coordinate(study),
        "intermediate.png": lambda: plots.plot_intermediate_values(study),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib plots are marked experimental
        for file, draw in figures.items():
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                log(f"{file}: not drawn ({exc})")
                continue
            axes = axes.flat[0] if hasattr(axes, "flat") else axes
            figure = axes.figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            with atomic_path(out / file) as tmp:
                figure.savefig(tmp, format="png", dpi=110)
            plt.close(figure)
    log(f"{len(study.trials)} trials ({len(complete)} complete) in '{place.name}' at {place}")
    log(f"report: {out} (history.png, importance.png, parallel.png, trials.csv)")
    if place.kind == "journal":
        log(f"live view: optuna-dashboard {place}")
    else:
        log(f"live view: optuna-dashboard {place.target}")
    return out


def summary(study, limit: int = 10) -> str:
    """The best trials as a short text table."""
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    direction = study.direction.name == "MAXIMIZE"
    done.sort(key=lambda t: -t.value if direction else t.value)
    counts = {s.name.lower(): 0 for s in TrialState}
    for t in study.trials:
        counts[t.state.name.lower()] += 1
    lines = [", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    for t in done[:limit]:
        params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        lines.append(f"  trial {t.number:>4}  {t.value:.4f}  {params}")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


__all__ = [
    "StudyPlace",
    "open_storage",
    "open_study",
    "report",
    "retry_dead_trials",
    "run_worker",
    "spent",
    "study_lock",
    "study_place",
    "suggest_config",
    "summary",
    "trial_config",
    "tune",
]
