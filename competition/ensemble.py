"""Blends of finished runs, chosen and scored on their out-of-fold (OOF) predictions.

Methods (``competition ensemble RUN... --method``):

* ``mean``: the arithmetic mean of the members' class probabilities.
* ``geometric``: the normalised geometric mean (the mean of log-probabilities, softmaxed).
* ``rank``: each class column replaced by its rank among the rows blended (scaled to (0, 1]),
  ranks averaged and rows normalised: only the order within a column counts, so members whose
  probabilities live on different scales weigh alike (the Kaggle rank average).
* ``hill``: forward selection with replacement (Caruana et al. 2004, "Ensemble Selection from
  Libraries of Models"): start from the best member, add the member (repeats allowed) that most
  improves the competition's metric of the averaged probabilities, ties broken by log loss; the
  weights are the selection counts of the best round.
* ``optimize``: simplex weights minimising the OOF log loss (a smooth surrogate of the metric,
  fitted with scipy). Accepted only where its nested score is no worse than ``hill``'s; otherwise
  the blend uses ``hill`` and says so.
* ``auto`` (default): every method is scored and the one with the best nested score is kept
  (ties broken by nested log loss).

Fitting weights on the rows they are scored on is optimistic, so every method is scored *nested*:
for each fold, weights (and temperatures, with ``calibrate``) are fitted on the other folds' OOF
rows and the fold is predicted with them; the in-sample score (weights fitted on all rows) is
reported beside it. The blend's OOF rows are the nested ones, so its ``cv.json`` is the nested
score; the test set gets the weights fitted on all OOF rows. A blend whose nested score is below
its best member's CV is reported with a loud warning.

``calibrate`` temperature-scales each member first (:mod:`competition.calibration`), for runs whose
probabilities live on different scales (a k-NN vote next to a logistic regression); it is on by
default for the ``log_loss`` metric.

A blend is a run like any other (a fold producer of :mod:`competition.runs`): its ``config.yaml``
names its members, the method, the weights and every method's scores, and it can itself be
blended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata

from competition.calibration import apply_temperature, fit_temperature
from competition.config import plain_name, replace
from competition.errors import ConfigError
from competition.manager import did_you_mean
from competition.metrics import Metric, cv_scores, log_loss
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

METHODS = ("mean", "rank", "geometric", "hill", "optimize")
HILL_ROUNDS = 50  # selections of Caruana's hill climbing (the best round is kept)


# -- combining and fitting ------------------------------------------------------------------------


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / x.sum(axis=-1, keepdims=True)


def combine(method: str, weights: np.ndarray, stack: np.ndarray) -> np.ndarray:
    """Blend stacked probabilities (M, N, K) into (N, K) with ``weights`` (M,)."""
    weights = np.asarray(weights, dtype=np.float64)
    if method == "geometric":
        logits = np.tensordot(weights, np.log(np.clip(stack, 1e-15, 1.0)), axes=1)
        logits -= logits.max(axis=1, keepdims=True)
        return _normalised(np.exp(logits))
    if method == "rank":
        n = stack.shape[1]
        ranks = rankdata(stack, axis=1) / max(n, 1)  # (M, N, K): each column ranked over rows
        return _normalised(np.tensordot(weights, ranks, axes=1))
    return np.tensordot(weights, stack, axes=1)


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


def _worse(metric: Metric, a: float, b: float, tolerance: float = 1e-9) -> bool:
    """Whether score ``a`` is worse than ``b`` by more than float noise (a mean of folds)."""
    return (b - a if metric.higher_is_better else a - b) > tolerance


def _key(metric: Metric, score: float, loss: float) -> tuple[float, float]:
    """Sort key, larger is better: the metric first, then log loss (lower is better)."""
    return (score if metric.higher_is_better else -score, -loss)


def hill_climb(
    stack: np.ndarray, targets: np.ndarray, metric: Metric, rounds: int = HILL_ROUNDS
) -> np.ndarray:
    """Caruana's forward selection with replacement on ``metric``; ties broken by log loss.

    Starts from the best member; each round adds the member whose addition gives the best
    (metric, log loss) of the running mean; the weights are the selection counts of the best
    round, normalised.
    """
    m = stack.shape[0]
    counts = np.zeros(m)
    total = np.zeros(stack.shape[1:])
    best_key, best_counts = None, None
    for step in range(rounds):
        round_key, pick = None, 0
        for j in range(m):
            probs = (total + stack[j]) / (step + 1)
            key = _key(metric, metric(targets, probs), log_loss(targets, probs))
            if round_key is None or key > round_key:
                round_key, pick = key, j
        counts[pick] += 1
        total += stack[pick]
        if best_key is None or round_key > best_key:
            best_key, best_counts = round_key, counts.copy()
    return best_counts / best_counts.sum()


def fit_method(method: str, stack: np.ndarray, targets: np.ndarray, metric: Metric) -> np.ndarray:
    """The weights (M,) ``method`` fits on these rows (equal weights for mean, rank, geometric)."""
    if method == "hill":
        return hill_climb(stack, targets, metric)
    if method == "optimize":
        return fit_weights(stack, targets)
    return np.full(stack.shape[0], 1.0 / stack.shape[0])


def calibrated(stack: np.ndarray, temperatures: list[float] | None) -> np.ndarray:
    """Each member's probabilities scaled by its temperature (unchanged when ``None``)."""
    if temperatures is None:
        return stack
    return np.stack([apply_temperature(p, t) for p, t in zip(stack, temperatures, strict=True)])


