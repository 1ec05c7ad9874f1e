"""Reads a competition into tables: train (id, path, label, target[, group]), test, holdout.

Two layouts:

* ``kaggle``: a train CSV (id, label and optional group columns), an image folder with a file-name
  pattern, test ids from a test CSV or ``sample_submission.csv``, and optionally a solution CSV
  (labelled test set, scored as "LB").
* ``folders``: ``train/<class>/*``, optional labelled ``val/<class>/*`` (scored as "LB") and an
  unlabelled test folder.

Every input is checked here, at the boundary; errors name the file, row and fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from competition.config import Config
from competition.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Competition:
    """What a run needs to know about the data."""

    name: str
    classes: list[str]
    train: pd.DataFrame  # id, path, label, target[, group]
    test: pd.DataFrame | None  # id, path
    holdout: pd.DataFrame | None  # id, path, label, target: scored as "LB"
    sample_submission: pd.DataFrame | None
    id_column: str
    label_column: str

    @property
    def class_counts(self) -> list[int]:
        counts = self.train["target"].value_counts()
        return [int(counts.get(i, 0)) for i in range(len(self.classes))]


def _read_csv(path: Path, what: str, fix: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found. {fix}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read {what} as CSV ({exc})") from exc


def _require_columns(frame: pd.DataFrame, path: Path, columns: dict[str, str]) -> None:
    """``columns`` maps a column name to the config key that names it."""
    for column, key in columns.items():
        if column not in frame.columns:
            raise DataError(
                f"{path}: no column '{column}' (set by {key}); its columns are "
                f"{', '.join(map(str, frame.columns))}. Set {key} to one of them."
            )


def _check_unique(frame: pd.DataFrame, column: str, path: Path) -> None:
    duplicated = frame[column].duplicated(keep=False)
    if duplicated.any():
        rows = frame.index[duplicated][:5]
        shown = ", ".join(f"row {i + 2} ({frame.at[i, column]!r})" for i in rows)
        raise DataError(f"{path}: duplicate ids in column '{column}': {shown}. Ids must be unique.")


def _image_paths(ids: pd.Series, folder: Path, pattern: str, csv: Path) -> list[Path]:
    """Resolve each id to a file inside ``folder``; reject escapes and missing files."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (referenced by {csv}).")
    paths, missing = [], []
    for row, image_id in enumerate(ids):
        try:
            name = pattern.format(id=image_id)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"competition.image_pattern={pattern!r} is not a valid pattern ({exc!r}): "
                "write the file name with {id}, e.g. '{id}.jpg'"
            ) from None
        # lexical check: ids must not climb out of the folder (symlinked files are fine)
        path = Path(os.path.normpath(folder / name))
        if not path.is_relative_to(folder):
            raise DataError(
                f"{csv}, row {row + 2}: id {image_id!r} resolves to {path}, outside {folder}. "
                "Ids must name files inside the image folder."
            )
        if not path.is_file():
            missing.append(f"row {row + 2}: {path}")
        paths.append(path)
    if missing:
        shown = "; ".join(missing[:5]) + (
            f"; ... ({len(missing)} in all)" if len(missing) > 5 else ""
        )
        raise DataError(
            f"{csv}: {len(missing)} image(s) not found: {shown}. "
            "Check competition.image_pattern and the image folder."
        )
    return paths


def _classes(labels: pd.Series, configured: list[str] | None, source: str) -> list[str]:
    found = sorted(set(labels))
    if not configured:
        return found
    unknown = sorted(set(found) - set(configured))
    if unknown:
        rows = labels.index[labels.isin(unknown)][:3]
        raise DataError(
            f"{source}: label(s) {unknown} (e.g. row {rows[0] + 2}) are not in "
            "competition.classes. "
            "Add them to the class list or fix the labels."
        )
    unused = [c for c in configured if c not in set(found)]
    if unused:
        raise DataError(
            f"{source}: class(es) {unused} from competition.classes never occur in the train set. "
            "Remove them from the class list or add training images."
        )
    return list(configured)


def _targets(labels: pd.Series, classes: list[str], source: str) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    bad = [i for i, label in enumerate(labels) if label not in index]
    if bad:
        raise DataError(
            f"{source}, row {bad[0] + 2}: label {labels.iloc[bad[0]]!r} is not a train class "
            f"({', '.join(classes)})."
        )
    return [index[label] for label in labels]


