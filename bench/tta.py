"""Issue 11: TTA views and ``predict --tta auto`` on out-of-fold (OOF) predictions.

Trains (or resumes) a short fine-tune of every fold, with the identity view only, then runs
``competition predict RUN --tta auto``: every candidate view is predicted once by each fold's
model on that fold's validation rows, and greedy selection keeps a view only when the OOF metric
rises. Prints, for each TTA choice (identity; each candidate alone and added to identity; the
auto choice), the pooled OOF score, the nested score of the auto choice (views chosen without the
fold they score) and, where the competition has a labelled holdout, the holdout score of the
source run and of the auto run. Writes under ``runs/bench-tta-*`` (resumable) and the cache.

    .venv/bin/python bench/tta.py hymenoptera            # ~10 min on 2 CPU cores
    .venv/bin/python bench/tta.py trashnet               # ~40 min on 2 CPU cores
    .venv/bin/python bench/tta.py hymenoptera --quick    # smoke run: 64 px, 1 epoch
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from competition.config import load_config  # noqa: E402
from competition.cv import predict_run, run_cv  # noqa: E402
from competition.runs import RunRecord  # noqa: E402

#: Short CPU fine-tunes (head only: the recipe that fits a CPU and a deadline).
RECIPES = {
    "hymenoptera": ["data.image_size=160", "model.finetune=head", "optim.epochs=3"],
    "trashnet": ["data.image_size=128", "model.finetune=head", "optim.epochs=2", "optim.lr=0.003"],
    "cub50": [
        "data.image_size=128",
        "data.eval_image_size=160",
        "model.finetune=head",
        "optim.epochs=3",
        "optim.lr=0.003",
    ],
}
QUICK = ["data.image_size=64", "optim.epochs=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", choices=sorted(RECIPES))
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    parser.add_argument("--quick", action="store_true", help="64 px, 1 epoch: a smoke run")
    parser.add_argument("--candidates", default=None, help="YAML list (default: the built-in set)")
    parser.add_argument("--merge", default="mean_probs", choices=["mean_probs", "mean_logits"])
    args = parser.parse_args()

    name = f"bench-tta-{args.data}{'-quick' if args.quick else ''}"
    overrides = [*RECIPES[args.data], *(QUICK if args.quick else []), *args.overrides]
    overrides += [f"name={name}", "tta=[identity]"]
    config = load_config(REPO / "configs" / f"{args.data}.yaml", overrides)
    print(f"# {args.data}: {' '.join(overrides)}")
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    quiet = lambda *a: None  # noqa: E731

    started = time.perf_counter()
    source = run_cv(config, log=quiet)
    train_s = time.perf_counter() - started

    candidates = None
    if args.candidates:
        from competition.config import load_yaml

        candidates = load_yaml(args.candidates)
    started = time.perf_counter()
    auto = predict_run(
        REPO / "runs" / name,
        {"tta": "auto", "tta_merge": args.merge},
        log=print,
        candidates=candidates,
    )
    auto_s = time.perf_counter() - started
    summary = RunRecord.open(auto["run"]).produced_by["tta_auto"]
    metric = summary["metric"]

    print(
        f"\n## {args.data}: TTA choices on OOF ({metric}, {len(summary['folds'])} folds, "
        f"merged by {summary['merge']})\n"
    )
    print(f"| TTA | OOF {metric} alone | OOF with identity (round 1) |")
    print("|---|---|---|")
    print(f"| identity (the source run) | {summary['identity_oof']:.4f} | - |")
    for candidate, scores in summary["candidates"].items():
        first = scores["added_first"]
        first = "-" if first is None else f"{first:.4f}"
        print(f"| {candidate} | {scores['alone']:.4f} | {first} |")
    chosen = ", ".join(summary["chosen"])
    print(f"| **auto: [{chosen}]** | **{summary['oof']:.4f}** | - |")
    nested = summary.get("nested")
    print()
    print(
        f"source run: CV {source['mean']:.4f} ± {source['std']:.4f}, OOF {source['oof']:.4f}"
        + (f", holdout {source['lb']:.4f}" if "lb" in source else "")
    )
    print(
        f"auto run:   CV {auto['mean']:.4f} ± {auto['std']:.4f}, OOF {auto['oof']:.4f}"
        + (f", holdout {auto['lb']:.4f}" if "lb" in auto else "")
    )
    if nested:
        print(
            f"nested (views chosen on the other folds): fold mean {nested['mean']:.4f} vs "
            f"identity/source {nested['source_mean']:.4f}; per fold {nested['chosen']}"
        )
    verdict = "holds" if auto["oof"] >= source["oof"] - 1e-9 else "FAILS"
    print(
        f"target '--tta auto never lowers the OOF metric': {verdict} "
        f"({source['oof']:.4f} -> {auto['oof']:.4f})"
    )
    print(f"wall: train {train_s:.0f} s, predict --tta auto {auto_s:.0f} s")


if __name__ == "__main__":
    main()
