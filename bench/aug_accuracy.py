"""Accuracy with and without batch augmentation on cub50 (issue 3), through the real CV runner.

Four recipes, identical but for ``augment.batch``:

* ``none``: no batch augmentation;
* ``mix``: mixup (Zhang et al. 2018; alpha 0.2, p 0.5) then cutmix (Yun et al. 2019; alpha 1,
  p 0.5);
* ``policy``: a kornia policy, TrivialAugment (Müller & Hutter 2021) or RandAugment (Cubuk et al.
  2020);
* ``both``: the policy, then mixup and cutmix.

Each trains fold 0 of cub50's 5-fold split with ``competition.cv.run_cv`` (pretrained
tf_efficientnet_lite0, last stages fine-tuned) and reports the OOF accuracy and log loss of fold 0
(best epoch by validation accuracy, predicted with the config's TTA) and the wall time. Runs live in
``.cache/bench/aug_accuracy/<settings>/`` (never ``runs/``), so a killed benchmark resumes.

Usage (from the repo root)::

    .venv/bin/python bench/aug_accuracy.py                        # ~25 min on 2 CPU cores
    .venv/bin/python bench/aug_accuracy.py --configs none mix --epochs 1 --size 96   # a probe
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from competition.config import load_config, replace  # noqa: E402
from competition.cv import run_cv  # noqa: E402
from competition.metrics import get_metric  # noqa: E402

MIX = [
    {"name": "mixup", "params": {"alpha": 0.2, "p": 0.5}},
    {"name": "cutmix", "params": {"alpha": 1.0, "p": 0.5}},
]
POLICIES = {
    "trivialaugment": {"name": "trivialaugment", "params": {}},
    "randaugment": {"name": "randaugment", "params": {"n": 2, "m": 9}},
}


def recipes(policy: str) -> dict[str, list[dict]]:
    return {
        "none": [],
        "mix": MIX,
        "policy": [POLICIES[policy]],
        "both": [POLICIES[policy], *MIX],
    }


def markdown(frame: pd.DataFrame) -> str:
    """A markdown table (no tabulate dependency)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.values]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cub50")
    parser.add_argument("--configs", nargs="+", default=["none", "mix", "policy", "both"])
    parser.add_argument("--policy", choices=sorted(POLICIES), default="trivialaugment")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--last-n", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix-off-last-epochs", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 on a busy CPU)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "aug_accuracy")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = (
        f"{args.size}px-{args.epochs}ep-last{args.last_n}-lr{args.lr:g}-fold{args.fold}"
        f"-seed{args.seed}-mixoff{args.mix_off_last_epochs}"
    )
    base_dir = args.out / settings
    overrides = [
        f"competition.root={args.data.resolve()}",
        f"seed={args.seed}",
        f"device={args.device}",
        f"data.image_size={args.size}",
        "model.backbone=tf_efficientnet_lite0",
        "model.pretrained=efficientnet_lite0_imagenet",
        "model.finetune=last_n",
        f"model.last_n={args.last_n}",
        f"optim.lr={args.lr}",
        f"optim.epochs={args.epochs}",
        f"augment.mix_off_last_epochs={args.mix_off_last_epochs}",
    ]
    base = load_config(ROOT / "configs" / "cub50.yaml", overrides)
    all_recipes = recipes(args.policy)
    log_loss = get_metric("log_loss")
    print(
        f"torch threads {torch.get_num_threads()}; settings: {settings}; "
        f"{base.folds.k}-fold split, fold {args.fold}; runs in {base_dir}"
    )
    rows = []
    for label in args.configs:
        batch = all_recipes[label]
        name = f"aug-{label}" + (f"-{args.policy}" if label in ("policy", "both") else "")
        config = replace(base, {"name": name, "augment.batch": batch})
        started = time.perf_counter()
        cv = run_cv(
            config,
            folds=[args.fold],
            runs_dir=base_dir / "runs",
            folds_dir=base_dir / "folds",
            submissions_dir=base_dir / "submissions",
            log=lambda *a, **k: None,
        )
        wall = time.perf_counter() - started
        oof = pd.read_csv(base_dir / "runs" / name / "oof.csv", dtype={"id": str})
        classes = [c for c in oof.columns if c not in ("id", "fold", "target")]
        probs, targets = oof[classes].to_numpy(), oof["target"].to_numpy()
        history = pd.read_csv(base_dir / "runs" / name / f"fold_{args.fold}" / "log.csv")
        row = {
            "config": label,
            "batch augment": " + ".join(b["name"] for b in batch) or "-",
            "accuracy": cv["oof"],
            "log loss": log_loss(targets, probs),
            "last-epoch val acc": float(history["val_accuracy"].iloc[-1]),
            "best epoch": int(history["val_accuracy"].idxmax()) + 1,
            "train img/s": float(history["train_images_per_s"].mean()),
            "wall s": wall,
        }
        rows.append(row)
        print(
            f"{label}: accuracy {row['accuracy']:.4f}, log loss {row['log loss']:.4f}, "
            f"{wall:.0f} s (cv seconds {cv['seconds']})",
            flush=True,
        )
    frame = pd.DataFrame(rows)
    if "none" in set(frame["config"]):
        reference = frame.loc[frame["config"] == "none", "accuracy"].iloc[0]
        frame["vs none (points)"] = 100 * (frame["accuracy"] - reference)
    n_valid = int(np.sum(targets >= 0))
    print(
        f"\ncub50 fold {args.fold} ({n_valid} validation images, 1 image = "
        f"{100 / n_valid:.2f} points), {settings}, policy {args.policy}"
    )
    print(markdown(frame))


if __name__ == "__main__":
    main()
