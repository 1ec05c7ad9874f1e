"""Faults in one fold's training: divergence stops the fold, damaged checkpoints name the fix.

Real training on a tiny in-memory data set (scikit-learn's 8x8 digits, upscaled to 32 px RGB) with
a timm ``resnet10t`` on CPU; no ../shared needed.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from competition.config import load_config
from competition.engine import FoldTrainer
from competition.errors import CompetitionError, DamagedFileError, DivergenceError
from competition.io import load_torch
from competition.loaders import ImageDataset, make_loader
from competition.manager import get_plugin_manager, resolve
from competition.metrics import Metric

CLASSES = 4
ACCURACY = Metric("accuracy", lambda t, p: float((p.argmax(1) == t).mean()))


def digits(per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` digits of each of the first CLASSES classes as (N, 32, 32, 3) uint8."""
    data = load_digits()
    index = np.concatenate(
        [np.flatnonzero(data.target == c)[offset : offset + per_class] for c in range(CLASSES)]
    )
    images = (data.images[index] * (255 / 16)).astype(np.uint8)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # 8x8 -> 32x32
    return np.repeat(images[..., None], 3, axis=3), data.target[index]


def tiny_config(*extra: str):
    return load_config(
        None,
        [
            "model.backbone=resnet10t",
            "model.pretrained=null",
            "data.image_size=32",
            "data.batch_size=8",
            "data.num_workers=0",
            "device=cpu",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            *extra,
        ],
    )


class BlowsUpAt(torch.nn.Module):
    """The configured loss, times infinity from call ``at + 1`` on: divergence on cue."""

    def __init__(self, loss: torch.nn.Module, at: int):
        super().__init__()
        self.loss, self.at, self.calls = loss, at, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.loss(logits, targets)
        return loss * math.inf if self.calls > self.at else loss


def make_trainer(config, fold_dir, num_classes=CLASSES, blow_up_at=None, on_epoch_end=None):
    torch.manual_seed(config.seed)
    model = get_plugin_manager().hook.competition_create_model(
        config=config, num_classes=num_classes
    )
    loss = resolve("losses", config.loss.name, "loss.name")(
        num_classes, [1] * num_classes, **config.loss.params
    )
    if blow_up_at is not None:
        loss = BlowsUpAt(loss, blow_up_at)
    return FoldTrainer(
        0,
        model,
        loss,
        [],
        config,
        ACCURACY,
        fold_dir,
        torch.device("cpu"),
        num_classes,
        on_epoch_end=on_epoch_end,
        log=lambda message: None,
    )


def fit(trainer: FoldTrainer, train_per_class: int = 8):
    """Train on ``train_per_class`` images per class, validate on 4 others per class."""
    batch = trainer.config.data.batch_size
    train = ImageDataset(*digits(train_per_class), None)
    images, targets = digits(4, offset=train_per_class)
    val = ImageDataset(images, targets, None)
    return trainer.fit(
        make_loader(train, batch, True, 0, seed=1), make_loader(val, 16, False, 0, 0), targets
    )


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def trained_fold(tmp_path_factory):
    """A fold trained for one good epoch: fold_0/ with last.pt, best.pt and log.csv."""
    fold_dir = tmp_path_factory.mktemp("good") / "fold_0"
    fit(make_trainer(tiny_config(), fold_dir))
    return fold_dir


