"""Blends of finished runs, with weights fitted on their out-of-fold (OOF) predictions.

The blend is a weighted mean of class probabilities; the weights live on the simplex and minimise
the OOF log loss (Caruana et al. 2004 select models greedily; a convex fit of stacked probabilities
is the smooth version of the same idea). Fitting weights on the OOF rows they are then scored on
is optimistic, so the blend's CV is nested: for each fold, weights are fitted on the other folds'
OOF rows and scored on this fold. The test set gets the weights fitted on all OOF rows.

A blend is a run like any other (a fold producer of :mod:`competition.runs`): its ``config.yaml``
names its members and weights, and it can itself be blended.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

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


def fit_weights(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Simplex weights (M,) for stacked probabilities (M, N, K) minimising log loss."""
    m = probs.shape[0]
    picked = probs[:, np.arange(len(targets)), targets]  # (M, N): each model's p(true class)

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        w /= w.sum()
        return float(-np.mean(np.log(np.clip(w @ picked, 1e-15, 1.0))))

    result = minimize(loss, np.zeros(m), method="Nelder-Mead" if m <= 2 else "Powell")
    w = np.exp(result.x - result.x.max())
    return w / w.sum()


def _members(run_dirs: list[str | Path], log) -> tuple[list[RunRecord], list[int]]:
    """The member runs and the folds all of them finished; refuses runs that can't be blended."""
    if len(run_dirs) < 2:
        raise ConfigError("ensemble: give at least two run folders to blend")
    seen: dict[Path, str] = {}
    for run_dir in run_dirs:
        resolved = Path(run_dir).resolve()
        if resolved in seen:
            raise ConfigError(
                f"ensemble: {run_dir} is given twice (as {seen[resolved]}); a run blended with "
                "itself only changes the weights' scale. Give each run once."
            )
        seen[resolved] = str(run_dir)
    runs = [RunRecord.open(d) for d in run_dirs]
    first = runs[0]
    split = (first.path / "folds.csv").read_text()
    for run in runs[1:]:
        if run.classes() != first.classes():
            raise ConfigError(f"{run.path}: classes differ from {first.path}'s; cannot blend")
        if (run.path / "folds.csv").read_text() != split:
            raise ConfigError(
                f"{run.path}: its folds differ from {first.path}'s (folds.k / folds.seed / the "
                "train table); OOF weights are only honest on shared folds"
            )
        if run.config.metric != first.config.metric:
            raise ConfigError(
                f"{run.path}: metric={run.config.metric}, {first.path}: "
                f"metric={first.config.metric}; blend runs scored on one metric"
            )
    common = sorted(set.intersection(*(set(r.done_folds()) for r in runs)))
    if not common:
        raise ConfigError("ensemble: the runs have no finished fold in common")
    if any(r.done_folds() != common for r in runs):
        log(
            f"ensemble: blending on the OOF rows of the folds all runs finished: {common} "
            f"(of {first.config.folds.k}); "
            + ", ".join(f"{r.name} has {r.done_folds()}" for r in runs)
        )
    return runs, common


class BlendFold:
    """Producer: fold ``k`` of the blend: nested OOF rows, test rows with the full weights."""

    def __init__(self, runs: list[RunRecord], workspace: Workspace, common: list[int], log):
        self.runs, self.workspace = runs, workspace
        classes = workspace.classes
        oofs = [run.oof() for run in runs]
        oofs = [oof[oof["fold"].isin(common)].set_index("id") for oof in oofs]
        ids = oofs[0].index
        self.stacked = np.stack([oof.loc[ids, classes].to_numpy() for oof in oofs])  # (M, N, K)
        self.targets = oofs[0]["target_index"].to_numpy()
        self.folds = oofs[0]["fold"].to_numpy()
        self.row_of = {row_id: i for i, row_id in enumerate(ids)}
        self.weights = fit_weights(self.stacked, self.targets)
        self.nested = len(common) > 1
        if not self.nested:
            log(
                "ensemble: one common fold, so the weights are fitted on the rows they are "
                "scored on: the blend's CV is in-sample (optimistic)"
            )

    def __call__(self, task: FoldTask) -> FoldPredictions:
        started = time.perf_counter()
        ids = self.workspace.competition.train["id"].to_numpy()[task.valid_index]
        missing = [i for i in ids if i not in self.row_of]
        if missing:
            raise ConfigError(
                f"ensemble: train ids {missing[:3]} are in no member's OOF rows: the train table "
                "changed since the members ran"
            )
        rows = np.array([self.row_of[i] for i in ids])
        inside = self.folds == task.fold
        weights = (
            fit_weights(self.stacked[:, ~inside], self.targets[~inside])
            if self.nested
            else self.weights
        )
        oof = np.tensordot(weights, self.stacked[:, rows], axes=1)
        splits = {}
        for split in self.workspace.split_names():
            probs = [run.fold_probs(task.fold, split) for run in self.runs]
            if all(p is not None for p in probs):
                splits[split] = np.tensordot(self.weights, np.stack(probs), axes=1)
        info = {"weights": [float(w) for w in weights]}
        result = FoldResult(task.fold, seconds=time.perf_counter() - started, info=info)
        return FoldPredictions(oof, splits, result)


def blend(run_dirs: list[str | Path], name: str, log=print, **paths) -> dict:
    """Blend finished runs into the run ``runs/<name>/`` and its submission; its ``cv`` dict.

    ``paths`` are :class:`~competition.runs.OutputDirs` fields.
    """
    name = plain_name(name, "ensemble --name")
    runs, common = _members(run_dirs, log)
    dirs = OutputDirs(**paths)
    out = Path(dirs.runs_dir) / name
    if (out / "config.yaml").is_file():
        verb = RunRecord.open(out).produced_by.get("verb")
        if verb != "ensemble" or out.resolve() in {r.path.resolve() for r in runs}:
            kind = {"train": "training", "predict": "re-predicted", "ensemble": "member blend"}
            raise ConfigError(
                f"ensemble --name {name}: {out} is a {kind.get(verb, verb)} run; a blend never "
                "overwrites a run. Choose a new name."
            )
    workspace = Workspace(replace(runs[0].config, {"name": name}), dirs.folds_dir, log)
    producer = BlendFold(runs, workspace, common, log)
    produced_by = {
        "verb": "ensemble",
        "method": "simplex weights minimising OOF log loss; CV nested over folds",
        "members": [
            {"run": run_reference(r.path), "weight": float(w)}
            for r, w in zip(runs, producer.weights, strict=True)
        ],
    }
    cv = produce_run(workspace, produced_by, producer, common, dirs)
    targets, folds = producer.targets, producer.folds
    scores = {
        str(r.path): workspace.metric(targets, producer.stacked[m]) for m, r in enumerate(runs)
    }
    return {
        **cv,
        "runs": [str(r.path) for r in runs],
        "weights": [float(w) for w in producer.weights],
        "members": scores,
        "nested": producer.nested,
        "rows": len(folds),
    }
