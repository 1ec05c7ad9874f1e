"""Folds: stratification, no group leak, determinism, reuse and rebuild of the saved file."""

import numpy as np
import pandas as pd
import pytest

from competition.config import FoldsConfig, load_config
from competition.data import read_competition
from competition.errors import DataError
from competition.folds import assign_folds, folds_path, load_or_make_folds
from tests.conftest import CUB50, TRASHNET


@pytest.fixture(scope="module")
def trashnet_train():
    config = load_config(
        None,
        [
            f"competition.root={TRASHNET}",
            "competition.id_column=image_id",
            "competition.image_pattern={id}.jpg",
        ],
    )
    return read_competition(config).train


def test_stratified_folds_keep_class_shares(trashnet_train):
    fold = assign_folds(trashnet_train, FoldsConfig(k=5, seed=1))
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    shares = pd.crosstab(trashnet_train["label"], fold, normalize="columns")
    overall = trashnet_train["label"].value_counts(normalize=True)
    # every fold's class share is within 1.5 points of the whole set's
    assert (shares.sub(overall, axis=0).abs() < 0.015).all().all()


def test_folds_are_deterministic_and_seeded(trashnet_train):
    a = assign_folds(trashnet_train, FoldsConfig(k=5, seed=1))
    b = assign_folds(trashnet_train, FoldsConfig(k=5, seed=1))
    c = assign_folds(trashnet_train, FoldsConfig(k=5, seed=2))
    assert (a == b).all()
    assert (a != c).any()


@pytest.mark.parametrize("method", ["group", "stratified_group"])
def test_groups_never_leak_across_folds(method):
    labels = pd.read_csv(CUB50 / "labels.csv", dtype=str)
    classes = sorted(set(labels["species"]))
    train = pd.DataFrame(
        {
            "id": labels["image_id"],
            "label": labels["species"],
            "target": labels["species"].map({c: i for i, c in enumerate(classes)}),
            # a real grouping: species x original split flag
            "group": labels["species"] + "/" + labels["split_flag"],
        }
    )
    fold = assign_folds(train, FoldsConfig(k=4, seed=0, method=method))
    per_group = pd.Series(fold).groupby(train["group"].to_numpy()).nunique()
    assert (per_group == 1).all()
    assert len(set(fold)) == 4


def test_saved_folds_are_reused_and_rebuilt_when_train_changes(trashnet_train, tmp_path):
    config = FoldsConfig(k=3, seed=0)
    messages = []
    first = load_or_make_folds(trashnet_train, "tn", config, tmp_path, messages.append)
    path = folds_path("tn", config, tmp_path)
    assert path.name == "tn-3fold-s0.csv" and path.is_file()
    # a hand-edited fold file is kept while the train table matches: it is read, not remade
    saved = pd.read_csv(path, dtype=str)
    saved.loc[0, "fold"] = str((first[0] + 1) % 3)
    saved.to_csv(path, index=False)
    again = load_or_make_folds(trashnet_train, "tn", config, tmp_path, messages.append)
    assert again[0] == (first[0] + 1) % 3
    changed = trashnet_train.iloc[5:].reset_index(drop=True)
    rebuilt = load_or_make_folds(changed, "tn", config, tmp_path, messages.append)
    assert len(rebuilt) == len(changed)
    assert any("changed" in m for m in messages)


def test_too_few_images_per_class_is_a_clear_error(trashnet_train):
    tiny = trashnet_train.groupby("label").head(2).reset_index(drop=True)
    with pytest.raises(DataError, match=r"fewer than folds\.k=5"):
        assign_folds(tiny, FoldsConfig(k=5))


def test_group_method_needs_group_column(trashnet_train):
    from competition.errors import ConfigError

    with pytest.raises(ConfigError, match="group_column"):
        assign_folds(trashnet_train, FoldsConfig(method="group"))
    assert np.bincount(assign_folds(trashnet_train, FoldsConfig(k=2))).min() > 900


def test_each_method_has_its_own_file(tmp_path):
    names = {
        folds_path("c", FoldsConfig(k=5, seed=0, method=m), tmp_path).name
        for m in ("stratified", "group", "stratified_group")
    }
    assert names == {"c-5fold-s0.csv", "c-5fold-s0-group.csv", "c-5fold-s0-stratified_group.csv"}
