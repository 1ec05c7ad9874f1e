"""Blends of finished runs, with weights fitted on their out-of-fold (OOF) predictions.

The blend is a weighted mean of class probabilities; the weights live on the simplex and minimise
the OOF log loss (Caruana et al. 2004 select models greedily; a convex fit of stacked probabilities
is the smooth version of the same idea). Fitting weights on the OOF rows they are then scored on
is optimistic, so the blend's CV is nested: for each fold, weights are fitted on the other folds'
OOF rows and scored on this fold. The test set gets the weights fitted on all OOF rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from competition.config import Config
from competition.cv import RUNS_DIR, SUBMISSIONS_DIR, load_run_config
from competition.data import read_competition
from competition.errors import ConfigError
from competition.io import write_csv, write_json
from competition.metrics import cv_scores, get_metric
from competition.report import write_report
from competition.submission import write_submission


@dataclass
class FinishedRun:
    """A run's OOF table and fold-mean test / holdout probabilities."""

    path: Path
    config: Config
    classes: list[str]
    oof: pd.DataFrame  # sorted by id
    test: np.ndarray | None
    holdout: np.ndarray | None


def load_finished_run(run_dir: str | Path) -> FinishedRun:
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    oof_path = run_dir / "oof.csv"
    if not oof_path.is_file():
        raise ConfigError(f"{run_dir}: no oof.csv; finish the run first (competition train ...)")
    oof = (
        pd.read_csv(oof_path, dtype={"id": str}, keep_default_na=False)
        .sort_values("id")
        .reset_index(drop=True)
    )
    classes = [c for c in oof.columns if c not in ("id", "fold", "target")]
    folds = sorted(set(oof["fold"]))

    def fold_mean(split: str) -> np.ndarray | None:
        files = [run_dir / f"fold_{k}" / f"{split}_probs.npy" for k in folds]
        return (
            np.mean([np.load(f) for f in files], axis=0)
            if all(f.is_file() for f in files)
            else None
        )

    return FinishedRun(run_dir, config, classes, oof, fold_mean("test"), fold_mean("holdout"))


def _check_compatible(runs: list[FinishedRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.classes != first.classes:
            raise ConfigError(f"{run.path}: classes differ from {first.path}; cannot blend")
        if not run.oof["id"].equals(first.oof["id"]):
            raise ConfigError(
                f"{run.path}: its OOF ids differ from {first.path}'s; blend runs that finished "
                "the same folds of the same competition"
            )
        if not run.oof["fold"].equals(first.oof["fold"]):
            raise ConfigError(
                f"{run.path}: its folds differ from {first.path}'s (folds.k / folds.seed); OOF "
                "weights are only honest on shared folds"
            )


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


def blend(
    run_dirs: list[str | Path],
    name: str,
    runs_dir: Path = RUNS_DIR,
    submissions_dir: Path = SUBMISSIONS_DIR,
) -> dict:
    """Blend finished runs into ``runs/<name>/`` (oof.csv, cv.json, report.md) + a submission."""
    if len(run_dirs) < 2:
        raise ConfigError("ensemble: give at least two run folders to blend")
    runs = [load_finished_run(d) for d in run_dirs]
    _check_compatible(runs)
    first = runs[0]
    metric = get_metric(first.config.metric)
    targets = first.oof["target"].to_numpy()
    folds = first.oof["fold"].to_numpy()
    stacked = np.stack([r.oof[first.classes].to_numpy() for r in runs])  # (M, N, K)

    blended = np.zeros_like(stacked[0])
    for k in sorted(set(folds)):  # nested: weights never see the rows they are scored on
        inside = folds == k
        weights = fit_weights(stacked[:, ~inside], targets[~inside])
        blended[inside] = np.tensordot(weights, stacked[:, inside], axes=1)
    weights = fit_weights(stacked, targets)

    out = Path(runs_dir) / name
    if (out / "config.yaml").is_file() or out.resolve() in {r.path.resolve() for r in runs}:
        raise ConfigError(f"ensemble --name {name}: {out} is a training run; choose another name")
    oof = first.oof[["id", "fold", "target"]].copy()
    oof[first.classes] = blended
    write_csv(out / "oof.csv", oof)
    cv = {
        **cv_scores(metric, targets, blended, folds),
        "k": first.config.folds.k,
        "runs": [str(r.path) for r in runs],
        "weights": [float(w) for w in weights],
        "members": {str(r.path): metric(targets, r.oof[first.classes].to_numpy()) for r in runs},
    }
    competition = None
    if first.holdout is not None and all(r.holdout is not None for r in runs):
        competition = read_competition(first.config)
        holdout = np.tensordot(weights, np.stack([r.holdout for r in runs]), axes=1)
        cv["lb"] = metric(competition.holdout["target"].to_numpy(), holdout)
    if first.test is not None and all(r.test is not None for r in runs):
        competition = competition or read_competition(first.config)
        test = np.tensordot(weights, np.stack([r.test for r in runs]), axes=1)
        path = Path(submissions_dir) / f"{name}.csv"
        write_submission(path, competition, first.config, test)
        cv["submission"] = str(path)
    write_json(out / "cv.json", cv)
    write_report(out, cv, oof, first.classes)
    return cv
