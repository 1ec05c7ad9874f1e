"""A run's report: ``report.md`` and its figures, made from the run record's files.

Sections: the score per fold (mean, std), CV vs LB where a labelled holdout exists, learning curves
of the folds' training (``log.csv``), per-class recall ordered by training frequency in
head / medium / tail groups with the imbalance ratio (the many-/medium-/few-shot split of Liu et
al. 2019, "Large-Scale Long-Tailed Recognition in an Open World"), the OOF confusion matrix, a
reliability diagram with the expected calibration error (Guo et al. 2017, "On Calibration of
Modern Neural Networks"), the most confident mistakes as thumbnails and, from ``competition
report``, their Grad-CAM maps (Selvaraju et al. 2017; :mod:`competition.gradcam`).

:func:`build_report` returns the text and the PNGs; the run record writes them
(:meth:`competition.runs.RunRecord.write_report`). Every figure here needs no model, so the end of
``train``, ``baseline`` and ``ensemble`` writes the report in about a second; Grad-CAM loads each
fold's weights and runs a backward pass, so only ``competition report RUN`` makes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from competition import figures
from competition.errors import CompetitionError, DataError

#: Liu et al. 2019: many-shot classes have more than 100 training images, few-shot fewer than 20.
HEAD_MIN, TAIL_MAX = 100, 20
#: Equal-width confidence bins of the reliability diagram (Guo et al. 2017 use 15).
CALIBRATION_BINS = 15
#: Mistakes shown as thumbnails / Grad-CAM maps, and at most this many per (true, predicted) pair.
WORST, PER_PAIR = 12, 2
THUMBNAIL_SIDE = 160


@dataclass
class Report:
    """``report.md``'s text and its figures (file name -> PNG bytes)."""

    text: str
    figures: dict[str, bytes] = field(default_factory=dict)


# -- numbers ------------------------------------------------------------------------------------


def frequency_groups(counts) -> tuple[list[str], str]:
    """Head / medium / tail group of each class from its training count, and the rule used.

    Liu et al.'s absolute split (head > 100 images, tail < 20) when it separates the classes into
    at least two groups; otherwise (small or evenly sized data sets, where every class would land
    in one group) thirds of the classes by training frequency.
    """
    counts = np.asarray(counts)
    absolute = np.where(counts > HEAD_MIN, "head", np.where(counts < TAIL_MAX, "tail", "medium"))
    if len(set(absolute.tolist())) >= 2:
        rule = (
            f"head: more than {HEAD_MIN} training images, tail: fewer than {TAIL_MAX}, medium: "
            "between (the many/medium/few-shot split of Liu et al. 2019)"
        )
        return absolute.tolist(), rule
    names = ("head", "medium", "tail") if len(counts) >= 3 else ("head", "tail")[: len(counts)]
    order = np.argsort(-counts, kind="stable")  # most frequent first; ties in class order
    groups = [""] * len(counts)
    for name, part in zip(names, np.array_split(order, len(names)), strict=True):
        for c in part:
            groups[c] = name
    rule = (
        f"{'thirds' if len(names) == 3 else 'halves'} of the classes by training frequency "
        f"(with {HEAD_MIN}/{TAIL_MAX}-image "
        f"thresholds every class would be '{absolute[0]}')"
    )
    if counts.min() == counts.max():
        rule += "; all classes have the same count, so the groups are arbitrary"
    return groups, rule


