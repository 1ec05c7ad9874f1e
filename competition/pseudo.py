"""Pseudo-labels: a finished run's fold ensemble labels its confident test images, and a new run
trains every fold on its own train rows plus those images.

Pseudo-labelling: Lee 2013, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning
Method for Deep Neural Networks" (hard labels, the arg-max of a confident prediction); soft
labels are the teacher's class probabilities as in Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network", and Xie et al. 2020, "Self-training with Noisy Student".

No leakage into the CV score: the labels come from the fold-mean of the source run's test
predictions (its fold ensemble) only; train images never receive a pseudo-label, so every fold's
OOF rows are real validation images scored against their real labels. What remains: the source
models of the other folds saw fold k's validation images, so a test image nearly identical to one
of them carries that knowledge into fold k (run ``competition check`` for train-test duplicates).
The new run is a training producer of the run record (:class:`PseudoTrainFold`, a
:class:`~competition.cv.TrainFold` whose train loader adds the pseudo-labelled rows); its
``config.yaml`` names the source run, the threshold, hard or soft labels and how many images each
class took.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from competition.config import plain_name, replace
from competition.cv import TrainFold
from competition.errors import ConfigError, DataError
from competition.runs import (
    FoldPredictions,
    FoldTask,
    OutputDirs,
    RunRecord,
    cv_gain,
    produce_run,
    run_reference,
)
from competition.workspace import ExtraRows, Workspace


@dataclass(frozen=True)
class PseudoLabels:
    """The images of ``split`` taken, and their targets."""

    split: str
    index: np.ndarray  # rows of the split whose fold-ensemble confidence reached the threshold
    targets: np.ndarray  # class indices (M,) for hard labels, probabilities (M, K) for soft
    labels: np.ndarray  # arg-max class of each taken row (M,)
    total: int  # rows in the split

    def per_class(self, classes: list[str]) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(classes))
        return {name: int(n) for name, n in zip(classes, counts, strict=True)}


def fold_ensemble(source: RunRecord, split: str = "test") -> np.ndarray:
    """The mean of the source's finished folds' ``<split>_probs.npy``: its fold ensemble."""
    folds = source.done_folds()
    if not folds:
        raise ConfigError(f"{source.path}: no finished fold; finish the run before pseudo-labels")
    probs = [source.fold_probs(k, split) for k in folds]
    missing = [k for k, p in zip(folds, probs, strict=True) if p is None]
    if missing:
        raise DataError(
            f"{source.path}: fold(s) {missing} have no {split}_probs.npy, so the run has no "
            f"{split} predictions to pseudo-label from. Its config must name a {split} set "
            "(competition.test_images / test_dir); predict one with `competition predict`."
        )
    return np.mean(probs, axis=0)


def make_pseudo_labels(
    probs: np.ndarray, threshold: float, soft: bool, split: str = "test"
) -> PseudoLabels:
    """Rows of ``probs`` (N, K) whose top probability is at least ``threshold``, labelled."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold}: must be in (0, 1], e.g. --threshold 0.9")
    confidence = probs.max(1)
    index = np.flatnonzero(confidence >= threshold)
    if not len(index):
        median = np.quantile(confidence, 0.5)
        raise ConfigError(
            f"--threshold {threshold}: no {split} image reaches it (the most confident is "
            f"{confidence.max():.3f}); lower it, e.g. --threshold {median:.2f}"
        )
    labels = probs[index].argmax(1)
    targets = probs[index] / probs[index].sum(1, keepdims=True) if soft else labels
    return PseudoLabels(split, index, targets, labels, len(probs))


class PseudoTrainFold(TrainFold):
    """Producer: train fold ``k`` on its train rows plus the pseudo-labelled images."""

    def __init__(self, workspace: Workspace, pseudo: PseudoLabels):
        super().__init__(workspace)
        self.pseudo = pseudo

    def train_loader(self, task: FoldTask):
        seed = self.workspace.config.seed + task.fold
        extra = ExtraRows(self.pseudo.split, self.pseudo.index, self.pseudo.targets)
        return self.workspace.loader("train", task.train_index, True, seed, extra)

    def class_counts(self, task: FoldTask) -> list[int]:
        extra = np.bincount(self.pseudo.labels, minlength=len(self.workspace.classes))
        return (np.asarray(super().class_counts(task)) + extra).tolist()

    def __call__(self, task: FoldTask) -> FoldPredictions:
        predictions = super().__call__(task)
        predictions.result.info["pseudo_labelled"] = len(self.pseudo.index)
        return predictions


def pseudo_name(source: str, threshold: float, soft: bool) -> str:
    """``<source>-pseudo-<hard|soft>-t<threshold>``, e.g. ``exp1-pseudo-soft-t0.9``."""
    return f"{source}-pseudo-{'soft' if soft else 'hard'}-t{threshold:g}"


def pseudo_run(
    run_dir: str | Path,
    threshold: float,
    soft: bool = False,
    name: str | None = None,
    overrides: dict | None = None,
    folds: list[int] | None = None,
    log=print,
    **paths,
) -> dict:
    """A new run trained with ``run_dir``'s confident test predictions as extra labels.

    Returns the new run's ``cv`` dict with ``pseudo`` (taken per class) and ``gain`` (CV over the
    source on common folds). ``overrides`` change the recipe (``{"optim.epochs": 5}``);
    ``paths`` are :class:`~competition.runs.OutputDirs` fields.
    """
    source = RunRecord.open(run_dir)
    overrides = dict(overrides or {})
    name = plain_name(
        name or overrides.pop("name", None) or pseudo_name(source.name, threshold, soft), "--name"
    )
    dirs = OutputDirs(**{"runs_dir": Path(run_dir).parent, **paths})
    if (Path(dirs.runs_dir) / name).resolve() == source.path.resolve():
        raise ConfigError(f"pseudo --name {name}: that is the source run; choose another name")
    probs = fold_ensemble(source, "test")
    pseudo = make_pseudo_labels(probs, threshold, soft)
    workspace = Workspace(replace(source.config, {**overrides, "name": name}), dirs.folds_dir, log)
    test = workspace.competition.test
    if test is None or len(test) != pseudo.total:
        rows = "none" if test is None else len(test)
        raise ConfigError(
            f"{source.path}: its test predictions have {pseudo.total} rows but this config's test "
            f"set has {rows}; pseudo-labels need the test set the source run predicted"
        )
    if source.classes() != workspace.classes:
        raise ConfigError(f"{source.path}: its classes differ from this config's; cannot label")
    per_class = pseudo.per_class(workspace.classes)
    produced_by = {
        "verb": "pseudo",
        "source": run_reference(source.path),
        "split": pseudo.split,
        "labels": "soft" if soft else "hard",
        "threshold": float(threshold),
        "source_folds": source.done_folds(),
        "taken": len(pseudo.index),
        "of": pseudo.total,
        "per_class": per_class,
    }
    log(
        f"pseudo-labels: {len(pseudo.index)} of {pseudo.total} {pseudo.split} images reach "
        f"{threshold:g} in the fold ensemble of {source.name} ({produced_by['labels']} labels)"
    )
    cv = produce_run(workspace, produced_by, PseudoTrainFold(workspace, pseudo), folds, dirs)
    result = {**cv, "pseudo": produced_by}
    if (source.path / "cv.json").is_file():
        result["gain"] = cv_gain(source.cv(), cv)
    return result


__all__ = [
    "PseudoLabels",
    "PseudoTrainFold",
    "fold_ensemble",
    "make_pseudo_labels",
    "pseudo_name",
    "pseudo_run",
]
