"""The built-in demo: scikit-learn's handwritten digits as a small Kaggle-style competition.

``competition demo`` writes train.csv + train/*.png, test/*.png, sample_submission.csv and a
solution.csv kept aside (scored locally as "LB"), then runs ``configs/demo.yaml`` on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from competition.config import REPO_ROOT, load_config
from competition.io import write_csv

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def build_digits_competition(root: Path, test_size: float = 0.2, seed: int = 0) -> Path:
    """Write the digits competition under ``root`` (idempotent); return ``root``."""
    root = Path(root)
    if (root / "solution.csv").is_file():
        return root
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # 8x8, values 0..16
    labels = np.array([f"digit_{d}" for d in digits.target])
    ids = np.array([f"d{i:04d}" for i in range(len(labels))])
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    for split, index in (("train", train_idx), ("test", test_idx)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in index:
            Image.fromarray(images[i], mode="L").save(root / split / f"{ids[i]}.png")
    write_csv(root / "train.csv", pd.DataFrame({"id": ids[train_idx], "label": labels[train_idx]}))
    write_csv(
        root / "sample_submission.csv",
        pd.DataFrame({"id": ids[test_idx], "label": labels[train_idx][0]}),
    )
    write_csv(root / "solution.csv", pd.DataFrame({"id": ids[test_idx], "label": labels[test_idx]}))
    return root


def run_demo(overrides: list[str] | None = None) -> dict:
    from competition.cv import run_cv
    from competition.runs import summary_table

    config = load_config(DEMO_CONFIG, overrides)
    root = build_digits_competition(config.data_root())
    print(f"demo competition: {root}")
    cv = run_cv(config)
    print(summary_table(cv))
    return cv
