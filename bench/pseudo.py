"""Issue 13: the CV gain of pseudo-labels (``competition pseudo``) on cub50 and trashnet.

Per data set: a source run (EfficientNet-Lite0, ImageNet weights, linear probe: ``finetune=head``,
small images, a few epochs: what this shared 2-core CPU affords), then two pseudo-label runs from
its fold ensemble, hard and soft labels, at one threshold. The threshold is the median fold-mean
confidence on the unlabelled images (chosen without labels), so about half of them are taken.

* trashnet: a class-stratified subset of train.csv as the labelled set, the real test set (labels
  withheld) as the unlabelled images.
* cub50 has no test set: a class-stratified part of labels.csv is the labelled set, another part
  the unlabelled images (their labels kept aside as ``solution.csv``, so the LB column scores the
  fold ensemble on exactly the images that were pseudo-labelled).

Everything goes under ``runs/bench-pseudo`` and ``.cache/bench-pseudo`` (cleared first).

    .venv/bin/python bench/pseudo.py            # ~30 min on 2 cores shared with other jobs
    .venv/bin/python bench/pseudo.py --quick    # smoke: a few images per class, 2 folds (~15 min)
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from competition.config import load_config  # noqa: E402
from competition.cv import run_cv  # noqa: E402
from competition.pseudo import fold_ensemble, pseudo_run  # noqa: E402
from competition.runs import RunRecord  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "runs" / "bench-pseudo"
CACHE = REPO / ".cache" / "bench-pseudo" / "images"
RECIPE = [
    "model.finetune=head",
    "model.drop_rate=0.0",
    "optim.lr=0.01",
    "optim.warmup_epochs=0",
    "tta=[identity]",
    "data.num_workers=2",
    f"data.cache_dir={CACHE}",
]


def stratified(table: pd.DataFrame, label: str, n: int, seed: int, skip: int = 0) -> pd.DataFrame:
    """``n`` rows per class after the first ``skip`` (rows shuffled with ``seed``)."""
    shuffled = table.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby(label).cumcount()
    return shuffled[(rank >= skip) & (rank < skip + n)].sort_index()


def trashnet_data(per_class: int, data_dir: Path) -> list[str]:
    root = SHARED / "trashnet"
    train = pd.read_csv(root / "train.csv", dtype=str)
    subset = stratified(train, "label", per_class, seed=0)
    data_dir.mkdir(parents=True, exist_ok=True)
    subset.to_csv(data_dir / "train.csv", index=False)
    return [f"competition.train_csv={data_dir / 'train.csv'}"]


def cub50_data(per_class: int, pool: int, data_dir: Path) -> list[str]:
    root = SHARED / "cub50"
    table = pd.read_csv(root / "labels.csv", dtype=str)[["image_id", "species"]]
    labelled = stratified(table, "species", per_class, seed=0)
    unlabelled = stratified(table, "species", pool, seed=0, skip=per_class)
    data_dir.mkdir(parents=True, exist_ok=True)
    labelled.to_csv(data_dir / "train.csv", index=False)
    unlabelled.to_csv(data_dir / "solution.csv", index=False)
    unlabelled.assign(species=labelled["species"].iloc[0]).to_csv(
        data_dir / "sample_submission.csv", index=False
    )
    return [
        f"competition.root={data_dir}",
        "competition.train_csv=train.csv",
        f"competition.train_images={root / 'images'}",
        f"competition.test_images={root / 'images'}",
        "competition.sample_submission=sample_submission.csv",
        "competition.solution_csv=solution.csv",
    ]


def run_one(name: str, config_file: str, data: list[str], settings: list[str], paths: dict):
    config = load_config(REPO / "configs" / config_file, [f"name={name}", *data, *settings])
    started = time.perf_counter()
    source = run_cv(config, log=lambda *_: None, **paths)
    rows = [("source", source, None, time.perf_counter() - started)]
    record = RunRecord.open(paths["runs_dir"] / name)
    confidence = fold_ensemble(record).max(1)
    threshold = round(float(np.median(confidence)), 2)
    for soft in (False, True):
        started = time.perf_counter()
        cv = pseudo_run(record.path, threshold, soft=soft, log=lambda *_: None, **paths)
        rows.append(("soft" if soft else "hard", cv, cv["pseudo"], time.perf_counter() - started))
    return threshold, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 2 folds")
    parser.add_argument("--only", choices=["trashnet", "cub50"], help="one data set")
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.rmtree(CACHE.parent, ignore_errors=True)
    paths = {"runs_dir": OUT, "folds_dir": OUT / "folds", "submissions_dir": OUT / "submissions"}
    quick = args.quick
    size, epochs, k = (64, 1, 2) if quick else (96, 2, 3)
    settings = [*RECIPE, f"data.image_size={size}", f"optim.epochs={epochs}", f"folds.k={k}"]
    plans = {
        "trashnet": ("trashnet.yaml", lambda d: trashnet_data(6 if quick else 40, d)),
        "cub50": ("cub50.yaml", lambda d: cub50_data(3 if quick else 10, 2 if quick else 6, d)),
    }
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; EfficientNet-Lite0 (ImageNet), finetune=head, {size} px, "
        f"{epochs} epochs, {k}-fold CV, TTA identity"
    )
    print(
        "| data set | labelled / unlabelled | run | threshold | taken | CV accuracy | gain | "
        "LB on the unlabelled | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (config_file, make) in plans.items():
        if args.only and name != args.only:
            continue
        data = make(OUT / "data" / name)
        threshold, rows = run_one(f"bench-pseudo-{name}", config_file, data, settings, paths)
        source_cv = rows[0][1]
        record = RunRecord.open(OUT / f"bench-pseudo-{name}")
        labelled, unlabelled = len(record.oof()), len(fold_ensemble(record))
        for label, cv, pseudo, seconds in rows:
            gain = "" if label == "source" else f"{cv['mean'] - source_cv['mean']:+.4f}"
            taken = "" if pseudo is None else f"{pseudo['taken']} of {pseudo['of']}"
            if pseudo is not None:
                counts = list(pseudo["per_class"].values())
                taken += f" (per class {min(counts)}-{max(counts)})"
            lb = f"{cv['lb']:.4f}" if "lb" in cv else "-"
            print(
                f"| {name} | {labelled} / {unlabelled} | {label} | "
                f"{'' if label == 'source' else threshold} | {taken} | "
                f"{cv['mean']:.4f} ± {cv['std']:.4f} | {gain} | {lb} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
