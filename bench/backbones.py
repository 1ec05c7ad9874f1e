"""Issue 4: frozen-feature baselines vs head-only and last-stage fine-tuning, EfficientNet-Lite0.

Baselines (``competition baseline``: k-NN, NCM, logistic regression on cached embeddings) run
twice, the first time from an empty cache (decode + extraction), the second from the cache.
Fine-tuning runs ``competition train`` with ``model.finetune=head`` and ``model.finetune=last_n
model.last_n=1`` on fold 0, at the resolutions below (CPU time). Everything writes under
``runs/bench-*`` and ``.cache/bench-backbones`` (both cleared first), not the user's runs or
caches.

    .venv/bin/python bench/backbones.py            # the full CPU run (~30 min on 2 cores)
    .venv/bin/python bench/backbones.py --quick    # smoke run (~1-2 min): hymenoptera at 64 px
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from competition.baseline import METHODS, BaselineOptions, run_baseline  # noqa: E402
from competition.config import load_config  # noqa: E402

CACHE = ".cache/bench-backbones/images"  # --cache-dir .cache/images shares the user's caches
WEIGHTS = ["model.backbone=tf_efficientnet_lite0", "model.pretrained=efficientnet_lite0_imagenet"]

# (data set, size, extra overrides, fine-tuning runs: (label, overrides))
FULL = {
    "hymenoptera": {
        "baseline": ["data.image_size=224"],
        "finetune": [
            ("head", ["model.finetune=head", "data.image_size=224", "optim.epochs=5"]),
            (
                "last_n=1",
                [
                    "model.finetune=last_n",
                    "model.last_n=1",
                    "data.image_size=224",
                    "optim.epochs=5",
                ],
            ),
        ],
    },
    "cub50": {
        "baseline": ["data.image_size=224"],
        "finetune": [
            (
                "head",
                [
                    "model.finetune=head",
                    "data.image_size=128",
                    "data.eval_image_size=160",
                    "optim.epochs=3",
                ],
            ),
            (
                "last_n=1",
                [
                    "model.finetune=last_n",
                    "model.last_n=1",
                    "data.image_size=128",
                    "data.eval_image_size=160",
                    "optim.epochs=3",
                ],
            ),
        ],
    },
}
QUICK = {
    "hymenoptera": {
        "baseline": ["data.image_size=64", "folds.k=2"],
        "finetune": [("head", ["model.finetune=head", "data.image_size=64", "optim.epochs=1"])],
    }
}
FINETUNE_FOLDS = "0"


def baselines(dataset: str, extra: list[str], cache: str, quiet) -> list[dict]:
    overrides = [f"name=bench-{dataset}", f"data.cache_dir={cache}", *WEIGHTS, *extra]
    for method in METHODS:
        shutil.rmtree(REPO / "runs" / f"bench-{dataset}-{method}", ignore_errors=True)
    config = load_config(REPO / "configs" / f"{dataset}.yaml", overrides)
    rows = []
    for method in METHODS:
        options = BaselineOptions(method=method)
        times = []
        for _ in range(2):  # first: whatever is not cached yet; second: all from the cache
            tick = time.perf_counter()
            cv = run_baseline(config, options, log=quiet)
            times.append(time.perf_counter() - tick)
        rows.append(
            {
                "dataset": dataset,
                "recipe": f"{method} (frozen, {config.data.image_size} px)",
                "cv": cv["mean"],
                "cv_std": cv["std"],
                "folds": f"{len(cv['folds'])}/{cv['k']}",
                "lb": cv.get("lb"),
                "lb_full": cv.get("lb_full"),
                "seconds": times[0],
                "seconds_cached": times[1],
                "settings": " ".join(extra) + f" {options}",
            }
        )
        print(_line(rows[-1]), flush=True)
    return rows


def finetune(dataset: str, label: str, extra: list[str], cache: str) -> dict:
    name = f"bench-{dataset}-{label.replace('=', '')}"
    shutil.rmtree(REPO / "runs" / name, ignore_errors=True)
    command = [
        str(REPO / ".venv" / "bin" / "competition"),
        "train",
        f"configs/{dataset}.yaml",
        f"name={name}",
        f"data.cache_dir={cache}",
        *WEIGHTS,
        *extra,
        "--folds",
        FINETUNE_FOLDS,
    ]
    tick = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cv = json.loads((REPO / "runs" / name / "cv.json").read_text())
    row = {
        "dataset": dataset,
        "recipe": f"fine-tune {label}",
        "cv": cv["mean"],
        "cv_std": cv["std"],
        "folds": f"{len(cv['folds'])}/{cv['k']}",
        "lb": cv.get("lb"),
        "lb_full": None,
        "seconds": seconds,
        "seconds_cached": None,
        "settings": " ".join(extra) + f" --folds {FINETUNE_FOLDS}",
    }
    print(_line(row), flush=True)
    return row


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def _line(row: dict) -> str:
    return (
        f"| {row['dataset']} | {row['recipe']} | {row['folds']} | {_fmt(row['cv'])} "
        f"± {_fmt(row['cv_std'], '.3f')} | {_fmt(row['lb'])} | {_fmt(row['lb_full'])} "
        f"| {_fmt(row['seconds'], '.0f')} | {_fmt(row['seconds_cached'], '.1f')} |"
    )


HEADER = (
    "| data | recipe | folds | CV accuracy | LB (fold mean) | LB (fit on all train) "
    "| wall s | wall s, cached |\n|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: hymenoptera at 64 px")
    parser.add_argument("--no-finetune", action="store_true", help="baselines only")
    parser.add_argument(
        "--keep-cache", action="store_true", help="do not clear .cache/bench-backbones"
    )
    parser.add_argument("--cache-dir", default=CACHE, help=f"image cache (default {CACHE})")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if not args.keep_cache and args.cache_dir == CACHE:
        shutil.rmtree((REPO / CACHE).parent, ignore_errors=True)
    started = time.perf_counter()
    load = os.getloadavg()
    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}  "
        f"{os.cpu_count()} CPUs  torch {torch.__version__} ({torch.get_num_threads()} threads)  "
        f"load average at start {load[0]:.1f}",
        flush=True,
    )
    print(HEADER, flush=True)
    rows = []
    for dataset, spec in plan.items():
        rows += baselines(dataset, spec["baseline"], args.cache_dir, quiet=lambda *a: None)
    if not args.no_finetune:
        for dataset, spec in plan.items():
            for label, extra in spec["finetune"]:
                rows.append(finetune(dataset, label, extra, args.cache_dir))
    total = time.perf_counter() - started
    print(f"\ntotal {total / 60:.1f} min; load average at end {os.getloadavg()[0]:.1f}")
    print("\n" + HEADER)
    print("\n".join(_line(r) for r in rows))
    out = REPO / "runs" / ("bench-backbones-quick.json" if args.quick else "bench-backbones.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "minutes": total / 60, "load": load}, indent=2))
    print(f"rows saved to {out}")


if __name__ == "__main__":
    main()