def _read_kaggle(config: Config, root: Path) -> Competition:
    cc = config.competition
    train_csv = root / cc.train_csv
    train = _read_csv(train_csv, "train CSV", "Set competition.root and competition.train_csv.")
    columns = {cc.id_column: "competition.id_column", cc.label_column: "competition.label_column"}
    if cc.group_column:
        columns[cc.group_column] = "competition.group_column"
    _require_columns(train, train_csv, columns)
    if train.empty:
        raise DataError(f"{train_csv}: the train CSV has no rows.")
    for column in columns:
        blank = train.index[train[column].str.strip() == ""]
        if len(blank):
            rows = ", ".join(str(i + 2) for i in blank[:5])
            raise DataError(
                f"{train_csv}: empty '{column}' in row(s) {rows} ({len(blank)} in all). "
                "Fill them in or drop those rows."
            )
    _check_unique(train, cc.id_column, train_csv)
    classes = _classes(train[cc.label_column], cc.classes, str(train_csv))
    table = pd.DataFrame(
        {
            "id": train[cc.id_column],
            "path": _image_paths(
                train[cc.id_column], root / cc.train_images, cc.image_pattern, train_csv
            ),
            "label": train[cc.label_column],
            "target": _targets(train[cc.label_column], classes, str(train_csv)),
        }
    )
    if cc.group_column:
        table["group"] = train[cc.group_column]

    sample = None
    if cc.sample_submission:
        sample_csv = root / cc.sample_submission
        sample = _read_csv(
            sample_csv, "sample submission", "Set competition.sample_submission (or null)."
        )
        _require_columns(sample, sample_csv, {cc.id_column: "competition.id_column"})
        _check_unique(sample, cc.id_column, sample_csv)

    test = None
    if cc.test_images:
        if cc.test_csv:
            test_csv = root / cc.test_csv
            test_ids = _read_csv(test_csv, "test CSV", "Set competition.test_csv (or null).")
            _require_columns(test_ids, test_csv, {cc.id_column: "competition.id_column"})
            _check_unique(test_ids, cc.id_column, test_csv)
            ids = test_ids[cc.id_column]
            if sample is not None:
                absent = ids[~ids.isin(set(sample[cc.id_column]))]
                if len(absent):
                    raise DataError(
                        f"{test_csv}, row {absent.index[0] + 2}: test id {absent.iloc[0]!r} "
                        "is missing "
                        f"from {root / cc.sample_submission} ({len(absent)} in all)."
                    )
        elif sample is not None:
            test_csv, ids = root / cc.sample_submission, sample[cc.id_column]
        else:
            raise DataError(
                "competition.test_images is set but there is neither competition.test_csv nor "
                "competition.sample_submission to list the test ids. Set one, or test_images: null."
            )
        test = pd.DataFrame(
            {
                "id": ids,
                "path": _image_paths(ids, root / cc.test_images, cc.image_pattern, test_csv),
            }
        )

    holdout = None
    if cc.solution_csv:
        solution_csv = root / cc.solution_csv
        solution = _read_csv(
            solution_csv, "solution CSV", "Set competition.solution_csv (or null)."
        )
        _require_columns(
            solution,
            solution_csv,
            {cc.id_column: "competition.id_column", cc.label_column: "competition.label_column"},
        )
        if test is None:
            raise DataError(
                f"{solution_csv}: a solution CSV needs test images (competition.test_images)."
            )
        labels = dict(zip(solution[cc.id_column], solution[cc.label_column], strict=True))
        unlabelled = test["id"][~test["id"].isin(labels)]
        if len(unlabelled):
            raise DataError(f"{solution_csv}: no label for test id {unlabelled.iloc[0]!r}.")
        holdout = test.copy()
        holdout["label"] = [labels[i] for i in holdout["id"]]
        holdout["target"] = _targets(holdout["label"], classes, str(solution_csv))
    return Competition(
        cc.name, classes, table, test, holdout, sample, cc.id_column, cc.label_column
    )


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _read_class_folders(folder: Path, root: Path, classes: list[str] | None) -> pd.DataFrame:
    if not folder.is_dir():
        raise DataError(
            f"{folder}: folder not found. Set competition.root / train_dir / holdout_dir."
        )
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in _list_images(class_dir):
            rows.append(
                {"id": str(path.relative_to(folder)), "path": path, "label": class_dir.name}
            )
    if not rows:
        raise DataError(f"{folder}: no images found in class sub-folders ({folder}/<class>/*.jpg).")
    return pd.DataFrame(rows)


def _read_folders(config: Config, root: Path) -> Competition:
    cc = config.competition
    train_dir = root / cc.train_dir
    train = _read_class_folders(train_dir, root, cc.classes)
    classes = _classes(train["label"], cc.classes, str(train_dir))
    train["target"] = _targets(train["label"], classes, str(train_dir))
    holdout = None
    if cc.holdout_dir:
        holdout_dir = root / cc.holdout_dir
        holdout = _read_class_folders(holdout_dir, root, None)
        holdout["target"] = _targets(holdout["label"], classes, str(holdout_dir))
    test = None
    if cc.test_dir:
        test_dir = root / cc.test_dir
        if not test_dir.is_dir():
            raise DataError(
                f"{test_dir}: test folder not found. Set competition.test_dir (or null)."
            )
        paths = _list_images(test_dir)
        if not paths:
            raise DataError(f"{test_dir}: no images in the test folder. Set competition.test_dir.")
        test = pd.DataFrame({"id": [str(p.relative_to(test_dir)) for p in paths], "path": paths})
    return Competition(cc.name, classes, train, test, holdout, None, "id", "label")


def read_competition(config: Config) -> Competition:
    """Read and check the competition described by ``config.competition``."""
    root = config.data_root()
    if not root.is_dir():
        raise DataError(
            f"{root}: data folder not found. Set competition.root (relative to the repo root) "
            "or pass competition.root=/path/to/data."
        )
    reader = _read_kaggle if config.competition.layout == "kaggle" else _read_folders
    competition = reader(config, root)
    if len(competition.classes) < 2:
        raise DataError(f"{root}: found {len(competition.classes)} class; need at least two.")
    return competition
