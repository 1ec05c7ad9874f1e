"""Folds: stratification, no group leak, determinism, reuse and rebuild of the saved file."""

import numpy as np
import pandas as pd
import pytest

from competition.config import FoldsConfig
from competition.errors import DataError
from competition.folds import assign_folds, folds_path, load_or_make_folds


def _digits_table():
    """scikit-learn's handwritten digits as a train table (id, label, target, group)."""
    from sklearn.datasets import load_digits

    targets = load_digits().target
    return pd.DataFrame(
        {
            "id": [f"d{i:04d}" for i in range(len(targets))],
            "label": [f"digit_{t}" for t in targets],
            "target": targets,
            # a grouping like a session id: the class and the block of 200 rows it was read in
            # (90 groups of 16-23 images)
            "group": [f"digit_{t}/{i // 200}" for i, t in enumerate(targets)],
        }
    )


@pytest.fixture(scope="module")
def digits_train():
    """An imbalanced train table of real labels: of digit d, the first 180 - 15 d images.

    1,123 rows, 10 classes from 178 (digit_0, all it has) down to 45 (digit_9): about the 4:1
    imbalance of trashnet. Unstratified 5-fold splits of it miss the class shares by 4-5 points.
    """
    table = _digits_table().drop(columns="group")
    keep = table.groupby("target").cumcount() < 180 - 15 * table["target"]
    return table[keep].reset_index(drop=True)


def test_stratified_folds_keep_class_shares(digits_train):
    fold = assign_folds(digits_train, FoldsConfig(k=5, seed=1))
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    shares = pd.crosstab(digits_train["label"], fold, normalize="columns")
    overall = digits_train["label"].value_counts(normalize=True)
    # every fold's class share is within 1.5 points of the whole set's
    assert (shares.sub(overall, axis=0).abs() < 0.015).all().all()


def test_folds_are_deterministic_and_seeded(digits_train):
    a = assign_folds(digits_train, FoldsConfig(k=5, seed=1))
    b = assign_folds(digits_train, FoldsConfig(k=5, seed=1))
    c = assign_folds(digits_train, FoldsConfig(k=5, seed=2))
    assert (a == b).all()
    assert (a != c).any()


@pytest.mark.parametrize("method", ["group", "stratified_group"])
def test_groups_never_leak_across_folds(method):
    train = _digits_table()
    fold = assign_folds(train, FoldsConfig(k=4, seed=0, method=method))
    per_group = pd.Series(fold).groupby(train["group"].to_numpy()).nunique()
    assert (per_group == 1).all()
    assert len(set(fold)) == 4


def test_saved_folds_are_reused_and_rebuilt_when_train_changes(digits_train, tmp_path):
    config = FoldsConfig(k=3, seed=0)
    messages = []
    first = load_or_make_folds(digits_train, "tn", config, tmp_path, messages.append)
    path = folds_path("tn", config, tmp_path)
    assert path.name == "tn-3fold-s0.csv" and path.is_file()
    # a hand-edited fold file is kept while the train table matches: it is read, not remade
    saved = pd.read_csv(path, dtype=str)
    saved.loc[0, "fold"] = str((first[0] + 1) % 3)
    saved.to_csv(path, index=False)
    again = load_or_make_folds(digits_train, "tn", config, tmp_path, messages.append)
    assert again[0] == (first[0] + 1) % 3
    changed = digits_train.iloc[5:].reset_index(drop=True)
    rebuilt = load_or_make_folds(changed, "tn", config, tmp_path, messages.append)
    assert len(rebuilt) == len(changed)
    assert any("changed" in m for m in messages)


def test_too_few_images_per_class_is_a_clear_error(digits_train):
    tiny = digits_train.groupby("label").head(2).reset_index(drop=True)
    with pytest.raises(DataError, match=r"fewer images than folds\.k=5: 'digit_0' \(2\), "):
        assign_folds(tiny, FoldsConfig(k=5))


def test_group_method_needs_group_column(digits_train):
    from competition.errors import ConfigError

    with pytest.raises(ConfigError, match="group_column"):
        assign_folds(digits_train, FoldsConfig(method="group"))
    sizes = np.bincount(assign_folds(digits_train, FoldsConfig(k=2)))
    # stratified halves: each class splits to within one image, so the folds to within 10
    assert sizes.sum() == len(digits_train) and sizes.max() - sizes.min() <= 10


def test_each_method_has_its_own_file(tmp_path):
    names = {
        folds_path("c", FoldsConfig(k=5, seed=0, method=m), tmp_path).name
        for m in ("stratified", "group", "stratified_group")
    }
    assert names == {"c-5fold-s0.csv", "c-5fold-s0-group.csv", "c-5fold-s0-stratified_group.csv"}
