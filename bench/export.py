"""Size and speed of an offline inference bundle (``competition export``) on trashnet.

Trains (or reuses) a small EfficientNet-Lite0 run on ../shared/data/trashnet (ImageNet weights,
head-only, 1 epoch, 2 folds, TTA identity + hflip: the bundle's speed does not depend on how well
the run trained), exports it, runs the bundle's ``predict.py`` in a fresh isolated interpreter on
the 506 test images, and prints the bundle size, the time per 1,000 images and how far the
bundle's probabilities and submission are from the repository's.

    python bench/export.py                 # trains runs/bench-export-lite0 once, then reuses it
    python bench/export.py --run runs/X    # an existing run or blend instead

Outputs go to runs/ and .cache/bench-export/ (git-ignored).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from competition.config import REPO_ROOT, load_config
from competition.cv import run_cv
from competition.export import export
from competition.runs import RUNS_DIR, SUBMISSIONS_DIR, RunRecord

TRASHNET = REPO_ROOT.parent / "shared" / "data" / "trashnet"
RECIPE = [
    "name=bench-export-lite0",
    "folds.k=2",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "model.finetune=head",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="export this run instead of training the Lite0 one")
    args = parser.parse_args()
    if not TRASHNET.is_dir():
        sys.exit(f"needs {TRASHNET} (the shared data sets)")
    run_dir = Path(args.run) if args.run else RUNS_DIR / "bench-export-lite0"
    if not args.run:
        started = time.perf_counter()
        run_cv(load_config(REPO_ROOT / "configs" / "trashnet.yaml", RECIPE))
        print(f"run: {run_dir} ({time.perf_counter() - started:.0f} s to train or reuse)")
    record = RunRecord.open(run_dir)

    out = REPO_ROOT / ".cache" / "bench-export" / record.name
    started = time.perf_counter()
    summary = export([run_dir], out, force=True)
    export_s = time.perf_counter() - started
    networks = summary["networks"]

    data = record.config.data_root()
    cc = record.config.competition
    command = [
        sys.executable,
        "-I",
        str(out / "predict.py"),
        "--images",
        str(data / cc.test_images),
        "--sample-submission",
        str(data / cc.sample_submission),
        "--out",
        str(out.parent / f"{record.name}-submission.csv"),
        "--probs",
        str(out.parent / f"{record.name}-probs.csv"),
        "--device",
        "cpu",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=out.parent, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    inside = float(re.search(r"([\d.]+) s per 1,000", done.stdout).group(1))
    images = len(pd.read_csv(data / cc.sample_submission))

    probs = pd.read_csv(out.parent / f"{record.name}-probs.csv")[record.classes()].to_numpy()
    expected = np.mean([record.fold_probs(f, "test") for f in record.done_folds()], axis=0)
    gap = float(np.abs(probs - expected).max())
    ours = pd.read_csv(out.parent / f"{record.name}-submission.csv", dtype=str)
    suffix = "" if record.cv().get("complete", True) else ".partial"
    theirs = pd.read_csv(SUBMISSIONS_DIR / f"{record.name}{suffix}.csv", dtype=str)
    same_rows = ours.equals(theirs)

    size = summary["bytes"] / 2**20
    print(f"\nbundle {out}: {size:.1f} MiB, {networks} fold network(s) ({record.name})")
    print(f"export: {export_s:.1f} s (incl. the check on {8} test images)")
    print(
        f"predict.py on {images} images (cpu, {record.config.data.image_size} px, "
        f"{len(record.config.tta)} TTA views): {wall:.1f} s with interpreter start; "
        f"{inside:.0f} s per 1,000 images in the script "
        f"({inside / networks:.0f} s per fold network)"
    )
    print(f"max |p(bundle) - p(repository)|: {gap:.1e}; submission rows identical: {same_rows}")


if __name__ == "__main__":
    main()