def _check_method(method: str) -> None:
    if method != "auto" and method not in METHODS:
        raise ConfigError(
            f"ensemble --method {method!r}: unknown.{did_you_mean(method, (*METHODS, 'auto'))} "
            f"Choose auto or one of {', '.join(METHODS)}."
        )


# -- scoring every method on nested OOF ----------------------------------------------------------


@dataclass
class Candidate:
    """One method's weights and scores on the blend's OOF rows."""

    method: str
    weights: np.ndarray  # fitted on all OOF rows: the test set's weights
    nested_probs: np.ndarray  # (N, K): each fold predicted with weights fitted without it
    nested: float  # cv mean of the nested rows
    in_sample: float  # cv mean with the weights of all rows, scored on those rows
    nested_log_loss: float
    fold_weights: dict = field(default_factory=dict)  # fold -> weights fitted without it


class Blender:
    """Every method fitted and scored on the members' common OOF rows.

    ``stack`` (M, N, K), ``targets`` (N,), ``folds`` (N,). With ``calibrate``, each member is
    temperature-scaled with temperatures fitted on the same rows as the weights.
    """

    def __init__(self, stack, targets, folds, metric: Metric, calibrate: bool = False):
        self.stack, self.targets, self.folds = stack, targets, np.asarray(folds)
        self.metric, self.calibrate = metric, calibrate
        self.fold_ids = sorted(set(self.folds.tolist()))
        self.nested = len(self.fold_ids) > 1
        everything = np.ones(len(targets), dtype=bool)
        self.temperatures = self._temperatures(everything)
        self.fold_temperatures = {
            k: self._temperatures(self.folds != k) if self.nested else self.temperatures
            for k in self.fold_ids
        }

    def _temperatures(self, rows: np.ndarray) -> list[float] | None:
        if not self.calibrate:
            return None
        return [fit_temperature(p[rows], self.targets[rows]) for p in self.stack]

    def _cv(self, probs: np.ndarray) -> float:
        return cv_scores(self.metric, self.targets, probs, self.folds)["mean"]

    def member_scores(self) -> list[float]:
        """Each member's own CV (mean of its fold scores) on these rows, uncalibrated."""
        return [self._cv(p) for p in self.stack]

    def candidate(self, method: str) -> Candidate:
        full_stack = calibrated(self.stack, self.temperatures)
        weights = fit_method(method, full_stack, self.targets, self.metric)
        in_sample = np.empty(self.stack.shape[1:])
        nested = np.empty(self.stack.shape[1:])
        fold_weights = {}
        for k in self.fold_ids:
            inside = self.folds == k
            in_sample[inside] = combine(method, weights, full_stack[:, inside])
            if not self.nested:
                nested[inside], fold_weights[k] = in_sample[inside], weights
                continue
            stack = calibrated(self.stack, self.fold_temperatures[k])
            fold_weights[k] = fit_method(
                method, stack[:, ~inside], self.targets[~inside], self.metric
            )
            nested[inside] = combine(method, fold_weights[k], stack[:, inside])
        return Candidate(
            method,
            weights,
            nested,
            self._cv(nested),
            self._cv(in_sample),
            log_loss(self.targets, nested),
            fold_weights,
        )

    def choose(self, requested: str, log) -> tuple[Candidate, dict[str, Candidate]]:
        """The candidate of every method needed, and the one kept for ``requested``."""
        _check_method(requested)
        wanted = {"auto": list(METHODS), "optimize": ["hill", "optimize"]}.get(
            requested, [requested]
        )
        candidates = {m: self.candidate(m) for m in wanted}
        optimize_ok = "optimize" not in candidates or not _worse(
            self.metric, candidates["optimize"].nested, candidates["hill"].nested
        )
        if requested == "optimize":
            if optimize_ok:
                return candidates["optimize"], candidates
            log(
                f"ensemble: optimize's nested {self.metric.name} "
                f"{candidates['optimize'].nested:.4f} is worse than hill's "
                f"{candidates['hill'].nested:.4f}: the blend uses hill"
            )
            return candidates["hill"], candidates
        if requested != "auto":
            return candidates[requested], candidates
        eligible = [c for c in candidates.values() if c.method != "optimize" or optimize_ok]
        return max(
            eligible, key=lambda c: _key(self.metric, c.nested, c.nested_log_loss)
        ), candidates


# -- the blend run --------------------------------------------------------------------------------


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


