"""Shared fixtures: the real data sets in ../shared/data and small competitions cut from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from competition.config import REPO_ROOT, load_config

SHARED = REPO_ROOT.parent / "shared" / "data"
TRASHNET = SHARED / "trashnet"
HYMENOPTERA = SHARED / "hymenoptera"
CUB50 = SHARED / "cub50"


@pytest.fixture(scope="session")
def trashnet_small(tmp_path_factory) -> Path:
    """A Kaggle-layout slice of trashnet: 8 train images per class and 12 test images."""
    root = tmp_path_factory.mktemp("trashnet_small")
    train = pd.read_csv(TRASHNET / "train.csv", dtype=str)
    train = train.groupby("label", group_keys=False).head(8).reset_index(drop=True)
    sample = pd.read_csv(TRASHNET / "sample_submission.csv", dtype=str).head(12)
    (root / "train").mkdir()
    (root / "test").mkdir()
    for image_id in train["image_id"]:
        shutil.copy(TRASHNET / "train" / f"{image_id}.jpg", root / "train")
    for image_id in sample["image_id"]:
        shutil.copy(TRASHNET / "test" / f"{image_id}.jpg", root / "test")
    train.to_csv(root / "train.csv", index=False)
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Settings for a seconds-long CPU run: a tiny timm model at 32 px, one epoch, no workers."""
    return [
        "model.backbone=resnet10t",
        "model.pretrained=null",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


@pytest.fixture
def run_paths(tmp_path) -> dict:
    """Run, fold and submission folders inside the test's temp dir (never the repo's)."""
    return {
        "runs_dir": tmp_path / "runs",
        "folds_dir": tmp_path / "folds",
        "submissions_dir": tmp_path / "submissions",
    }


def trashnet_config(root: Path, tmp_path: Path, *extra: str):
    return load_config(
        REPO_ROOT / "configs" / "trashnet.yaml",
        [f"competition.root={root}", "folds.k=2", "name=t", *tiny_overrides(tmp_path), *extra],
    )
