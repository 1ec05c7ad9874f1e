"""Tuning at scale on the demo competition (scikit-learn's digits as a Kaggle competition).

1. Same wall-clock budget, three pruners (none, successive halving, Hyperband): trials finished,
   epochs spent, trials per hour and best CV.
2. Four worker processes on one study with a budget of 12 small trials (fold 0, one epoch), on a
   journal file and on a throwaway PostgreSQL server: trials recorded, distinct parameters, failed
   trials, worker errors. This part runs first.

    .venv/bin/python bench/tune.py [--seconds 150] [--train-fraction 0.5] [--skip-parallel]

Everything is written under a temp dir (or --out); ../shared is not needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from competition.config import load_config
from competition.demo import DEMO_CONFIG, build_digits_competition
from competition.tune import spent, tune


def base_config(root: Path, out: Path, *extra: str):
    return load_config(
        DEMO_CONFIG,
        [
            f"competition.root={root}",
            f"data.cache_dir={out / 'cache'}",
            "folds.k=3",
            "tune.params=[optim.lr, optim.weight_decay, loss.params.label_smoothing]",
            *extra,
        ],
    )


def epochs_spent(study, runs_dir: Path) -> int:
    total = 0
    for trial in study.trials:
        run = runs_dir / Path(trial.user_attrs.get("run_dir", "none")).name
        for log in run.glob("fold_*/log.csv"):
            total += len(pd.read_csv(log))
    return total


def quiet(*args) -> None:
    pass


def markdown(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def pruning_arms(root: Path, out: Path, seconds: float, epochs: int) -> list[dict]:
    rows = []
    for pruner in ("none", "successive_halving", "hyperband"):
        arm = out / f"arm-{pruner}"
        paths = {k: arm / k for k in ("runs", "folds", "submissions")}
        config = base_config(
            root, out, f"name=bench-{pruner}", f"tune.pruner={pruner}", "tune.trials=1000",
            f"tune.timeout_s={seconds}", f"optim.epochs={epochs}",
        )  # fmt: skip
        started = time.perf_counter()
        study = tune(
            config,
            runs_dir=paths["runs"],
            log=quiet,
            folds_dir=paths["folds"],
            submissions_dir=paths["submissions"],
        )
        elapsed = time.perf_counter() - started
        states = [t.state.name for t in study.trials]
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        rows.append(
            {
                "pruner": pruner,
                "wall_s": round(elapsed),
                "trials": len(study.trials),
                "complete": states.count("COMPLETE"),
                "pruned": states.count("PRUNED"),
                "epochs": epochs_spent(study, paths["runs"]),
                "trials_per_h": round(len(study.trials) / elapsed * 3600),
                "best_cv": max(t.value for t in complete) if complete else float("nan"),
            }
        )
        print(rows[-1], flush=True)
    return rows


def parallel_arms(root: Path, out: Path) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.postgres import postgres_bin, throwaway_postgres

    rows = []
    backends = [("journal", None)]
    if postgres_bin() is not None:
        backends.append(("postgresql", "pg"))
    for backend, _ in backends:
        arm = out / f"par-{backend}"
        paths = {k: arm / k for k in ("runs", "folds", "submissions")}

        def run(storage: str | None, arm=arm, paths=paths, backend=backend):
            extra = [f"tune.storage={storage}"] if storage else []
            config = base_config(
                root, out, f"name=par-{backend}", "tune.workers=4", "tune.trials=12",
                "tune.pruner=none", "folds.k=2", "tune.folds=[0]", "optim.epochs=1", *extra,
            )  # fmt: skip
            started = time.perf_counter()
            errors = 0
            try:
                study = tune(
                    config,
                    runs_dir=paths["runs"],
                    log=quiet,
                    folds_dir=paths["folds"],
                    submissions_dir=paths["submissions"],
                )
            except Exception as exc:  # a storage error in a worker: counted, then read back
                print(f"{backend}: {exc}", flush=True)
                errors += 1
                from competition.tune import open_study, study_place

                study = open_study(config, study_place(config, paths["runs"]))
            elapsed = time.perf_counter() - started
            trials = study.trials
            params = {tuple(sorted(t.params.items())) for t in trials}
            return {
                "storage": backend,
                "workers": 4,
                "budget": 12,
                "trials": len(trials),
                "spent": spent(study),
                "distinct_params": len(params),
                "distinct_run_dirs": len({t.user_attrs.get("run_dir") for t in trials}),
                "failed": sum(t.state.name == "FAIL" for t in trials),
                "worker_errors": errors,
                "wall_s": round(elapsed),
            }

        if backend == "journal":
            rows.append(run(None))
        else:
            with throwaway_postgres() as url:
                rows.append(run(url))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150, help="wall-clock budget per pruner")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fold of a trial")
    parser.add_argument("--train-fraction", type=float, default=0.5, help="digits used to train")
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--skip-parallel", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    root = build_digits_competition(
        out / "digits", test_size=round(1 - args.train_fraction, 3), seed=0
    )
    train = len(pd.read_csv(root / "train.csv"))
    print(f"demo digits: {train} train images, 3 folds, resnet10t at 32 px, work dir {out}")
    if not args.skip_parallel:
        print(markdown(pd.DataFrame(parallel_arms(root, out))), flush=True)
    if not args.skip_pruning:
        rows = pruning_arms(root, out, args.seconds, args.epochs)
        table = pd.DataFrame(rows)
        base = table.loc[table.pruner == "none"].iloc[0]
        table["trials_per_h_x"] = (table.trials_per_h / base.trials_per_h).round(2)
        table["epochs_per_trial"] = (table.epochs / table.trials).round(1)
        print(markdown(table))


if __name__ == "__main__":
    main()