def _stacked(runs: list[RunRecord], classes: list[str], common: list[int]):
    """Members' OOF probabilities on their common rows: (M, N, K), targets, folds, row of id."""
    oofs = [run.oof() for run in runs]
    oofs = [oof[oof["fold"].isin(common)].set_index("id") for oof in oofs]
    ids = oofs[0].index
    stack = np.stack([oof.loc[ids, classes].to_numpy() for oof in oofs])
    targets = oofs[0]["target_index"].to_numpy()
    folds = oofs[0]["fold"].to_numpy()
    return stack, targets, folds, {row_id: i for i, row_id in enumerate(ids)}


class BlendFold:
    """Producer: fold ``k`` of the blend: its nested OOF rows; test rows with the full weights."""

    def __init__(self, runs, workspace, blender: Blender, chosen: Candidate, row_of: dict):
        self.runs, self.workspace, self.blender, self.chosen = runs, workspace, blender, chosen
        self.row_of = row_of

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
        oof = self.chosen.nested_probs[rows]
        splits = {}
        for split in self.workspace.split_names():
            probs = [run.fold_probs(task.fold, split) for run in self.runs]
            if all(p is not None for p in probs):
                stack = calibrated(np.stack(probs), self.blender.temperatures)
                splits[split] = combine(self.chosen.method, self.chosen.weights, stack)
        info = {
            "method": self.chosen.method,
            "weights": [float(w) for w in self.chosen.fold_weights[task.fold]],
        }
        if self.blender.calibrate:
            info["temperatures"] = self.blender.fold_temperatures[task.fold]
        result = FoldResult(task.fold, seconds=time.perf_counter() - started, info=info)
        return FoldPredictions(oof, splits, result)


def _loud(lines: list[str]) -> str:
    bar = "!" * 78
    return "\n".join([bar, *(f"!! {line}" for line in lines), bar])


def blend(
    run_dirs: list[str | Path],
    name: str,
    log=print,
    method: str = "auto",
    calibrate: bool | None = None,
    **paths,
) -> dict:
    """Blend finished runs into the run ``runs/<name>/`` and its submission; its ``cv`` dict.

    ``method`` is ``auto`` (the best nested score) or one of :data:`METHODS`; ``calibrate``
    temperature-scales each member first (``None``: only for the ``log_loss`` metric, where the
    scale of the probabilities is the score). ``paths`` are :class:`~competition.runs.OutputDirs`
    fields. Besides the run's scores, the dict has ``runs``, ``weights``, ``members`` (each
    member's CV on the common rows), ``method``, ``methods`` (nested and in-sample score of each
    method tried), ``nested``, ``rows`` and, when the blend is below its best member, ``warning``.
    """
    name = plain_name(name, "ensemble --name")
    _check_method(method)
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
    stack, targets, folds, row_of = _stacked(runs, workspace.classes, common)
    if calibrate is None:
        calibrate = workspace.metric.name == "log_loss"
    blender = Blender(stack, targets, folds, workspace.metric, calibrate)
    if not blender.nested:
        log(
            "ensemble: one common fold, so the weights are fitted on the rows they are "
            "scored on: the blend's CV is in-sample (optimistic)"
        )
    chosen, candidates = blender.choose(method, log)
    scores = {
        m: {"nested": c.nested, "in_sample": c.in_sample, "nested_log_loss": c.nested_log_loss}
        for m, c in candidates.items()
    }
    members = blender.member_scores()
    produced_by = {
        "verb": "ensemble",
        "method": chosen.method,
        "requested": method,
        "calibrate": calibrate,
        "members": [
            {"run": run_reference(r.path), "weight": float(w)}
            | ({"temperature": t} if calibrate else {})
            for r, w, t in zip(
                runs, chosen.weights, blender.temperatures or [None] * len(runs), strict=True
            )
        ],
        "scores": scores,
        "cv": "nested over folds" if blender.nested else "in-sample (one common fold)",
    }
    cv = produce_run(
        workspace, produced_by, BlendFold(runs, workspace, blender, chosen, row_of), common, dirs
    )
    metric = workspace.metric
    best = max(range(len(runs)), key=lambda m: _key(metric, members[m], 0.0))
    result = {
        **cv,
        "runs": [str(r.path) for r in runs],
        "weights": [float(w) for w in chosen.weights],
        "members": {str(r.path): s for r, s in zip(runs, members, strict=True)},
        "method": chosen.method,
        "requested": method,
        "methods": scores,
        "calibrate": calibrate,
        "nested": blender.nested,
        "rows": len(folds),
    }
    if _worse(metric, chosen.nested, members[best]):
        result["warning"] = (
            f"the blend's nested CV {metric.name} {chosen.nested:.4f} is below its best member's "
            f"{members[best]:.4f} ({runs[best].path}): submit that run instead, or blend other runs"
        )
        log(_loud(["WARNING: BLEND BELOW ITS BEST MEMBER", result["warning"]]))
    return result


__all__ = ["METHODS", "Blender", "blend", "combine", "fit_weights", "hill_climb"]
