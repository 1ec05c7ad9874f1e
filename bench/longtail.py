"""Long-tailed benchmark: CE against every imbalance method of the template, by balanced accuracy.

Builds long-tailed versions of real data deterministically (an exponential profile
``n_j = n_max * ratio^(-j / (K - 1))`` on the training side only, class ``j`` in sorted label
order; the evaluation side kept balanced, as Cao et al. 2019 and Kang et al. 2020 do):

* ``digits``: scikit-learn's handwritten digits, 150 of each class for training (ratio 50: 150
  down to 3), the rest cut to the smallest class (24) for evaluation; resnet10t from scratch,
  32 px.
* ``cub50``: cub50's ``split_flag`` 1 for training (ratio 10), 0 for evaluation (balanced);
  frozen EfficientNet-Lite0 features (``model.finetune=head``) at 128 px.
* ``trashnet``: as it is (naturally imbalanced); scored on K-fold OOF only (test labels withheld).

Each method is a run: training runs (a loss, DRW, a sampler) and runs made from the CE run
(post-hoc adjustment, each decoupling step). Printed per run: CV balanced accuracy on the
long-tailed OOF rows, "eval" balanced accuracy on the balanced evaluation set (the fold mean, as
a submission would be), and wall time. Everything goes under ``.cache/longtail/`` (git-ignored).

    python bench/longtail.py digits
    python bench/longtail.py cub50 --k 2 --methods ce,ldam_drw,adjust,crt,tau_norm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from competition.config import REPO_ROOT, load_config

SHARED = REPO_ROOT.parent / "shared" / "data"
OUT = REPO_ROOT / ".cache" / "longtail"

TRAINED = {
    "ce": ["loss.name=cross_entropy"],
    "focal": ["loss.name=focal"],
    "class_balanced": ["loss.name=class_balanced", "loss.params={beta: 0.9999}"],
    "logit_adjusted": ["loss.name=logit_adjusted"],
    "balanced_softmax": ["loss.name=balanced_softmax"],
    "ldam": ["loss.name=ldam", "loss.params={s: 1.0}"],
    "ldam_drw": ["loss.name=ldam_drw", "loss.params={s: 1.0}"],
    "ce_drw": ["loss.name=ce_drw"],
    "sampler_cb": ["data.sampler.name=class_balanced"],
    "sampler_sqrt": ["data.sampler.name=square_root"],
    "sampler_progressive": ["data.sampler.name=progressively_balanced"],
}
DERIVED = ("adjust", "adjust_tau1", "crt", "tau_norm", "tau_norm_folds", "lws", "ncm")
ALL = (*TRAINED, *DERIVED)


def profile(n_max: int, ratio: float, classes: int, floor: int) -> list[int]:
    """Exponential long-tail counts, largest first, each at least ``floor`` (= folds.k)."""
    return [max(floor, round(n_max * ratio ** (-j / (classes - 1)))) for j in range(classes)]


def long_tail(labels: np.ndarray, train: np.ndarray, ratio: float, floor: int, seed: int = 0):
    """Indices: a long-tailed subset of ``train`` rows and a balanced cut of the others."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    train_rows = {c: rng.permutation(np.flatnonzero(train & (labels == c))) for c in classes}
    eval_rows = {c: rng.permutation(np.flatnonzero(~train & (labels == c))) for c in classes}
    counts = profile(min(len(r) for r in train_rows.values()), ratio, len(classes), floor)
    n_eval = min(len(r) for r in eval_rows.values())
    picked = np.concatenate([train_rows[c][:n] for c, n in zip(classes, counts, strict=True)])
    held = np.concatenate([eval_rows[c][:n_eval] for c in classes])
    return np.sort(picked), np.sort(held), counts, n_eval


def _write_tables(root: Path, ids, labels, train_idx, eval_idx) -> None:
    pd.DataFrame({"id": ids[train_idx], "label": labels[train_idx]}).to_csv(
        root / "train.csv", index=False
    )
    pd.DataFrame({"id": ids[eval_idx], "label": labels[train_idx][0]}).to_csv(
        root / "sample_submission.csv", index=False
    )
    pd.DataFrame({"id": ids[eval_idx], "label": labels[eval_idx]}).to_csv(
        root / "solution.csv", index=False
    )


def build_digits(root: Path, k: int, ratio: float = 50.0) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.array([f"digit_{d}" for d in digits.target])
    ids = np.array([f"d{i:04d}" for i in range(len(labels))])
    rng = np.random.default_rng(1)
    train = np.zeros(len(labels), dtype=bool)
    for c in sorted(set(labels)):  # 150 of each class (174-183) are the training side
        rows = rng.permutation(np.flatnonzero(labels == c))
        train[rows[:150]] = True
    train_idx, eval_idx, counts, n_eval = long_tail(labels, train, ratio, k)
    if not (root / "solution.csv").is_file():
        images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        for i in np.concatenate([train_idx, eval_idx]):
            Image.fromarray(images[i], mode="L").save(root / "images" / f"{ids[i]}.png")
        _write_tables(root, ids, labels, train_idx, eval_idx)
    return {"train_counts": counts, "eval_per_class": n_eval}


