"""Post-hoc logit adjustment of a finished run, as a new run (Menon et al. 2021, "Long-tail
Learning via Logit Adjustment", ICLR).

Each probability row becomes ``softmax(log p - tau * log prior)``, where ``prior`` is the class
frequency of the fold's training rows (the prior the fold's model learned). ``tau = 1`` is the
paper's Bayes-optimal choice for the balanced error; ``--tau auto`` picks ``tau`` from a grid
(:data:`TAUS`) by the run's metric, *nested*: fold ``k``'s ``tau`` maximises the metric on the OOF
rows of the other folds (each adjusted with its own fold's prior) and never sees fold ``k``'s rows.
With a single finished fold that is impossible, and the choice is in-sample (the run says so).
Test and holdout probabilities of fold ``k`` get fold ``k``'s prior and ``tau``.

The adjustment only helps when the metric values the rare classes more than the training mix does
(balanced accuracy, macro F1, a balanced test set); for plain accuracy ``auto`` picks tau near 0.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from competition.config import plain_name, replace
from competition.errors import ConfigError
from competition.runs import (
    FoldPredictions,
    FoldResult,
    FoldTask,
    OutputDirs,
    RunRecord,
    produce_run,
    run_reference,
)
from competition.workspace import Workspace

#: The grid ``--tau auto`` searches (Menon et al. report tau in [0, 2]).
TAUS = tuple(np.round(np.arange(0.0, 2.01, 0.1), 2).tolist())


def adjust_probs(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """``softmax(log p - tau * log prior)`` row-wise; zero probabilities stay zero."""
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(probs, dtype=np.float64)) - tau * np.log(prior)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fold_priors(targets: np.ndarray, fold_of: np.ndarray, folds, num_classes: int) -> dict:
    """Class frequencies of each fold's training rows (every other fold), floored at one row."""
    priors = {}
    for fold in folds:
        counts = np.bincount(targets[fold_of != fold], minlength=num_classes).astype(np.float64)
        counts = np.maximum(counts, 1.0)
        priors[fold] = counts / counts.sum()
    return priors


def choose_tau(metric, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], taus=TAUS):
    """The ``tau`` of ``taus`` whose adjusted ``(targets, probs, prior)`` parts score best
    together (ties: the smallest ``tau``), and every ``tau``'s score."""
    targets = np.concatenate([t for t, _, _ in parts])
    scores = {}
    for tau in taus:
        probs = np.concatenate([adjust_probs(p, prior, tau) for _, p, prior in parts])
        scores[tau] = float(metric(targets, probs))
    best = max(scores.values()) if metric.higher_is_better else min(scores.values())
    return next(tau for tau in taus if scores[tau] == best), scores


class AdjustFold:
    """Producer: fold ``k`` of the source run, adjusted with its own prior and ``tau``."""

    def __init__(self, source: RunRecord, workspace: Workspace, tau, log=print):
        self.source, self.workspace = source, workspace
        classes = workspace.classes
        if source.classes() != list(classes):
            raise ConfigError(f"adjust: {source.path}'s classes differ from its config's")
        self.done = source.done_folds()
        self.priors = fold_priors(workspace.targets, workspace.fold_of, self.done, len(classes))
        self.oof = {}
        for fold in self.done:
            oof = source.fold_oof(fold)
            self.oof[fold] = (oof["target_index"].to_numpy(), oof[classes].to_numpy(), oof["id"])
        self.auto = tau == "auto"
        self.nested = self.auto and len(self.done) > 1
        self.taus: dict[int, float] = {}
        for fold in self.done:
            if not self.auto:
                self.taus[fold] = float(tau)
                continue
            others = [f for f in self.done if f != fold] if self.nested else [fold]
            parts = [(self.oof[f][0], self.oof[f][1], self.priors[f]) for f in others]
            self.taus[fold], _ = choose_tau(workspace.metric, parts)
        if self.auto and not self.nested:
            log(
                "adjust: one finished fold, so tau is chosen on the rows it is scored on: the "
                "adjusted run's CV is in-sample (optimistic)"
            )

    def __call__(self, task: FoldTask) -> FoldPredictions:
        started = time.perf_counter()
        fold, classes = task.fold, self.workspace.classes
        ids = self.workspace.competition.train["id"].to_numpy()[task.valid_index]
        _, probs, source_ids = self.oof[fold]
        row = {row_id: i for i, row_id in enumerate(source_ids)}
        missing = [i for i in ids if i not in row]
        if missing:
            raise ConfigError(
                f"adjust: train ids {missing[:3]} are not in {self.source.path}'s fold {fold}: "
                "the train table changed since it ran"
            )
        probs = probs[[row[i] for i in ids]]
        tau, prior = self.taus[fold], self.priors[fold]
        splits = {}
        for split in self.workspace.split_names():
            split_probs = self.source.fold_probs(fold, split)
            if split_probs is not None:
                splits[split] = adjust_probs(split_probs, prior, tau)
        info = {"tau": tau, "prior": [float(p) for p in prior], "classes": len(classes)}
        result = FoldResult(fold, seconds=time.perf_counter() - started, info=info)
        return FoldPredictions(adjust_probs(probs, prior, tau), splits, result)


def _tau(value) -> str | float:
    if value in (None, "auto"):
        return "auto"
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--tau={value!r}: expected 'auto' or a number such as 1.0") from None
    if not np.isfinite(tau):
        raise ConfigError(f"--tau={value!r}: expected a finite number")
    return tau


def adjust_run(run_dir: str | Path, tau="auto", name: str | None = None, log=print, **paths):
    """A new run: ``run_dir``'s probabilities logit-adjusted by each fold's training prior.

    ``tau``: ``"auto"`` (nested choice on OOF, see the module docstring) or a number. The new run
    is ``runs/<name>`` (default ``<run>-adjust-tau<auto|T>``); the source is not changed. Returns
    the new run's ``cv`` dict plus ``taus`` (per fold) and ``nested``.
    """
    tau = _tau(tau)
    source = RunRecord.open(run_dir)
    if not source.done_folds():
        raise ConfigError(f"adjust {run_dir}: no finished fold yet; finish the run first")
    name = plain_name(name or f"{source.name}-adjust-tau{tau}", "adjust --name")
    dirs = OutputDirs(**{"runs_dir": Path(run_dir).parent, **paths})
    if (Path(dirs.runs_dir) / name).resolve() == source.path.resolve():
        raise ConfigError(f"adjust --name {name}: that is the source run; choose another name")
    workspace = Workspace(replace(source.config, {"name": name}), dirs.folds_dir, log)
    producer = AdjustFold(source, workspace, tau, log)
    how = (
        "nested: each fold's tau maximises the metric on the other folds' OOF rows"
        if producer.nested
        else ("in-sample: tau chosen on the one finished fold" if producer.auto else "fixed")
    )
    produced_by = {
        "verb": "adjust",
        "source": run_reference(source.path),
        "method": "post-hoc logit adjustment (Menon et al. 2021), prior = fold's train frequencies",
        "tau": tau,
        "tau_choice": how,
    }
    cv = produce_run(workspace, produced_by, producer, producer.done, dirs)
    return {**cv, "taus": producer.taus, "nested": producer.nested, "tau_choice": how}


__all__ = ["TAUS", "AdjustFold", "adjust_probs", "adjust_run", "choose_tau", "fold_priors"]
