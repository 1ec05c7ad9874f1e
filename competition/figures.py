"""The report's figures: matplotlib drawings returned as PNG bytes, sized for 2 to 100+ classes.

Only matplotlib's object API and its Agg canvas are used (never ``pyplot``): no display, no global
figure state, safe in any process. Each function takes plain arrays and returns the PNG's bytes;
the run record (:mod:`competition.runs`) writes them.
"""

from __future__ import annotations

import io
import math

import numpy as np

DPI = 100
#: Colours of the frequency groups (head / medium / tail) and of the folds.
GROUP_COLOURS = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def short_name(name: str, limit: int = 24) -> str:
    """``name`` cut to ``limit`` characters with an ellipsis (long class names, ids)."""
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _fold_colour(fold: int):
    from matplotlib import colormaps

    return colormaps["tab10"](fold % 10)


def fold_scores(
    folds: list[int],
    scores: list[float],
    metric: str,
    oof: float | None = None,
    lb: float | None = None,
) -> bytes:
    """Each fold's score as a dot, the mean as a line with a ±1 std band, pooled OOF and LB."""
    figure = _figure(max(4.5, 0.5 * len(folds) + 3), 3.2)
    ax = figure.add_subplot()
    scores = np.asarray(scores, dtype=float)
    mean, std = float(scores.mean()), float(scores.std())
    x = np.arange(len(folds))
    ax.axhspan(mean - std, mean + std, color="#1f77b4", alpha=0.12, label="mean ± std")
    ax.axhline(mean, color="#1f77b4", lw=1.5, label=f"mean {mean:.4f}")
    if oof is not None:
        ax.axhline(oof, color="grey", lw=1, ls=":", label=f"pooled OOF {oof:.4f}")
    if lb is not None:
        ax.axhline(lb, color="#2ca02c", lw=1.2, ls="--", label=f"LB (fold mean) {lb:.4f}")
    ax.plot(x, scores, "o", color="black", ms=6, zorder=3)
    for xi, score in zip(x, scores, strict=True):
        ax.annotate(
            f"{score:.4f}",
            (xi, score),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_xticks(x, [f"fold {f}" for f in folds])
    ax.set_xlim(-0.5, len(folds) - 0.3)
    values = [*scores, *(v for v in (oof, lb) if v is not None)]
    pad = max(0.01, 0.25 * (max(values) - min(values)))
    ax.set_ylim(min(values) - pad, max(values) + pad)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per fold (OOF rows of each fold)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(figure)


def cv_vs_lb(
    folds: list[int], cv: list[float], lb: list[float], metric: str, lb_mean: float
) -> bytes:
    """Each fold model's validation score against its holdout score; the fold-mean's LB."""
    figure = _figure(4.6, 4.2)
    ax = figure.add_subplot()
    for fold, x, y in zip(folds, cv, lb, strict=True):
        ax.plot(x, y, "o", color=_fold_colour(fold), ms=7)
        ax.annotate(f"fold {fold}", (x, y), xytext=(5, 3), textcoords="offset points", fontsize=8)
    ax.plot(np.mean(cv), lb_mean, "*", color="black", ms=13, label=f"fold mean: LB {lb_mean:.4f}")
    values = [*cv, *lb, lb_mean]
    low, high = min(values), max(values)
    pad = max(0.01, 0.15 * (high - low))
    ax.plot(
        [low - pad, high + pad],
        [low - pad, high + pad],
        color="grey",
        lw=1,
        ls=":",
        label="LB = CV",
    )
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"CV {metric} (fold's validation rows)")
    ax.set_ylabel(f"LB {metric} (labelled holdout)")
    ax.set_title("CV vs LB", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(figure)


def learning_curves(logs: dict[int, object], metric: str) -> bytes:
    """Train and validation loss, and the validation metric, per epoch for every fold."""
    figure = _figure(10, 3.6)
    loss_ax, score_ax = figure.subplots(1, 2)
    column = f"val_{metric}"
    for fold, log in logs.items():
        colour = _fold_colour(fold)
        epochs = log["epoch"].to_numpy()
        loss_ax.plot(epochs, log["train_loss"], "-o", color=colour, ms=3, label=f"fold {fold}")
        if "val_loss" in log:
            loss_ax.plot(epochs, log["val_loss"], "--s", color=colour, ms=3)
        if column in log:
            values = log[column].to_numpy()
            score_ax.plot(epochs, values, "-o", color=colour, ms=3, label=f"fold {fold}")
            best = int(np.nanargmin(values) if metric == "log_loss" else np.nanargmax(values))
            score_ax.plot(epochs[best], values[best], "*", color=colour, ms=11)
    loss_ax.set_title("loss: train (solid), validation (dashed)", fontsize=10)
    loss_ax.set_xlabel("epoch")
    score_ax.set_title(f"validation {metric} (no TTA; star: best epoch, kept)", fontsize=10)
    score_ax.set_xlabel("epoch")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.legend(fontsize=7)
    return _png(figure)


def confusion(matrix: np.ndarray, classes: list[str]) -> bytes:
    """The confusion matrix normalised by true class (rows sum to 1): the diagonal is recall."""
    k = len(classes)
    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = 4.5 if k <= 6 else min(16.0, 2.5 + 0.23 * k)
    figure = _figure(side + 1.2, side)
    ax = figure.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    font = 8 if k <= 15 else max(5.5, 9 - k / 15)
    labels = [short_name(c, 26) for c in classes]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(k), labels, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 15:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    value = normalised[i, j]
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > 0.55 else "black",
                    )
    title = "OOF confusion matrix, normalised by true class"
    if k > 15:  # no numbers fit: circle off-diagonal cells holding at least 10% of their row
        rows, cols = np.nonzero((normalised >= 0.1) & ~np.eye(k, dtype=bool))
        ax.scatter(cols, rows, s=22, facecolors="none", edgecolors="#d62728", linewidths=0.9)
        title += "\n(red circles: confusions taking at least 10% of the true class)"
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    return _png(figure)


