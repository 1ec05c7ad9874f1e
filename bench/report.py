"""How long the run report takes: the model-free report every verb writes at its end, and
``competition report RUN`` with Grad-CAM, on real runs of the shared data sets.

    .venv/bin/python bench/report.py            # trashnet + cub50 baselines, hymenoptera fine-tune
    .venv/bin/python bench/report.py --skip-cub50 --skip-train

Runs go to ``runs/bench-report-*`` (git-ignored; open their report.md to look at the figures).
The baselines reuse ``.cache/embeddings`` when another run already embedded the same images at the
same size (trashnet at 224 px by ``bench-emb-*``); cub50 is embedded at 96 px to stay affordable.
Times are wall and CPU seconds of the process (on an idle machine the wall time approaches the
CPU time: the report is single-threaded). "finish" is :meth:`RunRecord.write_report` in a warm
process (what ``train`` / ``baseline`` / ``ensemble`` add at their end); "first" includes
importing matplotlib (the first report of a process).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from competition.baseline import BaselineOptions, run_baseline  # noqa: E402
from competition.config import load_config  # noqa: E402
from competition.cv import run_cv  # noqa: E402
from competition.data import read_competition  # noqa: E402
from competition.runs import RunRecord  # noqa: E402

quiet = lambda *a, **k: None  # noqa: E731


def _first_report_seconds(run_dir: Path) -> tuple[float, float]:
    """A fresh process: import, read the competition, write the model-free report."""
    code = (
        "import time, sys; t = time.perf_counter();"
        "from competition.runs import RunRecord; from competition.data import read_competition;"
        f"r = RunRecord.open({str(run_dir)!r}); c = read_competition(r.config);"
        "s, p = time.perf_counter(), time.process_time(); r.write_report(c);"
        "print(time.perf_counter() - s, time.process_time() - p)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def measure(run_dir: Path, gradcam: bool) -> dict:
    record = RunRecord.open(run_dir)
    competition = read_competition(record.config)
    oof = record.oof()
    first = _first_report_seconds(run_dir)
    started, cpu = time.perf_counter(), time.process_time()
    record.write_report(competition)
    finish = (time.perf_counter() - started, time.process_time() - cpu)
    verb = None
    if gradcam:
        from competition.report import report_run

        started, cpu = time.perf_counter(), time.process_time()
        report_run(run_dir, log=quiet)
        verb = (time.perf_counter() - started, time.process_time() - cpu)
    figures = sorted(p.name for p in run_dir.glob("report_*.png"))
    return {
        "run": run_dir.name,
        "classes": len(record.classes()),
        "oof_rows": len(oof),
        "first": first,
        "finish": finish,
        "verb": verb,
        "figures": len(figures),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-cub50", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    configs = REPO / "configs"
    rows = []

    config = load_config(
        configs / "trashnet.yaml", ["name=bench-report-trashnet", "data.image_size=224"]
    )
    cv = run_baseline(config, BaselineOptions(method="ncm"), log=quiet)
    print(f"trashnet baseline: CV {cv['mean']:.4f}, {cv['seconds']:.0f}s", flush=True)
    rows.append(measure(Path(cv["run"]), gradcam=False))

    if not args.skip_cub50:
        config = load_config(
            configs / "cub50.yaml", ["name=bench-report-cub50", "data.image_size=96"]
        )
        cv = run_baseline(config, BaselineOptions(method="ncm"), log=quiet)
        print(f"cub50 baseline (96 px): CV {cv['mean']:.4f}, {cv['seconds']:.0f}s", flush=True)
        rows.append(measure(Path(cv["run"]), gradcam=False))

    if not args.skip_train:
        overrides = [
            "name=bench-report-hymenoptera-ft",
            "folds.k=2",
            "data.image_size=160",
            "optim.epochs=2",
            "model.finetune=last_n",
            "model.last_n=1",
        ]
        config = load_config(configs / "hymenoptera.yaml", overrides)
        started = time.perf_counter()
        cv = run_cv(config, log=quiet)
        print(
            f"hymenoptera fine-tune (160 px, 2 folds x 2 epochs): CV {cv['mean']:.4f}, "
            f"LB {cv.get('lb', float('nan')):.4f}, {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        rows.append(measure(Path(cv["run"]), gradcam=True))

    print(
        "\n| run | classes | OOF rows | report at finish: wall / CPU s | first in a process: "
        "wall / CPU s | `competition report` with Grad-CAM: wall / CPU s | figures |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        verb = "-" if r["verb"] is None else "{:.1f} / {:.1f}".format(*r["verb"])
        print(
            f"| {r['run']} | {r['classes']} | {r['oof_rows']} | "
            + "{:.2f} / {:.2f} | {:.2f} / {:.2f} | ".format(*r["finish"], *r["first"])
            + f"{verb} | {r['figures']} |"
        )


if __name__ == "__main__":
    main()
