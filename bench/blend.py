"""Issue 11: every blend method on nested OOF, on the frozen-baseline runs of bench/baselines.py.

For each data set, two sets of member runs (made first by ``bench/baselines.py``):

* ``linear+knn``: the issue's case: the linear probe and the k-NN vote on the concatenated
  Lite0+Lite1+Lite2 features (the k-NN's probabilities are far better calibrated);
* ``all``: linear on Lite0, Lite1, Lite2 and on the concatenation, k-NN and NCM on the
  concatenation.

Each set is blended by ``competition.ensemble.blend`` with ``method=auto`` (every method scored;
nested: weights for a fold fitted without it) without and with ``calibrate`` (temperature scaling
of each member, nested too). Printed: each member's CV, then each method's nested and in-sample CV
and nested log loss, the method kept, and whether the blend beats its best member on nested CV.
Blends are written as ``runs/bench-blend-*`` (cleared first; they take seconds).

    .venv/bin/python bench/blend.py            # trashnet and cub50
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from competition.ensemble import METHODS, blend  # noqa: E402

DATASETS = ("trashnet", "cub50")
SETS = {
    "linear+knn": ["{concat}-linear", "{concat}-knn"],
    "all": [
        "lite0-linear",
        "lite1-linear",
        "lite2-linear",
        "{concat}-linear",
        "{concat}-knn",
        "{concat}-ncm",
    ],
}
RUNS = REPO / "runs"


def blend_rows(
    dataset: str,
    label: str,
    members: list[str],
    calibrate: bool,
    concat: str,
    skip: list[str],
    linear: str = "-linear",
) -> list[dict]:
    members = [
        m.format(concat=concat).replace("-linear", linear)
        for m in members
        if m.split("-")[0] not in skip
    ]
    runs = [RUNS / f"bench-bl-{dataset}-{m}" for m in members]
    missing = [str(r) for r in runs if not (r / "cv.json").is_file()]
    if missing:
        raise SystemExit(f"run bench/baselines.py first; missing {missing}")
    name = f"bench-blend-{dataset}-{label.replace('+', '-')}{'-cal' if calibrate else ''}"
    shutil.rmtree(RUNS / name, ignore_errors=True)
    tick = time.perf_counter()
    cv = blend(runs, name, log=lambda *a: None, calibrate=calibrate)
    seconds = time.perf_counter() - tick
    best = max(cv["members"].values())
    rows = []
    for method in METHODS:
        scores = cv["methods"][method]
        rows.append(
            {
                "dataset": dataset,
                "members": label,
                "calibrate": calibrate,
                "method": method,
                "nested": scores["nested"],
                "in_sample": scores["in_sample"],
                "nested_log_loss": scores["nested_log_loss"],
                "chosen": method == cv["method"],
                "best_member": best,
                "seconds": seconds,
            }
        )
    print(
        f"\n{dataset} {label}{' calibrated' if calibrate else ''}: members "
        + ", ".join(f"{Path(r).name} {s:.4f}" for r, s in cv["members"].items())
        + f"; kept {cv['method']} (weights {', '.join(f'{w:.2f}' for w in cv['weights'])}): "
        f"nested {cv['mean']:.4f} vs best member {best:.4f} "
        f"({'BELOW' if 'warning' in cv else 'beats' if cv['mean'] > best + 1e-9 else 'ties'}); "
        f"{seconds:.0f}s",
        flush=True,
    )
    return rows


HEADER = (
    "| data | members | calibrated | method | nested CV | in-sample CV | nested log loss "
    "| best member CV |\n|---|---|---|---|---|---|---|---|"
)


def line(r: dict) -> str:
    mark = " **(kept)**" if r["chosen"] else ""
    return (
        f"| {r['dataset']} | {r['members']} | {'yes' if r['calibrate'] else 'no'} | "
        f"{r['method']}{mark} | {r['nested']:.4f} | {r['in_sample']:.4f} | "
        f"{r['nested_log_loss']:.3f} | {r['best_member']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--concat", default="concat", help="concat (Lite0+1+2) or concat01")
    parser.add_argument("--skip", nargs="*", default=[], help="backbones left out, e.g. lite2")
    parser.add_argument(
        "--linear", default="-linear", help="suffix of the linear runs (-linear-C1.0: C=1)"
    )
    args = parser.parse_args()
    print(f"{datetime.date.today()}  load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for dataset in args.data:
        for label, members in SETS.items():
            for calibrate in (False, True):
                rows += blend_rows(
                    dataset, label, members, calibrate, args.concat, args.skip, args.linear
                )
    print("\n" + HEADER)
    print("\n".join(line(r) for r in rows))
    out = RUNS / "bench-blend.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"rows saved to {out}")


if __name__ == "__main__":
    main()
