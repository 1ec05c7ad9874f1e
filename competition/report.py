"""``report.md``: CV per fold, per-class recall and the confusion matrix of the OOF predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from competition.io import write_text


def write_report(run_dir: Path, cv: dict, oof: pd.DataFrame, classes: list[str]) -> None:
    targets = oof["target_index"].to_numpy()
    predictions = oof[classes].to_numpy().argmax(1)
    matrix = confusion_matrix(targets, predictions, labels=range(len(classes)))
    recall = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    done, k = len(cv["folds_done"]), cv.get("k", len(cv["folds_done"]))
    spread = "" if done == 1 else f" ± {cv['std']:.4f}"
    lines = [
        f"# Run {Path(run_dir).name}",
        "",
        f"CV {cv['metric']}: **{cv['mean']:.4f}{spread}** over {done} of {k} folds "
        f"{cv['folds_done']} (OOF {cv['oof']:.4f})"
        + (f"; LB {cv['lb']:.4f}" if "lb" in cv else ""),
        "",
        *(
            [
                f"**Partial run**: {k - done} of {k} folds are missing; the submission is partial.",
                "",
            ]
            if done < k
            else []
        ),
        "| fold | " + cv["metric"] + " |",
        "|---|---|",
        *[f"| {f} | {s:.4f} |" for f, s in zip(cv["folds_done"], cv["folds"], strict=True)],
        "",
        "## Per-class recall (OOF)",
        "",
        "| class | images | recall |",
        "|---|---|---|",
        *[
            f"| {c} | {n} | {r:.3f} |"
            for c, n, r in zip(classes, matrix.sum(1), recall, strict=True)
        ],
        "",
        "## Confusion matrix (rows: truth, columns: prediction)",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
        *[
            f"| {c} | " + " | ".join(map(str, row)) + " |"
            for c, row in zip(classes, matrix, strict=True)
        ],
        "",
    ]
    write_text(Path(run_dir) / "report.md", "\n".join(lines))
