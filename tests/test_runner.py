"""The K-fold runner end to end on real images: OOF, cv.json, submission, resume after a kill."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from competition import hookimpl
from competition.cv import predict_run, run_cv
from competition.errors import ConfigError, DataError
from competition.manager import get_plugin_manager
from competition.runs import RunRecord
from competition.submission import validate_submission
from competition.workspace import Workspace
from tests.conftest import KAGGLE_SMALL_CLASSES, trashnet_config


def test_end_to_end_run_writes_oof_cv_and_a_valid_submission(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, "tta=[identity, hflip]")
    cv = run_cv(config, **run_paths)
    run_dir = run_paths["runs_dir"] / "t"
    classes = KAGGLE_SMALL_CLASSES

    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", "fold", "target", "target_index", *classes]
    assert (np.asarray(classes)[oof["target_index"]] == oof["target"]).all()
    assert sorted(oof["id"]) == sorted(
        pd.read_csv(kaggle_small / "train.csv", dtype=str)["image_id"]
    )
    assert np.allclose(oof[classes].sum(axis=1), 1.0, atol=1e-5)

    saved = json.loads((run_dir / "cv.json").read_text())
    assert saved["metric"] == "accuracy" and len(saved["folds"]) == 2
    assert saved["mean"] == pytest.approx(np.mean(saved["folds"]))
    assert saved["std"] == pytest.approx(np.std(saved["folds"]))
    assert 0.0 <= saved["mean"] <= 1.0 and cv["mean"] == saved["mean"]

    sample = pd.read_csv(kaggle_small / "sample_submission.csv", dtype=str)
    submission = pd.read_csv(run_paths["submissions_dir"] / "t.csv", dtype=str)
    assert list(submission.columns) == list(sample.columns)
    assert submission["image_id"].tolist() == sample["image_id"].tolist()
    assert set(submission["label"]) <= set(classes)

    for name in (
        "config.yaml",
        "environment.json",
        "report.md",
        "fold_0/best.pt",
        "fold_0/last.pt",
    ):
        assert (run_dir / name).is_file(), name
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["packages"]["torch"] and "git_commit" in environment
    log = pd.read_csv(run_dir / "fold_1" / "log.csv")
    assert list(log["epoch"]) == [1] and "val_accuracy" in log

    # a second call finds every fold done and only re-summarises
    again = run_cv(config, **run_paths)
    assert again["folds"] == cv["folds"]


def test_fold_scores_agree_with_the_oof_table(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, "metric=macro_f1")
    cv = run_cv(config, folds=[1], **run_paths)
    oof = pd.read_csv(run_paths["runs_dir"] / "t" / "oof.csv")
    assert cv["folds_done"] == [1] and set(oof["fold"]) == {1}
    from sklearn.metrics import f1_score

    classes = [c for c in oof.columns if c not in ("id", "fold", "target", "target_index")]
    expected = f1_score(
        oof["target"], np.asarray(classes)[oof[classes].to_numpy().argmax(1)], average="macro"
    )
    assert cv["folds"][0] == pytest.approx(expected)


class _KillAfterFirstEpoch:
    """A plugin that interrupts training at the end of the first epoch, like Ctrl-C would."""

    @hookimpl
    def competition_epoch_end(self, fold, epoch, metrics, run_dir):
        if epoch == 0:
            raise KeyboardInterrupt


class _EpochCounter:
    def __init__(self):
        self.epochs = []

    @hookimpl
    def competition_epoch_end(self, fold, epoch, metrics, run_dir):
        self.epochs.append(epoch)


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(kaggle_small, tmp_path, run_paths):
    extra = ("optim.epochs=2", "augment.batch=[{name: mixup, alpha: 0.4}]")
    config = trashnet_config(kaggle_small, tmp_path, *extra)
    reference = run_cv(config, folds=[0], **run_paths)

    other = {k: v.parent / (v.name + "_b") for k, v in run_paths.items()}
    pm = get_plugin_manager()
    killer = _KillAfterFirstEpoch()
    pm.register(killer, name="killer")
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cv(config, folds=[0], **other)
    finally:
        pm.unregister(killer)
    fold_dir = other["runs_dir"] / "t" / "fold_0"
    assert (fold_dir / "last.pt").is_file() and not (fold_dir / "result.json").exists()
    assert len(pd.read_csv(fold_dir / "log.csv")) == 1

    counter = _EpochCounter()
    pm.register(counter, name="counter")
    try:
        resumed = run_cv(config, folds=[0], **other)
    finally:
        pm.unregister(counter)
    assert counter.epochs == [1]  # only the second epoch was trained again
    assert len(pd.read_csv(fold_dir / "log.csv")) == 2
    assert resumed["folds"] == pytest.approx(reference["folds"])
    a = pd.read_csv(run_paths["runs_dir"] / "t" / "oof.csv")
    b = pd.read_csv(other["runs_dir"] / "t" / "oof.csv")
    np.testing.assert_allclose(a.iloc[:, 4:].to_numpy(), b.iloc[:, 4:].to_numpy(), atol=1e-5)


def test_a_changed_config_never_mixes_into_an_existing_run(kaggle_small, tmp_path, run_paths):
    run_cv(trashnet_config(kaggle_small, tmp_path), folds=[0], **run_paths)
    with pytest.raises(ConfigError, match="holds a run with another config"):
        run_cv(trashnet_config(kaggle_small, tmp_path, "optim.lr=0.1"), folds=[0], **run_paths)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_predict_with_other_tta_writes_a_new_run_and_leaves_the_source_alone(
    kaggle_small, tmp_path, run_paths
):
    source = run_cv(trashnet_config(kaggle_small, tmp_path), **run_paths)
    run_dir = run_paths["runs_dir"] / "t"
    before = _snapshot(run_dir)
    submission_before = (run_paths["submissions_dir"] / "t.csv").read_bytes()
    cv = predict_run(
        run_dir,
        {"tta": ["identity", "hflip", "vflip"]},
        folds_dir=run_paths["folds_dir"],
        submissions_dir=run_paths["submissions_dir"],
    )
    assert _snapshot(run_dir) == before  # the source run is never changed
    assert (run_paths["submissions_dir"] / "t.csv").read_bytes() == submission_before
    new = Path(cv["submission"]).stem
    assert new.startswith("t-tta-") and (run_paths["runs_dir"] / new / "cv.json").is_file()
    record = RunRecord.open(run_paths["runs_dir"] / new)
    assert [s.name for s in record.config.tta] == ["identity", "hflip", "vflip"]
    assert record.produced_by["verb"] == "predict"
    assert record.weights_run().path.resolve() == run_dir.resolve()
    assert not (run_paths["runs_dir"] / new / "fold_0" / "best.pt").exists()  # points, no copy
    after = np.load(run_paths["runs_dir"] / new / "fold_0" / "test_probs.npy")
    assert not np.allclose(after, np.load(run_dir / "fold_0" / "test_probs.npy"))
    # both choices keep their own OOF score, side by side
    assert cv["folds_done"] == source["folds_done"] and cv["oof"] != pytest.approx(-1)

    # a re-predicted run re-predicts from the original weights; changing the model is refused
    again = predict_run(
        run_paths["runs_dir"] / new, {"tta": ["identity"]}, name="t-again", **run_paths
    )
    assert again["oof"] == pytest.approx(source["oof"])
    with pytest.raises(ConfigError, match=r"model\.backbone cannot change"):
        predict_run(run_dir, {"model.backbone": "test_resnet"}, **run_paths)


def test_submission_validation_catches_a_broken_frame(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path)
    run = Workspace(config, run_paths["folds_dir"])
    sample = run.competition.sample_submission
    good = sample.assign(label="digit_1")
    validate_submission(good, run.competition, config)
    with pytest.raises(DataError, match="not the sample submission's ids"):
        validate_submission(good.iloc[::-1].reset_index(drop=True), run.competition, config)
    with pytest.raises(DataError, match="not classes"):
        validate_submission(sample.assign(label="wood"), run.competition, config)
    with pytest.raises(DataError, match="columns"):
        validate_submission(good.rename(columns={"label": "class"}), run.competition, config)


def test_pipeline_without_a_sizing_transform_is_rejected_at_setup(
    kaggle_small, tmp_path, run_paths
):
    from competition.errors import PluginError

    config = trashnet_config(kaggle_small, tmp_path, "augment.train=[HorizontalFlip]")
    with pytest.raises(PluginError, match=r"augment|HorizontalFlip"):
        run_cv(config, **run_paths)


def test_out_of_range_fold_is_a_clear_error(kaggle_small, tmp_path, run_paths):
    with pytest.raises(ConfigError, match=r"--folds: fold\(s\) \[7\] out of range"):
        run_cv(trashnet_config(kaggle_small, tmp_path), folds=[7], **run_paths)


def test_fixres_evaluates_at_a_larger_size_than_training(kaggle_small, tmp_path, run_paths):
    """Train and test resolution are separate settings (FixRes, Touvron et al. 2019)."""
    config = trashnet_config(kaggle_small, tmp_path, "data.eval_image_size=48")
    run = Workspace(config, run_paths["folds_dir"])
    assert run.cache_side == round(48 / config.data.crop_pct)
    train_images, _ = next(iter(run.loader("train", np.arange(8), train=True)))
    eval_images, _ = next(iter(run.loader("train", np.arange(8))))
    assert train_images.shape[-2:] == (32, 32) and eval_images.shape[-2:] == (48, 48)
    assert train_images.dtype == torch.uint8  # uint8 until the device
    cv = run_cv(config, folds=[0], **run_paths)
    assert 0.0 <= cv["mean"] <= 1.0


def test_ema_weights_are_what_gets_evaluated(kaggle_small, tmp_path, run_paths):
    """With optim.ema_decay the best checkpoint holds the averaged weights, not the raw ones."""
    config = trashnet_config(kaggle_small, tmp_path, "optim.ema_decay=0.5")
    run_cv(config, folds=[0], **run_paths)
    fold_dir = run_paths["runs_dir"] / "t" / "fold_0"
    best = torch.load(fold_dir / "best.pt", weights_only=True)["model"]
    last = torch.load(fold_dir / "last.pt", weights_only=True)
    weight = next(k for k in last["model"] if k.endswith("head.weight"))
    assert last["best_epoch"] == last["epoch"] == 0  # one epoch: best is the last
    assert torch.equal(best[weight], last["ema"][f"module.{weight}"])
    assert not torch.allclose(best[weight], last["model"][weight])


class _RecordingAugments:
    """Two batch augmentations that log when they run, registered like a third-party plugin."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def competition_register_batch_augments(self):
        calls = self.calls

        class Recorder:
            def __init__(self, tag: str, mixes: bool = False):
                self.tag, self.mixes = tag, mixes

            def __call__(self, images, targets):
                calls.append(self.tag)
                return images, targets

        return {"recorder": Recorder}