def calibration(probs: np.ndarray, targets: np.ndarray, bins: int = CALIBRATION_BINS):
    """Per-bin confidence, accuracy and count of the top-1 probability, the edges and the ECE."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    mean_confidence = np.bincount(which, confidence, minlength=bins) / safe
    accuracy = np.bincount(which, correct.astype(float), minlength=bins) / safe
    ece = float(np.sum(count / max(len(targets), 1) * np.abs(accuracy - mean_confidence)))
    return mean_confidence, accuracy, count, edges, ece


def worst_confusions(
    oof: pd.DataFrame, classes: list[str], n: int = WORST, per_pair: int = PER_PAIR
) -> pd.DataFrame:
    """The most confident OOF mistakes, at most ``per_pair`` per (true, predicted) pair (more
    when there are too few pairs to show ``n``: 6 per pair for two classes).

    Columns: id, fold, target_index, predicted, p_predicted, p_true.
    """
    probs = oof[classes].to_numpy()
    targets = oof["target_index"].to_numpy()
    predicted = probs.argmax(1)
    rows = np.arange(len(oof))
    table = pd.DataFrame(
        {
            "id": oof["id"].astype(str).to_numpy(),
            "fold": oof["fold"].to_numpy(),
            "target_index": targets,
            "predicted": predicted,
            "p_predicted": probs[rows, predicted],
            "p_true": probs[rows, targets],
        }
    )
    wrong = table[table["predicted"] != table["target_index"]]
    wrong = wrong.sort_values(["p_predicted", "id"], ascending=[False, True], kind="stable")
    pairs = len(classes) * (len(classes) - 1)
    per_pair = max(per_pair, -(-n // max(pairs, 1)))
    wrong = wrong.groupby(["target_index", "predicted"], sort=False).head(per_pair)
    return wrong.head(n).reset_index(drop=True)


# -- the report -----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _md_name(name: str) -> str:
    return str(name).replace("|", "\\|")


def _learning_logs(record, folds: list[int]) -> tuple[dict[int, pd.DataFrame], str]:
    """``log.csv`` of each fold of the run holding the weights, and where they come from."""
    try:
        weights = record.weights_run()
    except CompetitionError as exc:
        return {}, f" (the run holding the weights cannot be opened: {exc})"
    logs = {}
    for fold in folds:
        path = weights.fold_dir(fold) / "log.csv"
        if path.is_file():
            try:
                logs[fold] = pd.read_csv(path)
            except (OSError, ValueError):
                continue
    where = "" if weights.path == record.path else f" (of {weights.name}, whose weights it uses)"
    return logs, where


def _source_section(record, cv: dict, lines: list[str]) -> None:
    """The CV gain over the run this one was derived from (``produced_by.source``), and the
    pseudo-labels taken per class."""
    from competition.runs import RunRecord, cv_gain, resolve_reference

    produced = record.produced_by
    if not produced.get("source"):
        return
    try:
        source = RunRecord.open(resolve_reference(produced["source"])).cv()
    except CompetitionError as exc:
        lines += [f"Source run `{produced['source']}`: no CV to compare ({exc}).", ""]
        return
    gain = cv_gain(source, cv)
    if gain["gain"] is None:
        return
    lines += [
        f"## Gain over `{produced['source']}`",
        "",
        f"| run | {cv['metric']} on folds {gain['folds']} |",
        "|---|---|",
        f"| source | {_fmt(gain['before'])} |",
        f"| this run | {_fmt(gain['after'])} |",
        f"| gain | **{gain['gain']:+.4f}** |",
        "",
    ]
    if produced.get("per_class"):
        lines += [
            f"Pseudo-labelled {produced.get('split')} images taken per class (confidence >= "
            f"{produced.get('threshold')}, {produced.get('labels')} labels):",
            "",
            "| class | images |",
            "|---|---|",
            *[f"| {_md_name(c)} | {n} |" for c, n in produced["per_class"].items()],
            "",
        ]


def _scores_section(record, cv: dict, out: Report, lines: list[str]) -> None:
    metric, folds, scores = cv["metric"], cv["folds_done"], cv["folds"]
    lines += [
        "## Score per fold",
        "",
        f"| fold | {metric} |",
        "|---|---|",
        *[f"| {f} | {_fmt(s)} |" for f, s in zip(folds, scores, strict=True)],
        f"| mean ± std | {_fmt(cv['mean'])} ± {_fmt(cv['std'])} |",
        f"| pooled OOF | {_fmt(cv['oof'])} |",
        "",
    ]
    out.figures["report_folds.png"] = figures.fold_scores(
        folds, scores, metric, cv.get("oof"), cv.get("lb")
    )
    lines += ["![score per fold](report_folds.png)", ""]


def _lb_section(record, competition, cv: dict, out: Report, lines: list[str]) -> None:
    holdout = getattr(competition, "holdout", None)
    folds = cv["folds_done"]
    if holdout is None or "lb" not in cv:
        return
    probs = [record.fold_probs(f, "holdout") for f in folds]
    if any(p is None or len(p) != len(holdout) for p in probs):
        return
    targets = holdout["target"].to_numpy()
    lb = [float(record.metric(targets, p)) for p in probs]
    metric = cv["metric"]
    lines += [
        "## CV vs LB (labelled holdout)",
        "",
        f"Each fold's model scored on its validation rows (CV) and on the {len(holdout)} holdout "
        "images (LB); the submission averages the folds.",
        "",
        f"| fold | CV {metric} | LB {metric} |",
        "|---|---|---|",
        *[
            f"| {f} | {_fmt(c)} | {_fmt(b)} |"
            for f, c, b in zip(folds, cv["folds"], lb, strict=True)
        ],
        f"| mean of folds | {_fmt(cv['mean'])} | {_fmt(float(np.mean(lb)))} |",
        f"| fold-mean prediction | | **{_fmt(cv['lb'])}** |",
        "",
    ]
    out.figures["report_cv_lb.png"] = figures.cv_vs_lb(folds, cv["folds"], lb, metric, cv["lb"])
    lines += ["![CV vs LB](report_cv_lb.png)", ""]


def _curves_section(record, cv: dict, out: Report, lines: list[str]) -> None:
    lines += ["## Learning curves", ""]
    logs, where = _learning_logs(record, cv["folds_done"])
    if not logs:
        verb = record.produced_by.get("verb", "train")
        if verb in ("baseline", "ensemble"):
            lines += [f"No learning curves: a {verb} run trains no network.", ""]
        else:
            lines += [f"No learning curves: no `fold_<k>/log.csv`{where}.", ""]
        return
    out.figures["report_curves.png"] = figures.learning_curves(logs, cv["metric"])
    lines += [
        f"Per fold, from `fold_<k>/log.csv`{where}; the kept model is the best epoch.",
        "",
        "![learning curves](report_curves.png)",
        "",
    ]


def _classes_section(
    competition, oof: pd.DataFrame, classes: list[str], out: Report, lines: list[str]
) -> np.ndarray:
    targets = oof["target_index"].to_numpy()
    predicted = oof[classes].to_numpy().argmax(1)
    matrix = confusion_matrix(targets, predicted, labels=range(len(classes)))
    per_class = matrix.sum(1)
    recall = matrix.diagonal() / np.maximum(per_class, 1)
    precision = matrix.diagonal() / np.maximum(matrix.sum(0), 1)
    counts = np.asarray(
        competition.class_counts if competition is not None else per_class, dtype=int
    )
    source = "train table" if competition is not None else "OOF rows"
    groups, rule = frequency_groups(counts)
    ratio = counts.max() / max(counts.min(), 1)
    order = np.argsort(-counts, kind="stable")
    present = [g for g in ("head", "medium", "tail") if g in groups]
    group_recall = {
        g: float(np.mean([recall[c] for c in range(len(classes)) if groups[c] == g]))
        for g in present
    }
    off = matrix.astype(float) / np.maximum(per_class[:, None], 1)
    np.fill_diagonal(off, 0)
    lines += [
        "## Per-class recall by training frequency",
        "",
        f"Imbalance ratio (most / least frequent class in the {source}): **{ratio:.1f}** "
        f"({counts.max()} / {counts.min()} images). Groups: {rule}.",
        "",
        "| group | classes | train images | mean recall (OOF) |",
        "|---|---|---|---|",
        *[
            f"| {g} | {groups.count(g)} | "
            f"{int(sum(counts[c] for c in range(len(classes)) if groups[c] == g))} | "
            f"{group_recall[g]:.3f} |"
            for g in present
        ],
        "",
        "| class | train images | group | recall | precision | most often predicted instead |",
        "|---|---|---|---|---|---|",
    ]
    for c in order:
        worst = int(off[c].argmax())
        instead = f"{_md_name(classes[worst])} ({off[c, worst]:.0%})" if off[c, worst] > 0 else "-"
        lines.append(
            f"| {_md_name(classes[c])} | {counts[c]} | {groups[c]} | {recall[c]:.3f} | "
            f"{precision[c]:.3f} | {instead} |"
        )
    out.figures["report_recall.png"] = figures.recall_by_frequency(
        [classes[c] for c in order],
        recall[order],
        counts[order],
        [groups[c] for c in order],
        group_recall,
        f"OOF recall by training frequency (imbalance ratio {ratio:.1f})",
    )
    lines += ["", "![per-class recall](report_recall.png)", ""]
    out.figures["report_confusion.png"] = figures.confusion(matrix, classes)
    pairs = [
        (i, j, matrix[i, j])
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and matrix[i, j]
    ]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    lines += [
        "## Confusion matrix (OOF, normalised by true class)",
        "",
        "![confusion matrix](report_confusion.png)",
        "",
    ]
    if pairs:
        lines += [
            "Most frequent confusions:",
            "",
            "| true | predicted | images | share of the true class |",
            "|---|---|---|---|",
            *[
                f"| {_md_name(classes[i])} | {_md_name(classes[j])} | {n} | "
                f"{n / max(per_class[i], 1):.0%} |"
                for i, j, n in pairs[:10]
            ],
            "",
        ]
    else:
        lines += ["No OOF image is misclassified.", ""]
    return matrix


def _calibration_section(oof, classes, out: Report, lines: list[str]) -> None:
    confidence, accuracy, count, edges, ece = calibration(
        oof[classes].to_numpy(), oof["target_index"].to_numpy()
    )
    out.figures["report_reliability.png"] = figures.reliability(
        confidence, accuracy, count, edges, ece
    )
    mean_confidence = float(oof[classes].to_numpy().max(1).mean())
    accuracy_all = float((oof[classes].to_numpy().argmax(1) == oof["target_index"]).mean())
    tone = (
        "over-confident"
        if mean_confidence > accuracy_all + 0.02
        else "under-confident"
        if mean_confidence < accuracy_all - 0.02
        else "about calibrated"
    )
    lines += [
        "## Calibration",
        "",
        f"Expected calibration error of the OOF top-1 probability ({CALIBRATION_BINS} bins, Guo "
        f"et al. 2017): **{ece:.4f}**. Mean confidence {mean_confidence:.3f} vs accuracy "
        f"{accuracy_all:.3f}: {tone}. For log-loss metrics and blends, calibration matters.",
        "",
        "![reliability diagram](report_reliability.png)",
        "",
    ]


def _worst_section(record, competition, oof, classes, explain, out, lines) -> None:
    worst = worst_confusions(oof, classes)
    lines += ["## Worst confusions", ""]
    if worst.empty:
        lines += ["No OOF image is misclassified.", ""]
        return
    lines += [
        f"The {len(worst)} most confident OOF mistakes (a few per pair of classes), "
        "each predicted by the model of its fold.",
        "",
        "| id | fold | true | predicted | p(predicted) | p(true) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r.id} | {r.fold} | {_md_name(classes[r.target_index])} | "
            f"{_md_name(classes[r.predicted])} | {r.p_predicted:.3f} | {r.p_true:.3f} |"
            for r in worst.itertuples()
        ],
        "",
    ]
    path_of = (
        dict(zip(competition.train["id"].astype(str), competition.train["path"], strict=True))
        if competition is not None
        else {}
    )
    missing = [i for i in worst["id"] if i not in path_of]
    if competition is None:
        lines += ["No thumbnails: the competition's data could not be read.", ""]
        return
    if missing:
        lines += [f"No thumbnails: ids {missing[:3]} are not in the competition's train table.", ""]
        return
    from competition.images import decode

    resize = record.config.data.resize
    try:
        thumbs = [decode(path_of[i], THUMBNAIL_SIDE, resize) for i in worst["id"]]
    except DataError as exc:
        lines += [f"No thumbnails: {exc}", ""]
        return
    short = figures.short_name
    titles = [
        f"{short(r.id, 20)} (fold {r.fold})\ntrue: {short(classes[r.target_index], 22)}\n"
        f"pred: {short(classes[r.predicted], 22)}\n"
        f"p(pred) {r.p_predicted:.2f}, p(true) {r.p_true:.2f}"
        for r in worst.itertuples()
    ]
    out.figures["report_worst.png"] = figures.thumbnails(thumbs, titles)
    lines += ["![worst confusions](report_worst.png)", ""]
    _gradcam_section(record, worst, classes, explain, out, lines)


def _gradcam_section(record, worst, classes, explain, out, lines) -> None:
    lines += ["## Grad-CAM of the worst confusions", ""]
    try:
        weights = record.weights_run()
    except CompetitionError as exc:
        lines += [f"Not available: {exc}", ""]
        return
    folds = sorted(set(worst["fold"].tolist()))
    if not all((weights.fold_dir(f) / "best.pt").is_file() for f in folds):
        verb = record.produced_by.get("verb", "train")
        lines += [
            f"Not available: this {verb} run has no fold weights (`fold_<k>/best.pt`) of a "
            "network to explain.",
            "",
        ]
        return
    if explain is None:
        lines += [
            f"Run `competition report {record.path}` to add Grad-CAM maps of these images "
            "(Selvaraju et al. 2017): it loads each fold's weights, so the end of training "
            "leaves it out to stay fast.",
            "",
        ]
        return
    try:
        images, maps, (height, width) = explain(worst)
    except CompetitionError as exc:
        lines += [f"Not available: {exc}", ""]
        return
    captions = [
        (
            figures.short_name(r.id, 26),
            f"pred: {figures.short_name(classes[r.predicted], 18)}",
            f"true: {figures.short_name(classes[r.target_index], 18)}",
        )
        for r in worst.itertuples()
    ]
    out.figures["report_gradcam.png"] = figures.gradcam_grid(images, maps, captions)
    lines += [
        "Per image: its id above the fold model's input (no TTA), then Grad-CAM (Selvaraju et "
        "al. 2017) of the predicted class and of the true class on the feature map the model "
        "pools: red is where the class's evidence was.",
        "",
    ]
    if min(height, width) < 4:
        lines += [
            f"**Coarse maps**: the model's last feature map is {height}×{width} at this input "
            f"size ({images[0].shape[0]} px), so Grad-CAM cannot localise (the maps are nearly "
            "uniform). Larger images give finer maps.",
            "",
        ]
    lines += ["![Grad-CAM](report_gradcam.png)", ""]


def build_report(
    record,
    competition,
    cv: dict,
    oof: pd.DataFrame,
    explain: Callable[[pd.DataFrame], tuple[list, list, tuple[int, int]]] | None = None,
) -> Report:
    """The report of ``record`` (a :class:`~competition.runs.RunRecord`) from its ``cv.json`` and
    OOF rows; ``competition`` (train table, holdout) gives training frequencies, thumbnails and
    the LB per fold. ``explain(rows) -> (images, maps, feature size)`` adds Grad-CAM (see
    :func:`competition.gradcam.explain_rows`)."""
    classes = [c for c in oof.columns if c not in ("id", "fold", "target", "target_index")]
    out = Report("")
    done, k = len(cv["folds_done"]), cv.get("k", len(cv["folds_done"]))
    spread = "" if done == 1 else f" ± {cv['std']:.4f}"
    produced = record.produced_by
    verb = produced.get("verb", "train")
    how = {
        "predict": f"predicted with the fold weights of `{produced.get('weights')}`",
        "ensemble": "a blend of "
        + ", ".join(
            f"`{m.get('run')}`" + (f" ({m['weight']:.3f})" if "weight" in m else "")
            for m in produced.get("members", [])
        ),
        "baseline": "a frozen-feature baseline "
        + ", ".join(f"{key}={value}" for key, value in produced.get("baseline", {}).items()),
        "pseudo": f"{record.config.model.backbone} trained with {produced.get('taken')} of "
        f"{produced.get('of')} {produced.get('split')} images pseudo-labelled "
        f"({produced.get('labels')}, confidence >= {produced.get('threshold')}) by the fold "
        f"ensemble of `{produced.get('source')}`",
    }.get(verb, f"backbone {record.config.model.backbone}")
    lines = [
        f"# Run {record.name}",
        "",
        f"CV {cv['metric']}: **{cv['mean']:.4f}{spread}** over {done} of {k} folds "
        f"{cv['folds_done']} (OOF {cv['oof']:.4f})"
        + (f"; LB {cv['lb']:.4f}" if "lb" in cv else "")
        + f". Produced by `{verb}` ({how})"
        + (
            ""  # a baseline's views are its own options; a blend's are its members'
            if verb in ("baseline", "ensemble")
            else "; TTA: " + ", ".join(spec.name for spec in record.config.tta)
        )
        + ".",
        "",
    ]
    if done < k:
        lines += [
            f"**Partial run**: {k - done} of {k} folds are missing; the submission is partial.",
            "",
        ]
    _source_section(record, cv, lines)
    _scores_section(record, cv, out, lines)
    _lb_section(record, competition, cv, out, lines)
    _curves_section(record, cv, out, lines)
    _classes_section(competition, oof, classes, out, lines)
    _calibration_section(oof, classes, out, lines)
    _worst_section(record, competition, oof, classes, explain, out, lines)
    out.text = "\n".join(lines)
    return out


def report_run(run_dir: str | Path, gradcam: bool = True, log=print) -> Path:
    """``competition report RUN``: rewrite a finished run's report, with Grad-CAM when it has fold
    weights; the path of ``report.md``."""
    from competition.data import read_competition
    from competition.runs import RunRecord

    record = RunRecord.open(run_dir)
    cv = record.cv()
    try:
        competition = read_competition(record.config)
    except CompetitionError as exc:  # the data moved since the run: report what the run holds
        log(f"report: {exc}\nThe report goes on without images, holdout and training counts.")
        competition = None
    explain = None
    if gradcam and competition is not None:
        from competition.gradcam import explain_rows

        def explain(rows):
            return explain_rows(record, competition, rows, log)

    return record.write_report(competition, cv, record.oof(), explain)


__all__ = [
    "Report",
    "build_report",
    "calibration",
    "frequency_groups",
    "report_run",
    "worst_confusions",
]
