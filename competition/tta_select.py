"""``predict RUN --tta auto``: choose TTA views by greedy forward selection on out-of-fold rows.

Each fold's model predicts its own validation rows once per candidate view (so a view's OOF score
never uses an image its model trained on); selection is then arithmetic on those logits. Starting
from the better of ``identity`` and the source run's views, each round adds the candidate (a view
or a group such as ``five_crop``) that raises the pooled OOF metric most, ties broken by log loss;
it stops when no candidate raises the metric. Greedy forward selection of models on a hillclimb
set is Caruana et al. 2004, "Ensemble Selection from Libraries of Models"; here the library is the
views of one model. The result is never below the starting views on OOF.

Choosing among many views on the rows that score them flatters the chosen set a little, so the
selection is also *nested*: for each fold, views chosen on the other folds' rows score that fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from competition.config import TransformSpec, build
from competition.errors import ConfigError
from competition.metrics import log_loss
from competition.predict import (
    expand_view,
    merge_logits,
    predict_logits,
    same_view,
    unique_views,
)
from competition.runtime import onnx_dir

#: What ``--tta auto`` tries by default: flips, D4, the five and ten crops, larger test sizes.
#: Single rotations and single corner crops are left out: with few OOF rows, a lone asymmetric
#: view wins by chance (measured in bench/RESULTS.md); name them in ``--candidates`` to try them.
DEFAULT_CANDIDATES = (
    "hflip",
    "vflip",
    "d4",
    "five_crop",
    "ten_crop",
    {"name": "scale", "factor": 1.15},
    {"name": "scale", "factor": 1.3},
    "multiscale",
)
#: A candidate must raise the metric by more than this to be kept (float noise is no gain).
TOLERANCE = 1e-9


def parse_specs(items, key: str) -> list[TransformSpec]:
    """TTA entries as the config writes them (``hflip``, ``{name: scale, factor: 1.3}``)."""
    if isinstance(items, str | dict):
        items = [items]
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{key}: expected a non-empty list of TTA views, got {items!r}")
    return build(_Specs, {"specs": list(items)}, key).specs


@dataclass(frozen=True)
class _Specs:
    specs: list[TransformSpec] = field(default_factory=list)


def label(spec: TransformSpec) -> str:
    """``hflip``, ``scale(factor=1.3)``: a candidate's name in logs and ``config.yaml``."""
    if not spec.params:
        return spec.name
    return f"{spec.name}({', '.join(f'{k}={v}' for k, v in spec.params.items())})"


def spec_dict(spec: TransformSpec) -> dict | str:
    """A spec as the config writes it (a plain name when it has no parameters)."""
    return {"name": spec.name, **spec.params} if spec.params else spec.name


@dataclass
class Selection:
    """The chosen views and how every candidate scored, plus each fold's merged OOF rows."""

    chosen: list[TransformSpec]
    summary: dict
    oof: dict[int, np.ndarray]  # fold -> (validation rows, K) probabilities of the chosen views


