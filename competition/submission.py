"""Submission CSVs: built in the exact columns and row order of ``sample_submission.csv``, checked,
and written atomically to ``submissions/<run>.csv``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.config import Config
from competition.data import Competition
from competition.errors import DataError
from competition.io import write_csv


def build_submission(competition: Competition, config: Config, probs: np.ndarray) -> pd.DataFrame:
    """One row per test id: the predicted label, or one probability column per class."""
    test, sample = competition.test, competition.sample_submission
    id_column = competition.id_column
    if config.competition.submission_format == "probabilities":
        frame = pd.DataFrame(probs, columns=competition.classes)
        frame.insert(0, id_column, test["id"].to_numpy())
    else:
        label_column = competition.label_column
        if sample is not None and len(sample.columns) == 2:
            label_column = next(c for c in sample.columns if c != id_column)
        labels = np.asarray(competition.classes, dtype=object)[probs.argmax(axis=1)]
        frame = pd.DataFrame({id_column: test["id"].to_numpy(), label_column: labels})
    if sample is not None:
        frame = frame.set_index(id_column).reindex(sample[id_column]).reset_index()
        missing = [c for c in sample.columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"sample submission columns {missing} are not produced; set "
                "competition.submission_format (label or probabilities) to match it"
            )
        frame = frame[list(sample.columns)]
    return frame


def validate_submission(frame: pd.DataFrame, competition: Competition, config: Config) -> None:
    """Raise DataError unless ``frame`` matches the sample submission and the class list."""
    sample, id_column = competition.sample_submission, competition.id_column
    if sample is not None:
        if list(frame.columns) != list(sample.columns):
            raise DataError(
                f"submission columns {list(frame.columns)} != sample's {list(sample.columns)}"
            )
        if not frame[id_column].astype(str).equals(sample[id_column].astype(str)):
            raise DataError("submission ids are not the sample submission's ids in the same order")
    if frame.isna().any().any():
        rows = frame.index[frame.isna().any(axis=1)][:3].tolist()
        raise DataError(
            f"submission has empty cells (rows {rows}): a sample submission id has no test image; "
            "check competition.test_csv / test_images"
        )
    if config.competition.submission_format == "label":
        label_column = next(c for c in frame.columns if c != id_column)
        unknown = set(frame[label_column]) - set(competition.classes)
        if unknown:
            raise DataError(f"submission labels {sorted(unknown)} are not classes")
    else:
        values = frame[competition.classes].to_numpy(dtype=float)
        if (values < 0).any() or (values > 1).any() or not np.allclose(values.sum(1), 1, atol=1e-4):
            raise DataError("submission probabilities must lie in [0, 1] and sum to one per row")


def write_submission(
    path: Path, competition: Competition, config: Config, probs: np.ndarray
) -> Path:
    """Build, validate, then atomically write the submission."""
    frame = build_submission(competition, config, probs)
    validate_submission(frame, competition, config)
    write_csv(path, frame)
    return Path(path)
