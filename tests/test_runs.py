"""The run record: one fold loop for every verb, events, partial runs, blends of blends, locks,
names that stay inside the output folders, damaged state and leftovers of a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from competition import hookimpl, runs
from competition.baseline import BaselineOptions, run_baseline
from competition.cli import main
from competition.config import REPO_ROOT
from competition.cv import predict_run, run_cv
from competition.ensemble import blend
from competition.errors import (
    CompetitionError,
    ConfigError,
    DamagedFileError,
    DataError,
    DivergenceError,
)
from competition.manager import get_plugin_manager
from competition.runs import (
    OutputDirs,
    RunLockedError,
    RunRecord,
    summary_table,
)
from competition.tune import tune
from competition.workspace import Workspace
from tests.conftest import trashnet_config

quiet = lambda *a, **k: None  # noqa: E731


class _Events:
    """Records the event hooks, registered like a third-party logger plugin."""

    def __init__(self):
        self.events = []

    @hookimpl
    def competition_configure(self, config):
        self.events.append(("configure", config.name))

    @hookimpl
    def competition_fold_start(self, fold, run_dir, config):
        self.events.append(("fold_start", Path(run_dir).name, fold))

    @hookimpl
    def competition_fold_end(self, fold, result, run_dir):
        self.events.append(("fold_end", Path(run_dir).name, fold))

    @hookimpl
    def competition_run_end(self, run_dir, cv):
        self.events.append(("run_end", Path(run_dir).name, cv["folds_done"]))


@pytest.fixture
def events():
    recorder = _Events()
    pm = get_plugin_manager()
    pm.register(recorder, name="events")
    yield recorder.events
    pm.unregister(recorder)


def _fold_events(events, run_name):
    return [e[0] for e in events if len(e) > 1 and e[1] == run_name and e[0] != "configure"]


def test_events_fire_for_train_baseline_predict_blend_and_tune(
    events, kaggle_small, tmp_path, run_paths
):
    expected = ["fold_start", "fold_end", "fold_start", "fold_end", "run_end"]
    run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)
    assert _fold_events(events, "t") == expected
    run_baseline(
        trashnet_config(kaggle_small, tmp_path), BaselineOptions("ncm"), log=quiet, **run_paths
    )
    assert _fold_events(events, "t-ncm") == expected
    predict_run(run_paths["runs_dir"] / "t", {"tta": ["hflip"]}, name="t-flip", **run_paths)
    assert _fold_events(events, "t-flip") == expected
    blend([run_paths["runs_dir"] / n for n in ("t", "t-ncm")], "tb", log=quiet, **run_paths)
    assert _fold_events(events, "tb") == expected

    events.clear()
    config = trashnet_config(kaggle_small, tmp_path, "tune.params=[optim.lr]", "name=s")
    paths = dict(run_paths)
    study = tune(config, trials=1, runs_dir=paths.pop("runs_dir"), **paths)
    trial_run = Path(study.trials[0].user_attrs["run_dir"]).name
    assert _fold_events(events, trial_run) == expected
    assert ("configure", trial_run) in events


def test_a_blend_of_a_blend_is_a_run_like_any_other(kaggle_small, tmp_path, run_paths):
    runs = run_paths["runs_dir"]
    run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)
    for method in ("ncm", "linear"):
        run_baseline(
            trashnet_config(kaggle_small, tmp_path), BaselineOptions(method), log=quiet, **run_paths
        )
    first = blend([runs / "t-ncm", runs / "t-linear"], "b1", log=quiet, **run_paths)
    record = RunRecord.open(runs / "b1")
    members = record.produced_by["members"]
    assert record.produced_by["verb"] == "ensemble" and len(members) == 2
    assert [m["weight"] for m in members] == pytest.approx(first["weights"])
    assert record.config.name == "b1" and record.done_folds() == [0, 1]

    second = blend([runs / "b1", runs / "t"], "b2", log=quiet, method="optimize", **run_paths)
    assert second["folds_done"] == [0, 1] and len(second["weights"]) == 2
    # the blend's test predictions are its members' with the fitted weights, fold by fold
    w = second["weights"]
    expected = w[0] * np.load(runs / "b1/fold_0/test_probs.npy") + w[1] * np.load(
        runs / "t/fold_0/test_probs.npy"
    )
    np.testing.assert_allclose(np.load(runs / "b2/fold_0/test_probs.npy"), expected)
    submission = pd.read_csv(second["submission"], dtype=str)
    sample = pd.read_csv(kaggle_small / "sample_submission.csv", dtype=str)
    assert submission["image_id"].tolist() == sample["image_id"].tolist()
    with pytest.raises(ConfigError, match="no fold weights"):
        predict_run(runs / "b2", {"tta": ["hflip"]}, **run_paths)


def test_the_same_run_twice_is_refused(kaggle_small, tmp_path, run_paths):
    run_cv(trashnet_config(kaggle_small, tmp_path), folds=[0], **run_paths)
    runs = run_paths["runs_dir"]
    with pytest.raises(ConfigError, match="given twice"):
        blend([runs / "t", runs / ".." / "runs" / "t"], "tt", **run_paths)


def test_a_partial_run_says_so_and_blends_on_the_common_rows(kaggle_small, tmp_path, run_paths):
    cv = run_cv(trashnet_config(kaggle_small, tmp_path), folds=[0], **run_paths)
    assert cv["folds_done"] == [0] and cv["k"] == 2 and cv["complete"] is False
    table = summary_table(cv)
    assert "over 1 of 2 folds" in table and "±" not in table
    assert "partial: 1 of 2 folds" in table
    assert Path(cv["submission"]).name == "t.partial.csv"
    assert not (run_paths["submissions_dir"] / "t.csv").exists()
    assert "Partial run" in (run_paths["runs_dir"] / "t" / "report.md").read_text()

    base = run_baseline(
        trashnet_config(kaggle_small, tmp_path), BaselineOptions("ncm"), log=quiet, **run_paths
    )
    assert base["complete"] and base["folds_done"] == [0, 1]
    said = []
    blended = blend(
        [run_paths["runs_dir"] / "t", run_paths["runs_dir"] / "t-ncm"],
        "tn",
        log=said.append,
        **run_paths,
    )
    assert blended["folds_done"] == [0] and blended["rows"] == 24
    assert any("folds all runs finished: [0]" in s for s in said)
    assert any("in-sample" in s for s in said) and blended["nested"] is False

    # finishing the other fold completes the run and replaces the partial submission
    done = run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)
    assert done["complete"] and Path(done["submission"]).name == "t.csv"
    assert not (run_paths["submissions_dir"] / "t.partial.csv").exists()


def test_baseline_takes_folds_like_train(kaggle_small, tmp_path, run_paths):
    cv = run_baseline(
        trashnet_config(kaggle_small, tmp_path),
        BaselineOptions("knn"),
        folds=[1],
        log=quiet,
        **run_paths,
    )
    assert cv["folds_done"] == [1] and not cv["complete"]


def test_oof_table_names_the_class_and_keeps_its_index(kaggle_small, tmp_path, run_paths):
    from sklearn.metrics import log_loss

    run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)
    oof = pd.read_csv(run_paths["runs_dir"] / "t" / "oof.csv", dtype={"id": str})
    classes = list(oof.columns[4:])
    assert set(oof["target"]) <= set(classes)
    # the documented use works without "Mix of label input types"
    assert log_loss(oof["target"], oof[classes].to_numpy(), labels=classes) > 0


# -- locks ----------------------------------------------------------------------------------------


HOLDER = textwrap.dedent(
    """
    import sys, time
    from competition.config import load_config
    from competition.runs import OutputDirs, RunRecord
    from competition.workspace import Workspace
    config = load_config(sys.argv[1], sys.argv[3:])
    runs, folds, subs = (sys.argv[2] + "/" + n for n in ("runs", "folds", "submissions"))
    dirs = OutputDirs(runs, folds, subs)
    record = RunRecord.create(Workspace(config, folds, print), {"verb": "train"}, dirs)
    if config.name == "claims-fold-0":  # hold fold 0 only, as a process training it does
        assert record.claim_fold(0) == "claimed"
        record.release()
    print("holding", flush=True)
    time.sleep(60)
    """
)


def same_config(kaggle_small, tmp_path, name: str) -> list[str]:
    """Overrides of configs/trashnet.yaml giving ``trashnet_config(kaggle_small, tmp_path)``."""
    overrides = [f"competition.root={kaggle_small}", "folds.k=2", f"name={name}"]
    overrides += [f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    overrides += ["model.backbone=resnet10t", "model.pretrained=null", "data.image_size=32"]
    return [*overrides, "data.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0"]


def start_holder(kaggle_small, tmp_path, name: str) -> subprocess.Popen:
    """Another process holding run ``name`` (or, for ``claims-fold-0``, only its fold 0)."""
    overrides = same_config(kaggle_small, tmp_path, name)
    script = [sys.executable, "-c", HOLDER, str(REPO_ROOT / "configs/trashnet.yaml")]
    holder = subprocess.Popen(
        [*script, str(tmp_path), *overrides], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    lines = iter(holder.stdout.readline, "")
    assert "holding" in (line.strip() for line in lines)
    return holder


def test_a_second_process_on_a_locked_run_is_refused_with_the_holders_pid(
    kaggle_small, tmp_path, run_paths, monkeypatch
):
    monkeypatch.setattr(runs, "LOCK_WAIT_S", 1.0)  # a writer normally holds it for moments
    config = trashnet_config(kaggle_small, tmp_path)
    holder = start_holder(kaggle_small, tmp_path, "t")
    try:
        with pytest.raises(RunLockedError, match=rf"in use by process {holder.pid}\b.*waited 1 s"):
            run_cv(config, **run_paths)
    finally:
        holder.kill()
        holder.wait()
    # the OS released the lock with the killed process: the run goes on
    assert run_cv(config, folds=[0], **run_paths)["folds_done"] == [0]


def test_a_fold_another_process_makes_is_skipped_and_the_run_completes_later(
    kaggle_small, tmp_path, run_paths
):
    config = trashnet_config(kaggle_small, tmp_path, "name=claims-fold-0")
    holder = start_holder(kaggle_small, tmp_path, "claims-fold-0")
    lines = []
    try:
        cv = run_cv(config, log=lines.append, **run_paths)  # all folds asked; fold 0 is taken
    finally:
        holder.kill()
        holder.wait()
    assert cv["folds_done"] == [1] and not cv["complete"]
    assert any(f"fold 0: process {holder.pid} on " in line for line in lines), lines
    assert Path(cv["submission"]).name == "claims-fold-0.partial.csv"
    cv = run_cv(config, log=lines.append, **run_paths)  # the holder is gone: fold 0 is made now
    assert cv["complete"] and cv["folds_done"] == [0, 1]
    assert Path(cv["submission"]).name == "claims-fold-0.csv"
    assert not (run_paths["submissions_dir"] / "claims-fold-0.partial.csv").exists()


def test_two_processes_on_other_folds_of_one_run_write_one_complete_run(
    kaggle_small, tmp_path, run_paths
):
    """``--folds 0`` in one process and ``--folds 1`` in another, at the same time."""
    script = textwrap.dedent(
        """
        import sys
        from competition.config import load_config
        from competition.cv import run_cv
        config = load_config(sys.argv[1], sys.argv[3:])
        paths = {k: sys.argv[2] + "/" + k.split("_")[0] for k in
                 ("runs_dir", "folds_dir", "submissions_dir")}
        print(run_cv(config, folds=[0], **paths)["folds_done"])
        """
    )
    overrides = same_config(kaggle_small, tmp_path, "t")
    config = trashnet_config(kaggle_small, tmp_path)
    Workspace(config, run_paths["folds_dir"], quiet).images("train")  # one cache for both
    command = [sys.executable, "-c", script, str(REPO_ROOT / "configs/trashnet.yaml")]
    other = subprocess.Popen(
        [*command, str(tmp_path), *overrides],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mine = run_cv(config, folds=[1], log=quiet, **run_paths)
    err = other.communicate(timeout=300)[1]
    assert other.returncode == 0, err[-2000:]
    assert mine["folds_done"] in ([1], [0, 1])
    final = RunRecord.open(run_paths["runs_dir"] / "t").cv()
    assert final["complete"] and final["folds_done"] == [0, 1]  # whoever ended last finished it
    assert (run_paths["submissions_dir"] / "t.csv").is_file()
    assert not (run_paths["submissions_dir"] / "t.partial.csv").exists()
    assert len(RunRecord.open(run_paths["runs_dir"] / "t").oof()) == 48


def test_one_process_cannot_open_a_run_twice(kaggle_small, tmp_path, run_paths, monkeypatch):
    monkeypatch.setattr(runs, "LOCK_WAIT_S", 0.5)
    config = trashnet_config(kaggle_small, tmp_path)
    dirs = OutputDirs(**run_paths)
    workspace = Workspace(config, dirs.folds_dir, quiet)
    with (
        RunRecord.create(workspace, {"verb": "train"}, dirs),
        pytest.raises(RunLockedError, match=f"process {os.getpid()}"),
    ):
        RunRecord.create(workspace, {"verb": "train"}, dirs)
    with RunRecord.create(workspace, {"verb": "train"}, dirs):  # released on exit
        pass


# -- names stay inside the output folders ---------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", "."])
def test_names_never_leave_the_output_folders(name, kaggle_small, tmp_path, run_paths):
    with pytest.raises(ConfigError, match="plain name"):
        trashnet_config(kaggle_small, tmp_path, f"name={name}")
    with pytest.raises(ConfigError, match="plain name"):
        trashnet_config(kaggle_small, tmp_path, f"competition.name={name}")


def test_verb_names_are_plain_names_too(kaggle_small, tmp_path, run_paths):
    run_cv(trashnet_config(kaggle_small, tmp_path), folds=[0], **run_paths)
    runs = run_paths["runs_dir"]
    run_cv(trashnet_config(kaggle_small, tmp_path, "name=u"), folds=[0], **run_paths)
    with pytest.raises(ConfigError, match="plain name"):
        blend([runs / "t", runs / "u"], "../../x", **run_paths)
    with pytest.raises(ConfigError, match="plain name"):
        predict_run(runs / "t", {"tta": ["hflip"]}, name="../x", **run_paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cache", "folds", "runs", "submissions"]
    )


# -- damaged state --------------------------------------------------------------------------------


def test_damaged_run_files_get_errors_that_name_the_file(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path)
    run_cv(config, folds=[0], **run_paths)
    run_dir = run_paths["runs_dir"] / "t"

    result = run_dir / "fold_0" / "result.json"
    good = result.read_text()
    result.write_text('{"fold": 0, "best_')
    with pytest.raises(DataError, match=rf"{result}.*damaged.*Delete it"):
        run_cv(config, **run_paths)
    result.write_text(good)

    yaml_path = run_dir / "config.yaml"
    saved = yaml_path.read_text()
    yaml_path.write_text("name: t\noptim: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{yaml_path}: not valid YAML"):
        run_cv(config, **run_paths)
    with pytest.raises(ConfigError, match=rf"{yaml_path}: not valid YAML"):
        predict_run(run_dir, {"tta": ["hflip"]}, **run_paths)
    yaml_path.write_text(saved)

    best = run_dir / "fold_0" / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=rf"{best} is damaged.*rm -r"):
        predict_run(run_dir, {"tta": ["hflip"]}, name="p", **run_paths)


def test_a_file_where_the_run_folder_goes_is_refused(kaggle_small, tmp_path, run_paths):
    run_paths["runs_dir"].mkdir()
    (run_paths["runs_dir"] / "t").write_text("not a folder")
    with pytest.raises(ConfigError, match="a file is where this run's folder goes"):
        run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)


def test_an_unwritable_output_folder_is_found_before_training(kaggle_small, tmp_path, run_paths):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created below it")
    paths = {**run_paths, "submissions_dir": blocker / "submissions"}
    with pytest.raises(ConfigError, match="cannot write submissions"):
        run_cv(trashnet_config(kaggle_small, tmp_path), **paths)
    assert not (run_paths["runs_dir"] / "t" / "fold_0").exists()  # nothing trained


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_a_read_only_runs_folder_is_found_before_training(kaggle_small, tmp_path, run_paths):
    run_paths["runs_dir"].mkdir()
    run_paths["runs_dir"].chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot write runs"):
            run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)
    finally:
        run_paths["runs_dir"].chmod(0o755)


def test_temporaries_left_by_a_killed_process_are_removed_on_the_next_start(
    kaggle_small, tmp_path, run_paths
):
    config = trashnet_config(kaggle_small, tmp_path)
    run_cv(config, folds=[0], **run_paths)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    run_dir = run_paths["runs_dir"] / "t"
    orphans = [
        run_dir / "fold_1" / f".last.pt.{dead}.abc123.tmp",
        run_paths["submissions_dir"] / f".t.csv.{dead}.xyz.tmp",
        tmp_path / "cache" / f".trashnet-train-37px-crop-0.npy.{dead}.q1.tmp",
    ]
    alive = run_dir / f".oof.csv.{os.getpid()}.live.tmp"  # a live writer's file stays
    for path in [*orphans, alive]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    run_cv(config, folds=[1], **run_paths)
    assert not any(p.exists() for p in orphans)
    assert alive.exists()


def test_a_diverging_run_exits_non_zero_and_writes_no_submission(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, "optim.lr=1e6", "optim.epochs=2")
    with pytest.raises(DivergenceError, match=r"fold 0"):
        run_cv(config, **run_paths)
    assert not run_paths["submissions_dir"].exists() or not any(
        run_paths["submissions_dir"].iterdir()
    )
    assert not (run_paths["runs_dir"] / "t" / "fold_0" / "result.json").exists()
    assert issubclass(DivergenceError, CompetitionError)  # the CLI exits 2 on it


def test_environment_records_the_thread_count(kaggle_small, tmp_path, run_paths):
    import torch

    run_cv(trashnet_config(kaggle_small, tmp_path), folds=[0], **run_paths)
    saved = json.loads((run_paths["runs_dir"] / "t" / "environment.json").read_text())
    assert saved["torch_threads"] == torch.get_num_threads()


def test_an_override_without_equals_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "configs/demo.yaml", "optim.lr"])
    assert exc.value.code == 2
    assert "'optim.lr': an override is key=value" in capsys.readouterr().err