class _Scorer:
    """Scores a set of views (indices into the candidates' union) on a subset of OOF rows."""

    def __init__(self, logits: np.ndarray, targets: np.ndarray, metric, merge: str):
        self.logits = torch.from_numpy(logits)  # (V, N, K)
        self.targets, self.metric, self.merge = targets, metric, merge

    def probs(self, views: set[int], rows=slice(None)) -> np.ndarray:
        merged = merge_logits(self.logits[sorted(views)][:, rows], self.merge)
        probs = merged.double().numpy()
        return probs / probs.sum(axis=1, keepdims=True)

    def score(self, views: set[int], rows=slice(None)) -> tuple[float, float]:
        probs = self.probs(views, rows)
        targets = self.targets[rows]
        return float(self.metric(targets, probs)), float(log_loss(targets, probs))

    def better(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """``a`` beats ``b``: a higher (or lower) metric, or the same metric and lower log loss."""
        sign = 1.0 if self.metric.higher_is_better else -1.0
        gain = sign * (a[0] - b[0])
        return gain > TOLERANCE or (abs(gain) <= TOLERANCE and a[1] < b[1] - TOLERANCE)

    def improves(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        sign = 1.0 if self.metric.higher_is_better else -1.0
        return sign * (a[0] - b[0]) > TOLERANCE


def greedy(scorer: _Scorer, starts: dict, candidates: dict, rows=slice(None)):
    """Forward selection on ``rows``: (chosen start, added candidate labels, view set, log).

    ``starts`` and ``candidates`` map labels to sets of view indices.
    """
    scored = {name: scorer.score(views, rows) for name, views in starts.items()}
    start = next(iter(starts))
    for name, score in scored.items():
        if scorer.better(score, scored[start]):
            start = name
    chosen, added, current = set(starts[start]), [], scored[start]
    log = {"starts": scored, "start": start, "rounds": []}
    remaining = dict(candidates)
    while remaining:
        trial = {
            name: scorer.score(chosen | views, rows)
            for name, views in remaining.items()
            if not views <= chosen
        }
        if not trial:
            break
        best = None
        for name, score in trial.items():
            if best is None or scorer.better(score, trial[best]):
                best = name
        keep = scorer.improves(trial[best], current)
        log["rounds"].append({"scores": trial, "best": best, "kept": keep})
        if not keep:
            break
        chosen |= remaining.pop(best)
        added.append(best)
        current = trial[best]
    return start, added, chosen, log


def select_tta(
    workspace,
    load_model,
    folds: list[int],
    source_tta: list[TransformSpec],
    candidates: list[TransformSpec] | None = None,
) -> Selection:
    """Choose views for ``workspace``'s run on the OOF rows of ``folds``.

    ``load_model(fold)`` gives fold ``k``'s model on the workspace's device.
    """
    config, ws = workspace.config, workspace
    candidates = candidates or parse_specs(list(DEFAULT_CANDIDATES), "tta candidates")
    identity = TransformSpec("identity")
    groups = {"identity": [identity], "source": list(source_tta)}
    for spec in candidates:
        groups.setdefault(label(spec), [spec])
    views, members = [], {}
    for name, specs in groups.items():
        expanded = []
        for i, spec in enumerate(specs):
            expanded += expand_view(spec, f"{name}[{i}]", ws.pm)
        index = set()
        for view in unique_views(expanded):
            match = next((j for j, v in enumerate(views) if same_view(v, view)), None)
            if match is None:
                views.append(view)
                match = len(views) - 1
            index.add(match)
        members[name] = index
    ws.log(
        f"tta auto: {len(views)} distinct views of {len(candidates)} candidates, predicted once "
        f"on each fold's validation rows ({len(folds)} fold(s))"
    )
    rows_of, chunks = {}, []
    for fold in folds:
        valid_index = np.flatnonzero(ws.fold_of == fold)
        logits = predict_logits(
            load_model(fold),
            ws.loader("train", valid_index),
            ws.device,
            views,
            amp=config.amp,
            channels_last=config.model.channels_last,
            desc=f"fold {fold} TTA candidates",
            runtime=config.inference.runtime,
            cache_dir=onnx_dir(config),
        )
        rows_of[fold] = valid_index
        chunks.append(logits)
    logits = np.concatenate(chunks, axis=1)
    order = np.concatenate([rows_of[f] for f in folds])
    fold_col = np.concatenate([np.full(len(rows_of[f]), f) for f in folds])
    scorer = _Scorer(logits, ws.targets[order], ws.metric, config.tta_merge)
    starts = {"identity": members["identity"], "source": members["source"]}
    pool = {name: members[name] for name in groups if name not in ("identity", "source")}
    start, added, chosen, log = greedy(scorer, starts, pool)
    chosen_specs = list(groups[start]) + [spec for name in added for spec in groups[name]]
    final = scorer.score(chosen)
    summary = {
        "metric": ws.metric.name,
        "higher_is_better": ws.metric.higher_is_better,
        "merge": config.tta_merge,
        "folds": list(folds),
        "tried": [label(s) for s in candidates],
        "source_views": [label(s) for s in source_tta],
        "source_oof": _r(log["starts"]["source"][0]),
        "identity_oof": _r(log["starts"]["identity"][0]),
        "start": start,
        "chosen": [label(s) for s in chosen_specs],
        "oof": _r(final[0]),
        "oof_log_loss": _r(final[1]),
        "candidates": {
            name: {
                "alone": _r(scorer.score(members[name])[0]),
                "added_first": _r(log["rounds"][0]["scores"][name][0])
                if log["rounds"] and name in log["rounds"][0]["scores"]
                else None,
            }
            for name in pool
        },
        "rounds": [
            {
                "best": r["best"],
                "kept": r["kept"],
                "oof": _r(r["scores"][r["best"]][0]),
                "log_loss": _r(r["scores"][r["best"]][1]),
            }
            for r in log["rounds"]
        ],
    }
    summary.update(_nested(scorer, starts, pool, fold_col, folds))
    ws.log(_describe(summary))
    oof = {}
    for fold in folds:
        rows = np.flatnonzero(fold_col == fold)
        oof[fold] = scorer.probs(chosen, rows)
    return Selection(_dedupe(chosen_specs), summary, oof)


def auto_tta(producer, source, candidates, produced_by: dict, dirs):
    """``predict --tta auto``: choose the views, then a producer for the run that records them.

    ``producer`` is the :class:`~competition.cv.PredictFold` of the new run (its config still has
    the source's views); ``produced_by`` gets ``tta_auto`` (every candidate's OOF score, the
    rounds, the nested check). A resumed run reuses the choice its ``config.yaml`` recorded.
    """
    from competition.config import replace
    from competition.cv import PredictFold
    from competition.workspace import Workspace

    ws = producer.workspace
    specs = parse_specs(list(candidates or DEFAULT_CANDIDATES), "--candidates")
    folds = source.done_folds()
    tried = [label(s) for s in specs]
    previous = _previous_choice(Path(dirs.runs_dir) / ws.config.name, ws.config, produced_by, tried)
    if previous is not None:
        chosen, summary, oof = previous[0], previous[1], None
        ws.log(f"tta auto: reusing the choice recorded in {ws.config.name}: {summary['chosen']}")
    else:
        selection = select_tta(ws, producer.load_model, folds, source.config.tta, specs)
        chosen, summary, oof = selection.chosen, selection.summary, selection.oof
    produced_by["tta_auto"] = summary
    config = replace(ws.config, {"tta": [spec_dict(s) for s in chosen]})
    workspace = Workspace(config, dirs.folds_dir, ws.log)
    return PredictFold(workspace, producer.weights, oof)


def _previous_choice(path: Path, config, produced_by: dict, tried: list[str]):
    """The chosen views and summary of an unfinished auto run at ``path`` with these settings."""
    from competition.runs import RunRecord

    if not (path / "config.yaml").is_file():
        return None
    try:
        previous = RunRecord.open(path)
    except ConfigError:
        return None
    summary = previous.produced_by.get("tta_auto")
    rest = {k: v for k, v in previous.produced_by.items() if k != "tta_auto"}
    mine, theirs = config.to_dict(), previous.config.to_dict()
    mine.pop("tta"), theirs.pop("tta")
    if not isinstance(summary, dict) or summary.get("tried") != tried:
        return None
    if rest != produced_by or mine != theirs:
        return None
    return previous.config.tta, summary


def _nested(scorer: _Scorer, starts: dict, pool: dict, fold_col, folds) -> dict:
    """Views chosen without fold k score fold k: an honest estimate of the choice's gain."""
    if len(folds) < 2:
        return {"nested": None}
    scores, picks = [], {}
    for fold in folds:
        inner = np.flatnonzero(fold_col != fold)
        outer = np.flatnonzero(fold_col == fold)
        start, added, chosen, _ = greedy(scorer, starts, pool, inner)
        scores.append(scorer.score(chosen, outer)[0])
        picks[int(fold)] = [start, *added]
    source = [scorer.score(starts["source"], np.flatnonzero(fold_col == f))[0] for f in folds]
    return {
        "nested": {
            "mean": _r(float(np.mean(scores))),
            "folds": [_r(s) for s in scores],
            "source_mean": _r(float(np.mean(source))),
            "chosen": picks,
        }
    }


def _dedupe(specs: list[TransformSpec]) -> list[TransformSpec]:
    out = []
    for spec in specs:
        if spec not in out:
            out.append(spec)
    return out


def _r(value: float) -> float:
    return round(float(value), 6)


def _describe(summary: dict) -> str:
    lines = [
        f"tta auto ({summary['metric']}, merged by {summary['merge']}): source views "
        f"[{', '.join(summary['source_views'])}] OOF {summary['source_oof']:.4f}, identity "
        f"{summary['identity_oof']:.4f}"
    ]
    for name, scores in summary["candidates"].items():
        first = scores["added_first"]
        first = "-" if first is None else f"{first:.4f}"
        lines.append(f"  {name:<36} alone {scores['alone']:.4f}  added first {first}")
    for i, step in enumerate(summary["rounds"], 1):
        verdict = "kept" if step["kept"] else "no gain, stop"
        lines.append(f"  round {i}: best {step['best']} OOF {step['oof']:.4f} ({verdict})")
    lines.append(f"  chosen: [{', '.join(summary['chosen'])}] OOF {summary['oof']:.4f}")
    nested = summary.get("nested")
    if nested:
        lines.append(
            f"  nested (views chosen without the fold they score): fold mean {nested['mean']:.4f}"
            f" vs source views {nested['source_mean']:.4f}"
        )
        sign = 1 if summary["higher_is_better"] else -1
        if sign * (nested["mean"] - nested["source_mean"]) < 0:
            lines.append(
                "  warning: chosen without the fold they score, the views do worse than the "
                "source's: the OOF gain above is likely selection noise (few rows, many "
                "candidates). Prefer the source run, or fewer --candidates."
            )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_CANDIDATES",
    "Selection",
    "auto_tta",
    "greedy",
    "label",
    "parse_specs",
    "select_tta",
]
