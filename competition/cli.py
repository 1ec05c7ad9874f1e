"""The ``competition`` command: demo, folds, train, predict, baseline, tune, ensemble, plugins."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from competition.errors import CompetitionError


def _folds_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,2 — got {text!r}") from None


def cmd_demo(args) -> None:
    from competition.demo import run_demo

    run_demo(args.overrides)


def cmd_folds(args) -> None:
    from competition.audit import raise_if_unreadable
    from competition.config import load_config
    from competition.data import read_competition
    from competition.folds import folds_path, load_or_make_folds

    config = load_config(args.config, args.overrides)
    competition = read_competition(config)
    kaggle = config.competition.layout == "kaggle"
    source = config.competition.train_csv if kaggle else f"{config.competition.train_dir}/"
    raise_if_unreadable(competition.train, source, config.data.num_workers, csv_rows=kaggle)
    fold = load_or_make_folds(competition.train, config.competition.name, config.folds)
    table = competition.train.assign(fold=fold)
    counts = table.pivot_table(
        index="label", columns="fold", values="id", aggfunc="count", fill_value=0
    )
    print(counts.to_string())
    print(
        f"\n{len(table)} images, {config.folds.k} folds: "
        f"{folds_path(config.competition.name, config.folds)}"
    )


def cmd_check(args) -> int:
    from competition.audit import audit
    from competition.config import load_config
    from competition.runs import write_audit

    config = load_config(args.config, args.overrides)
    result = audit(config, **({} if args.threshold is None else {"threshold": args.threshold}))
    path = write_audit(result, config.competition.name)
    findings = result.findings
    if len(findings):
        with pd_options():
            print(findings[["severity", "kind", "split", "file", "other_file"]].to_string())
    summary = result.summary
    print(
        f"\n{result.errors} error(s), {result.warnings} warning(s); imbalance ratio "
        f"{summary.get('imbalance_ratio')}; report: {path / 'report.md'}"
    )
    return 1 if result.errors else 0


def pd_options():
    import pandas as pd

    return pd.option_context("display.max_rows", 60, "display.width", 160)


def cmd_train(args) -> None:
    from competition.config import load_config
    from competition.cv import run_cv
    from competition.runs import summary_table

    config = load_config(args.config, args.overrides)
    cv = run_cv(config, folds=args.folds)
    print(summary_table(cv))


def cmd_predict(args) -> None:
    from competition.config import apply_overrides
    from competition.cv import predict_run
    from competition.runs import summary_table

    flat: dict = {}
    for item in args.overrides:
        nested = apply_overrides({}, [item])
        key = item.split("=", 1)[0]
        node = nested
        for part in key.split("."):
            node = node[part]
        flat[key] = node
    cv = predict_run(Path(args.run_dir), flat, name=args.name)
    print(summary_table(cv))


def cmd_baseline(args) -> None:
    from competition.baseline import BaselineOptions, run_baseline
    from competition.config import load_config
    from competition.runs import summary_table

    given = {
        "method": args.method,
        "k": args.k,
        "temperature": args.temperature,
        "norm": args.norm,
        "pca_dim": args.pca_dim,
        "C": args.C,
        "hflip": args.hflip,
    }
    options = BaselineOptions(**{key: value for key, value in given.items() if value is not None})
    cv = run_baseline(load_config(args.config, args.overrides), options, folds=args.folds)
    print(summary_table(cv))
    if "lb_full" in cv:
        print(f"{'LB all':>6}  {cv['lb_full']:>10.4f}  (fitted on the whole train set)")
    print(f"{cv['seconds']:.1f}s, embeddings computed: {cv['embeddings']['computed'] or 'none'}")


def cmd_tune(args) -> None:
    from competition.config import load_config
    from competition.tune import tune

    config = load_config(args.config, args.overrides)
    study = tune(config, trials=args.trials)
    finished = [t for t in study.trials if t.value is not None]
    print(f"{len(study.trials)} trials ({len(finished)} complete) in {study.study_name}")
    if finished:
        print(f"best {config.metric}: {study.best_value:.4f} with {study.best_params}")
        print(f"best config: runs/{config.name}-best.yaml")


def cmd_ensemble(args) -> None:
    from competition.ensemble import blend

    cv = blend(args.runs, args.name)
    for run, weight in zip(cv["runs"], cv["weights"], strict=True):
        print(f"{weight:6.3f}  {run}  (OOF {cv['members'][run]:.4f})")
    how = "nested" if cv["nested"] else "in-sample: one common fold"
    print(
        f"blend CV {cv['metric']} {cv['mean']:.4f} ± {cv['std']:.4f} ({how}), "
        f"OOF {cv['oof']:.4f} on {cv['rows']} rows"
    )
    if "lb" in cv:
        print(f"LB {cv['lb']:.4f}")
    if "submission" in cv:
        print(f"submission: {cv['submission']}")


def cmd_plugins(args) -> None:
    from competition.manager import KINDS, components, get_plugin_manager

    pm = get_plugin_manager()
    print("plugins:")
    for name, plugin in pm.list_name_plugin():
        dist = next(
            (d.project_name for p, d in pm.list_plugin_distinfo() if p is plugin), "built-in"
        )
        print(f"  {name}  ({dist})")
    for kind in KINDS:
        available = components(kind, pm)
        names = sorted(available)
        shown = names if len(names) <= 40 or args.all else names[:40]
        more = (
            "" if len(shown) == len(names) else f" ... and {len(names) - len(shown)} more (--all)"
        )
        print(f"\n{kind} ({len(names)}):")
        for name in shown:
            print(f"  {name:<32} {available.provider(name)}")
        if more:
            print(f"  {more.strip()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="competition",
        description="K-fold CV, tuning and ensembling for image-classification competitions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the digits demo competition and run it end to end")
    demo.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.epochs=3")
    demo.set_defaults(func=cmd_demo)

    folds = sub.add_parser("folds", help="make (or reuse) and show the folds of a competition")
    folds.add_argument("config", help="YAML config, e.g. configs/trashnet.yaml")
    folds.add_argument("overrides", nargs="*", help="config overrides key=value")
    folds.set_defaults(func=cmd_folds)

    train = sub.add_parser("train", help="train every fold, score CV and write the submission")
    train.add_argument("config", help="YAML config, e.g. configs/trashnet.yaml")
    train.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optim.lr=0.01 name=exp2"
    )
    train.add_argument("--folds", type=_folds_arg, default=None, help="only these folds, e.g. 0,2")
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser(
        "predict", help="a new run from a finished run's fold weights with other TTA or test data"
    )
    predict.add_argument("run_dir", help="a run folder, e.g. runs/trashnet")
    predict.add_argument("overrides", nargs="*", help="overrides such as tta=[identity,hflip]")
    predict.add_argument(
        "--name", default=None, help="the new run's name (default: <run>-<what changed>-<hash>)"
    )
    predict.set_defaults(func=cmd_predict)

    baseline = sub.add_parser(
        "baseline", help="frozen-feature baselines (k-NN, NCM, logistic regression) in K-fold CV"
    )
    baseline.add_argument("config", help="YAML config, e.g. configs/cub50.yaml")
    baseline.add_argument("overrides", nargs="*", help="config overrides, e.g. data.image_size=160")
    baseline.add_argument("--method", required=True, help="knn, ncm or linear")
    baseline.add_argument("--k", type=int, help="neighbours of knn (default 20)")
    baseline.add_argument(
        "--temperature",
        type=float,
        help="similarity temperature: knn vote weights exp(s/T), ncm softmax(s/T) (default 0.07)",
    )
    baseline.add_argument(
        "--norm", help="none, l2, center_l2, pca or pca_whiten (default center_l2)"
    )
    baseline.add_argument("--pca-dim", type=int, help="components kept by the pca norms (256)")
    baseline.add_argument("--C", type=float, help="inverse L2 strength of linear (default 1.0)")
    baseline.add_argument("--hflip", action="store_true", help="average with mirrored embeddings")
    baseline.add_argument(
        "--folds", type=_folds_arg, default=None, help="only these folds, e.g. 0,2"
    )
    baseline.set_defaults(func=cmd_baseline)

    tune = sub.add_parser("tune", help="Optuna study of the recipe against the CV score")
    tune.add_argument("config", help="YAML config; its tune section sets trials and dimensions")
    tune.add_argument("overrides", nargs="*", help="config overrides, e.g. tune.trials=30")
    tune.add_argument("--trials", type=int, default=None, help="total trials (default tune.trials)")
    tune.set_defaults(func=cmd_tune)

    ensemble = sub.add_parser("ensemble", help="blend finished runs with weights fitted on OOF")
    ensemble.add_argument("runs", nargs="+", help="run folders, e.g. runs/a runs/b")
    ensemble.add_argument("--name", required=True, help="name of the blend (runs/<name>)")
    ensemble.set_defaults(func=cmd_ensemble)

    check = sub.add_parser(
        "check", help="audit the data: unreadable files, duplicates, label conflicts, balance"
    )
    check.add_argument("config", help="YAML config, e.g. configs/trashnet.yaml")
    check.add_argument("overrides", nargs="*", help="config overrides key=value")
    check.add_argument(
        "--threshold", type=int, help="near duplicates: pHash bits apart, of 64 (default 4)"
    )
    check.set_defaults(func=cmd_check)

    plugins = sub.add_parser("plugins", help="list plugins and the components they provide")
    plugins.add_argument("--all", action="store_true", help="list every component (timm has many)")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may stand anywhere, before or after options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    is_override = ["=" in arg and not arg.startswith("-") for arg in argv]
    parser = build_parser()
    args = parser.parse_args([a for a, o in zip(argv, is_override, strict=True) if not o])
    overrides = [a for a, o in zip(argv, is_override, strict=True) if o]
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"'{args.command}' takes no key=value overrides: {' '.join(overrides)}")
    if hasattr(args, "overrides"):
        stray = [a for a in args.overrides if a not in overrides]
        if stray:  # argparse took them as overrides; without '=' they would be dropped
            parser.error(
                f"{' '.join(map(repr, stray))}: an override is key=value, e.g. optim.lr=0.01"
            )
        args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        status = args.func(args)
    except CompetitionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished epochs are saved; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