def build_cub50(root: Path, k: int, ratio: float = 10.0) -> dict:
    table = pd.read_csv(SHARED / "cub50" / "labels.csv", dtype=str)
    labels, ids = table["species"].to_numpy(), table["image_id"].to_numpy()
    train_idx, eval_idx, counts, n_eval = long_tail(
        labels, table["split_flag"].to_numpy() == "1", ratio, k
    )
    if not (root / "solution.csv").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _write_tables(root, ids, labels, train_idx, eval_idx)
    return {"train_counts": counts, "eval_per_class": n_eval}


def overrides(dataset: str, root: Path, k: int) -> tuple[str, list[str]]:
    common = [
        f"competition.name=lt-{dataset}-k{k}",
        "metric=balanced_accuracy",
        f"folds.k={k}",
        "loss.params={}",
        f"data.cache_dir={OUT / 'cache' / 'images'}",
    ]
    if dataset == "digits":
        return str(REPO_ROOT / "configs" / "demo.yaml"), [
            *common,
            f"competition.root={root}",
            "competition.train_images=images",
            "competition.test_images=images",
            "data.batch_size=16",
            "optim.epochs=30",
            "optim.lr=0.003",
        ]
    if dataset == "cub50":
        images = SHARED / "cub50" / "images"
        return str(REPO_ROOT / "configs" / "cub50.yaml"), [
            *common,
            f"competition.root={root}",
            "competition.train_csv=train.csv",
            "competition.id_column=id",
            "competition.label_column=label",
            f"competition.train_images={images}",
            f"competition.test_images={images}",
            "competition.sample_submission=sample_submission.csv",
            "competition.solution_csv=solution.csv",
            "model.finetune=head",
            "model.drop_rate=0.0",
            "data.image_size=128",
            "optim.lr=0.01",
            "optim.epochs=8",
            "optim.warmup_epochs=0",
            "tta=[identity]",
        ]
    return str(REPO_ROOT / "configs" / "trashnet.yaml"), [
        *common,
        "model.finetune=head",
        "data.image_size=128",
        "optim.lr=0.01",
        "optim.epochs=6",
        "tta=[identity]",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["digits", "cub50", "trashnet"])
    parser.add_argument("--methods", default=",".join(ALL), help=f"any of {', '.join(ALL)}")
    parser.add_argument("--k", type=int, default=3, help="folds (default 3)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.epochs=10")
    args = parser.parse_intermixed_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ALL]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ALL)}")

    from competition.adjust import adjust_run
    from competition.cv import run_cv
    from competition.decouple import DecoupleOptions, decouple_run

    root = OUT / f"{args.dataset}-lt-k{args.k}"
    root.mkdir(parents=True, exist_ok=True)
    built = {}
    if args.dataset == "digits":
        built = build_digits(root, args.k)
    elif args.dataset == "cub50":
        built = build_cub50(root, args.k)
    print(f"{args.dataset}: {built}", flush=True)
    paths = {
        "runs_dir": OUT / "runs",
        "folds_dir": OUT / "folds",
        "submissions_dir": OUT / "submissions",
    }
    config_path, base = overrides(args.dataset, root, args.k)
    base += args.overrides
    quiet = lambda *_: None  # noqa: E731
    results = OUT / "results.jsonl"
    ce_run = paths["runs_dir"] / f"lt-{args.dataset}-k{args.k}-ce"

    print("| data | method | CV bal. acc (LT OOF) | eval bal. acc (balanced) | wall s |")
    print("|---|---|---|---|---|", flush=True)
    for method in methods:
        started = time.perf_counter()
        if method in TRAINED:
            name = f"lt-{args.dataset}-k{args.k}-{method}"
            config = load_config(config_path, [*base, f"name={name}", *TRAINED[method]])
            cv = run_cv(config, log=quiet, **paths)
        elif method.startswith("adjust"):
            tau = 1.0 if method == "adjust_tau1" else "auto"
            cv = adjust_run(ce_run, tau, name=f"{ce_run.name}-{method}", log=quiet, **paths)
        else:
            select = "folds" if method == "tau_norm_folds" else "inner"
            options = DecoupleOptions(method.replace("_folds", ""), select=select)
            cv = decouple_run(ce_run, options, name=f"{ce_run.name}-{method}", log=quiet, **paths)
        wall = time.perf_counter() - started
        lb = cv.get("lb", float("nan"))
        extra = f" (tau {cv['taus']})" if "taus" in cv else ""
        print(
            f"| {args.dataset}-LT | {method}{extra} | {cv['mean']:.3f} ± {cv['std']:.3f} | "
            f"{lb:.3f} | {wall:.0f} |",
            flush=True,
        )
        with open(results, "a") as handle:
            row = {"dataset": args.dataset, "method": method, "cv": cv["mean"], "std": cv["std"]}
            row.update(lb=lb, wall_s=round(wall, 1), k=args.k, **built)
            handle.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main()