def copy_fold(trained_fold, tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    shutil.copytree(trained_fold, fold_dir)
    return fold_dir


# -- divergence -----------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_the_fold_before_anything_is_saved(tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    trainer = make_trainer(tiny_config("optim.lr=1000000"), fold_dir)
    with pytest.raises(DivergenceError) as caught:
        fit(trainer)
    message = str(caught.value)
    assert isinstance(caught.value, CompetitionError)  # the CLI prints it and exits 2
    assert re.search(
        r"fold 0 diverged: the training loss became (nan|inf) at epoch 1, step \d+", message
    )
    assert "last good checkpoint: none yet" in message
    assert "optim.lr (now 1e+06)" in message and "optim.grad_clip" in message
    assert not fold_dir.exists() or not any(fold_dir.iterdir())  # no last.pt, best.pt, log.csv


def test_divergence_in_epoch_2_keeps_epoch_1_as_the_last_good_checkpoint(tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    # 32 images / batch 8 = 4 steps per epoch: call 6 is epoch 2, step 1 (not a log step)
    trainer = make_trainer(tiny_config("optim.epochs=2"), fold_dir, blow_up_at=5)
    with pytest.raises(DivergenceError) as caught:
        fit(trainer)
    message = str(caught.value)
    assert "the training loss became inf at epoch 2, step 1 " in message
    assert f"last good checkpoint: {fold_dir / 'last.pt'} after epoch 1." in message
    assert "fold_0/last.pt" in message
    assert trainer.loss_fn.calls == 8  # the epoch ran to its end, then validation was skipped

    last = load_torch(fold_dir / "last.pt")
    assert last["epoch"] == 0 and len(last["history"]) == 1 and all_finite(last["model"])
    best = load_torch(fold_dir / "best.pt")
    assert best["epoch"] == 0 and all_finite(best["model"])
    assert len((fold_dir / "log.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


def test_divergence_is_caught_at_the_next_log_interval_not_at_epoch_end(tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    # 48 images / batch 2 = 24 steps; the loss goes inf at step 3, the check runs at step 20
    trainer = make_trainer(tiny_config("data.batch_size=2"), fold_dir, blow_up_at=3)
    with pytest.raises(DivergenceError, match=r"at epoch 1, step 3 \("):
        fit(trainer, train_per_class=12)
    assert trainer.loss_fn.calls == 21
    assert not (fold_dir / "last.pt").exists() and not (fold_dir / "best.pt").exists()


def test_non_finite_validation_probabilities_stop_the_fold(tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    trainer = make_trainer(tiny_config(), fold_dir)
    # nan running statistics: training (batch statistics) stays finite, evaluation does not
    norm = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    norm.running_mean.fill_(math.nan)
    with pytest.raises(DivergenceError) as caught:
        fit(trainer)
    message = str(caught.value)
    assert "validation produced non-finite probabilities at epoch 1 (16 of 16 images" in message
    assert "fold 0" in message and "none yet" in message
    assert not (fold_dir / "last.pt").exists() and not (fold_dir / "best.pt").exists()


# -- damaged checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_last_pt_names_the_file_and_the_fix(trained_fold, tmp_path, damage):
    fold_dir = copy_fold(trained_fold, tmp_path)
    path = fold_dir / "last.pt"
    content = {
        "truncated": path.read_bytes()[:100],
        "garbage": np.random.default_rng(0).bytes(4000),
        "empty": b"",
    }[damage]
    path.write_bytes(content)
    with pytest.raises(DamagedFileError) as caught:
        fit(make_trainer(tiny_config(), fold_dir))
    message = str(caught.value)
    assert message.startswith("fold_0/last.pt is damaged (")
    assert message.endswith(f"delete it to retrain fold 0 from scratch: rm {path}")
    assert "\n" not in message


def test_a_damaged_best_pt_names_the_file_and_the_fix(trained_fold, tmp_path):
    fold_dir = copy_fold(trained_fold, tmp_path)
    path = fold_dir / "best.pt"
    path.write_bytes(path.read_bytes()[:100])
    trainer = make_trainer(tiny_config(), fold_dir)
    fit(trainer)  # last.pt says the fold is done: nothing to train
    with pytest.raises(DamagedFileError) as caught:
        trainer.load_best()
    message = str(caught.value)
    assert message.startswith("fold_0/best.pt is damaged (")
    assert message.endswith(f"retrain fold 0 from scratch: rm -r {fold_dir}")


def test_a_last_pt_of_another_model_is_a_clear_error(trained_fold, tmp_path):
    fold_dir = copy_fold(trained_fold, tmp_path)
    trainer = make_trainer(tiny_config(), fold_dir, num_classes=CLASSES + 1)  # a changed class list
    with pytest.raises(DamagedFileError) as caught:
        fit(trainer)
    message = str(caught.value)
    assert message.startswith("fold_0/last.pt does not fit this model (RuntimeError: ")
    assert "size mismatch" in message and f"rm {fold_dir / 'last.pt'}" in message


def test_a_deleted_damaged_last_pt_retrains_the_fold(trained_fold, tmp_path):
    fold_dir = copy_fold(trained_fold, tmp_path)
    (fold_dir / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedFileError):
        fit(make_trainer(tiny_config(), fold_dir))
    os.remove(fold_dir / "last.pt")  # the fix the message gives
    result = fit(make_trainer(tiny_config(), fold_dir))
    assert [row["epoch"] for row in result.history] == [1]
    assert load_torch(fold_dir / "last.pt")["epoch"] == 0


# -- a good run is unchanged ----------------------------------------------------------------------


class Stop(Exception):
    """Interrupts training after an epoch, as a kill would."""


def test_a_good_run_trains_and_resumes_as_before(tmp_path):
    config = tiny_config("optim.epochs=2")
    reference = fit(make_trainer(config, tmp_path / "a" / "fold_0"))
    assert all(math.isfinite(row["train_loss"]) for row in reference.history)

    def stop_after_first(epoch, row):
        if epoch == 0:
            raise Stop

    fold_dir = tmp_path / "b" / "fold_0"
    with pytest.raises(Stop):
        fit(make_trainer(config, fold_dir, on_epoch_end=stop_after_first))
    epochs = []
    resumed = fit(make_trainer(config, fold_dir, on_epoch_end=lambda e, row: epochs.append(e)))
    assert epochs == [1]  # only the second epoch was trained again
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [r[key] for r in resumed.history] == pytest.approx(
            [r[key] for r in reference.history]
        )
    assert resumed.best_score == pytest.approx(reference.best_score)