def recall_by_frequency(
    classes: list[str],
    recall: np.ndarray,
    counts: np.ndarray,
    groups: list[str],
    group_recall: dict[str, float],
    title: str,
) -> bytes:
    """Horizontal recall bars, most frequent class on top, coloured by head/medium/tail group."""
    k = len(classes)
    figure = _figure(7.5, max(2.8, 0.8 + 0.24 * k))
    ax = figure.add_subplot()
    y = np.arange(k)
    ax.barh(y, recall, color=[GROUP_COLOURS[g] for g in groups], height=0.75)
    font = 8 if k <= 20 else max(6, 9 - k / 15)
    ax.set_yticks(y, [short_name(c, 30) for c in classes], fontsize=font)
    ax.set_ylim(k - 0.5, -0.5)  # most frequent on top, no empty margins
    for yi, r, n in zip(y, recall, counts, strict=True):
        ax.text(min(r, 1.0) + 0.01, yi, f"{r:.2f} (n={n})", va="center", fontsize=font)
    ax.set_xlim(0, 1.22)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("OOF recall (n: training images of the class)")
    from matplotlib.patches import Patch

    handles = [
        Patch(color=GROUP_COLOURS[g], label=f"{g}: mean recall {group_recall[g]:.3f}")
        for g in GROUP_COLOURS
        if g in group_recall
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(figure)


def reliability(
    bin_confidence: np.ndarray,
    bin_accuracy: np.ndarray,
    bin_count: np.ndarray,
    edges: np.ndarray,
    ece: float,
) -> bytes:
    """Reliability diagram (Guo et al. 2017): accuracy per confidence bin, and the bins' sizes."""
    figure = _figure(5, 5.4)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = np.diff(edges)
    filled = bin_count > 0
    top.bar(
        edges[:-1][filled],
        bin_accuracy[filled],
        width=width[filled],
        align="edge",
        color="#1f77b4",
        edgecolor="black",
        lw=0.5,
        label="accuracy",
    )
    gap_low = np.minimum(bin_accuracy, bin_confidence)[filled]
    gap = np.abs(bin_confidence - bin_accuracy)[filled]
    top.bar(
        edges[:-1][filled],
        gap,
        bottom=gap_low,
        width=width[filled],
        align="edge",
        color="#d62728",
        alpha=0.35,
        edgecolor="#d62728",
        lw=0.5,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability of the OOF top-1 confidence (ECE {ece:.4f})", fontsize=10)
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(
        edges[:-1], bin_count, width=width, align="edge", color="grey", edgecolor="black", lw=0.5
    )
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    return _png(figure)


def _tile_grid(tiles: list[np.ndarray], captions: list[str], columns: int, lines: int) -> bytes:
    """Tiles (H, W, 3 uint8 of one size) in a grid, a caption of ``lines`` lines above each.

    One image on one axes, drawn at one screen pixel per image pixel: a dozen small axes would
    cost most of the report's time.
    """
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    h, w = tiles[0].shape[:2]
    gap, band = 12, 6 + 11 * lines  # pixels between tiles; caption band (7 pt lines at 100 dpi)
    height, width = rows * (h + band + gap), columns * (w + gap)  # a gap right of the last
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    figure = _figure(width / DPI, height / DPI)
    ax = figure.add_axes((0, 0, 1, 1))
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        row, col = divmod(i, columns)
        top, left = row * (h + band + gap) + band, col * (w + gap)
        canvas[top : top + h, left : left + w] = tile
        ax.text(left, top - 3, caption, fontsize=7, va="bottom", ha="left", linespacing=1.1)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def thumbnails(images: list[np.ndarray], titles: list[str], columns: int = 6) -> bytes:
    """A grid of images (H, W, 3 uint8, one size), each under a caption of up to 3 lines."""
    return _tile_grid(images, titles, columns, lines=max(t.count("\n") + 1 for t in titles))


def _resized(array: np.ndarray, side: int) -> np.ndarray:
    """A square image (uint8, H, W, 3) or map (float, H, W) resized to ``side`` pixels."""
    from PIL import Image

    if array.shape[0] == side and array.shape[1] == side:
        return array
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize((side, side), Image.BICUBIC))
    image = Image.fromarray(array.astype(np.float32), mode="F")
    return np.asarray(image.resize((side, side), Image.BILINEAR))


def heat_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` (H, W, 3 uint8) blended with a jet-coloured map (H, W) in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255.0
    return ((1 - alpha) * image + alpha * heat).round().astype(np.uint8)


def gradcam_grid(
    images: list[np.ndarray],
    maps: list[tuple[np.ndarray, np.ndarray]],
    captions: list[tuple[str, str, str]],
    per_row: int = 2,
) -> bytes:
    """Per image: the model's input, Grad-CAM of the predicted class, Grad-CAM of the true one."""
    tiles, texts = [], []
    side = int(np.clip(images[0].shape[0], 144, 192))  # captions need the room; big inputs shrink
    for image, (predicted, true), caption in zip(images, maps, captions, strict=True):
        image, predicted, true = (_resized(a, side) for a in (image, predicted, true))
        tiles += [image, heat_overlay(image, predicted), heat_overlay(image, true)]
        texts += list(caption)
    return _tile_grid(tiles, texts, 3 * per_row, lines=max(t.count("\n") + 1 for t in texts))


__all__ = [
    "confusion",
    "cv_vs_lb",
    "fold_scores",
    "gradcam_grid",
    "heat_overlay",
    "learning_curves",
    "recall_by_frequency",
    "reliability",
    "short_name",
    "thumbnails",
]