def test_batch_augments_run_in_config_order_and_mixing_stops_for_the_last_epochs(
    kaggle_small, tmp_path, run_paths
):
    recorder = _RecordingAugments()
    pm = get_plugin_manager()
    pm.register(recorder, name="recording_augments")
    try:
        config = trashnet_config(
            kaggle_small,
            tmp_path,
            "optim.epochs=2",
            "augment.mix_off_last_epochs=1",
            "augment.batch=[{name: recorder, tag: mixer, mixes: true},"
            " {name: recorder, tag: policy}]",
        )
        run_cv(config, folds=[0], **run_paths)
    finally:
        pm.unregister(recorder)
    steps = len(recorder.calls) - recorder.calls.count("mixer")  # the policy runs every step
    per_epoch = steps // 2
    # epoch 1: mixer then policy on every batch; epoch 2 (the last): the policy alone
    assert recorder.calls[: 2 * per_epoch] == ["mixer", "policy"] * per_epoch
    assert recorder.calls[2 * per_epoch :] == ["policy"] * per_epoch


def test_a_changed_train_table_is_refused_by_an_existing_run(kaggle_small, tmp_path, run_paths):
    """Folds made for another train table must never mix into one run's OOF."""
    root = tmp_path / "comp"
    shutil.copytree(kaggle_small, root)
    run_cv(trashnet_config(root, tmp_path), folds=[0], **run_paths)
    train = pd.read_csv(root / "train.csv", dtype=str)
    train.iloc[1:].to_csv(root / "train.csv", index=False)
    with pytest.raises(ConfigError, match="the train table or its folds changed"):
        run_cv(trashnet_config(root, tmp_path), folds=[1], **run_paths)


def test_an_unavailable_device_is_a_config_error(kaggle_small, tmp_path, run_paths):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"device=cuda: 0 CUDA device"):
        run_cv(trashnet_config(kaggle_small, tmp_path, "device=cuda"), **run_paths)
