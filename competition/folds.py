"""Seeded folds (stratified, group, stratified-group), saved as `folds/<name>-<k>fold-s<seed>.csv`.

A saved file is reused while the train table (ids, labels, groups) is unchanged, and rebuilt, with
a message, when it changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

from competition.config import REPO_ROOT, FoldsConfig
from competition.errors import ConfigError, DataError
from competition.io import write_csv

FOLDS_DIR = REPO_ROOT / "folds"


def folds_path(name: str, config: FoldsConfig, folds_dir: Path = FOLDS_DIR) -> Path:
    """``<name>-<k>fold-s<seed>.csv``; group methods add ``-<method>``: no method reuses another."""
    method = "" if config.method == "stratified" else f"-{config.method}"
    return Path(folds_dir) / f"{name}-{config.k}fold-s{config.seed}{method}.csv"


def assign_folds(train: pd.DataFrame, config: FoldsConfig) -> np.ndarray:
    """A fold index per row of ``train`` (columns target[, label, group])."""
    k = config.k
    if k < 2:
        raise ConfigError(f"folds.k: need at least 2 folds, got {k}")
    if len(train) < k:
        raise DataError(f"the train set has {len(train)} rows, fewer than folds.k={k}")
    needs_group = config.method in ("group", "stratified_group")
    if needs_group and "group" not in train.columns:
        raise ConfigError(
            f"folds.method={config.method} needs a group column: set competition.group_column"
        )
    y = train["target"].to_numpy()
    if config.method == "stratified":
        counts = train.groupby("label" if "label" in train else "target", sort=True).size()
        small = counts[counts < k]
        if len(small):
            named = ", ".join(f"'{label}' ({n})" for label, n in small.items())
            raise DataError(
                f"class(es) with fewer images than folds.k={k}: {named}. Stratified folds would "
                "leave them out of some validation folds. Lower folds.k, add images, or merge "
                "or drop these classes."
            )
    if config.method == "stratified":
        splitter = StratifiedKFold(k, shuffle=True, random_state=config.seed)
        splits = splitter.split(np.zeros(len(y)), y)
    elif config.method == "group":
        groups = train["group"].to_numpy()
        if len(set(groups)) < k:
            raise DataError(f"only {len(set(groups))} groups for folds.k={k}")
        # GroupKFold is deterministic; shuffle group order by the seed for seeded variety.
        rng = np.random.default_rng(config.seed)
        unique = np.array(sorted(set(groups)))
        order = {g: i for i, g in enumerate(rng.permutation(unique))}
        splits = GroupKFold(k).split(np.zeros(len(y)), y, [order[g] for g in groups])
    else:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=config.seed)
        splits = splitter.split(np.zeros(len(y)), y, train["group"].to_numpy())
    fold = np.full(len(y), -1)
    for index, (_, valid) in enumerate(splits):
        fold[valid] = index
    for index in range(k):
        if not (fold == index).any() or (fold != index).sum() == 0:
            raise DataError(f"fold {index} has an empty train or validation set; lower folds.k")
    return fold


def _signature(train: pd.DataFrame) -> pd.DataFrame:
    columns = ["id", "label"] + (["group"] if "group" in train.columns else [])
    return train[columns].astype(str).reset_index(drop=True)


def load_or_make_folds(
    train: pd.DataFrame, name: str, config: FoldsConfig, folds_dir: Path = FOLDS_DIR, log=print
) -> np.ndarray:
    """Fold per row of ``train``: the saved file if it still matches, else new folds."""
    path = folds_path(name, config, folds_dir)
    current = _signature(train)
    if path.is_file():
        saved = pd.read_csv(path, dtype=str, keep_default_na=False)
        columns = list(current.columns)
        if list(saved.columns) == [*columns, "fold"] and saved[columns].equals(current):
            return saved["fold"].astype(int).to_numpy()
        log(f"{path}: the train table changed since these folds were made; rebuilding them.")
    fold = assign_folds(train, config)
    table = current.copy()
    table["fold"] = fold
    write_csv(path, table)
    log(f"folds written to {path}")
    return fold
