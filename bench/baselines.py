"""Issue 11: stronger frozen baselines: EfficientNet-Lite0/1/2, alone and concatenated.

For each data set, the embeddings of each backbone (``model.pretrained=efficientnet_liteN_imagenet``
all at ``data.image_size`` 224, centre crop 0.875) come from ``.cache/embeddings`` (computed on the
first run: minutes per backbone on 2 CPU cores); then 5-fold CV of ``competition baseline``:

* knn and ncm (defaults), linear with ``--C 1`` (the old default) and linear with C chosen by
  inner CV on each fold's train rows (the new default), for Lite0, Lite1, Lite2 alone and for the
  list ``[Lite0, Lite1, Lite2]`` (each backbone's block centred and L2-normalised, concatenated),
  or ``concat01`` = ``[Lite0, Lite1]``.

Runs are ``runs/bench-bl-<data>-<backbones>-<method>``: a re-run skips finished folds and runs, so
the script can be stopped and started again. Targets (issue 11): trashnet CV >= 0.89, cub50 CV >=
0.95 with frozen features only.

    .venv/bin/python bench/baselines.py                       # both data sets, every row
    .venv/bin/python bench/baselines.py --data cub50 --only concat
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from competition.baseline import BaselineOptions, run_baseline  # noqa: E402
from competition.config import load_config  # noqa: E402

DATASETS = ("trashnet", "cub50")
BACKBONES = {
    "lite0": (["tf_efficientnet_lite0"], ["efficientnet_lite0_imagenet"]),
    "lite1": (["tf_efficientnet_lite1"], ["efficientnet_lite1_imagenet"]),
    "lite2": (["tf_efficientnet_lite2"], ["efficientnet_lite2_imagenet"]),
    "concat01": (
        ["tf_efficientnet_lite0", "tf_efficientnet_lite1"],
        ["efficientnet_lite0_imagenet", "efficientnet_lite1_imagenet"],
    ),
    "concat": (
        ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"],
        [
            "efficientnet_lite0_imagenet",
            "efficientnet_lite1_imagenet",
            "efficientnet_lite2_imagenet",
        ],
    ),
}
RECIPES = {
    "knn": BaselineOptions(method="knn"),
    "ncm": BaselineOptions(method="ncm"),
    "linear C=1": BaselineOptions(method="linear", C=1.0),
    "linear C by inner CV": BaselineOptions(method="linear"),
}


def overrides(dataset: str, label: str) -> list[str]:
    names, weights = BACKBONES[label]
    one = len(names) == 1
    return [
        f"name=bench-bl-{dataset}-{label}",
        "data.image_size=224",
        f"model.backbone={names[0] if one else '[' + ', '.join(names) + ']'}",
        f"model.pretrained={weights[0] if one else '[' + ', '.join(weights) + ']'}",
    ]


def row(dataset: str, label: str, recipe: str, quiet, folds=None) -> dict:
    config = load_config(REPO / "configs" / f"{dataset}.yaml", overrides(dataset, label))
    tick = time.perf_counter()
    cv = run_baseline(config, RECIPES[recipe], folds=folds, log=quiet)
    chosen = [
        json.loads((Path(cv["run"]) / f"fold_{k}" / "result.json").read_text())["info"].get("C")
        for k in cv["folds_done"]
    ]
    return {
        "dataset": dataset,
        "backbones": label,
        "recipe": recipe,
        "cv": cv["mean"],
        "std": cv["std"],
        "folds": f"{len(cv['folds'])}/{cv['k']}",
        "C": chosen if any(c is not None for c in chosen) else None,
        "dims": cv["embeddings"]["dims"],
        "embed_s": cv["embeddings"]["seconds"],
        "seconds": time.perf_counter() - tick,
        "run": cv["run"],
    }


HEADER = (
    "| data | backbones | recipe | folds | CV accuracy | C per fold | dims | wall s |\n"
    "|---|---|---|---|---|---|---|---|"
)


def line(r: dict) -> str:
    c = "-" if r["C"] is None else ", ".join(f"{v:g}" for v in r["C"])
    dims = "+".join(str(d) for d in r["dims"])
    return (
        f"| {r['dataset']} | {r['backbones']} | {r['recipe']} | {r['folds']} | "
        f"{r['cv']:.4f} ± {r['std']:.3f} | {c} | {dims} | {r['seconds']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument(
        "--only", nargs="+", default=["lite0", "lite1", "lite2", "concat"], choices=list(BACKBONES)
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="only these folds")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"{datetime.date.today()}  {platform.machine()}  {os.cpu_count()} CPUs  torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads)  load average {load[0]:.1f}",
        flush=True,
    )
    print(HEADER, flush=True)
    rows, started = [], time.perf_counter()
    # the concatenation and the new default first: the rows the targets are about
    plan = sorted(
        ((label, recipe) for label in args.only for recipe in args.recipes),
        key=lambda p: (
            not p[0].startswith("concat"),
            p[1] not in ("linear C by inner CV", "knn"),
            p,
        ),
    )
    for dataset in args.data:
        for label, recipe in plan:
            rows.append(row(dataset, label, recipe, lambda *a: None, args.folds))
            print(line(rows[-1]), flush=True)
    print(
        f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; load average at end "
        f"{os.getloadavg()[0]:.1f}"
    )
    out = REPO / "runs" / "bench-baselines.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"rows saved to {out}")


if __name__ == "__main__":
    main()
