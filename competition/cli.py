"""The ``competition`` command: one subcommand per verb (train, predict, ensemble, report, ...)."""

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


def cmd_train(args) -> int | None:
    from competition import distributed
    from competition.config import load_config
    from competition.cv import run_cv
    from competition.runs import summary_table

    config = load_config(args.config, args.overrides)  # errors here, before any process starts
    if args.nproc is not None and args.nproc > 1 and not distributed.launched():
        argv = ["train", args.config, *args.overrides]
        if args.folds is not None:
            argv += ["--folds", ",".join(map(str, args.folds))]
        return distributed.launch(args.nproc, argv)
    try:
        cv = run_cv(config, folds=args.folds)
        main = distributed.is_main()  # known only while the process group lives
    finally:
        distributed.teardown()
    if main:
        print(summary_table(cv))
    return None


def _flat_overrides(items: list[str]) -> dict:
    """``["optim.lr=3e-4"]`` -> ``{"optim.lr": 0.0003}`` (values parsed as YAML)."""
    from competition.config import apply_overrides

    flat: dict = {}
    for item in items:
        nested = apply_overrides({}, [item])
        key = item.split("=", 1)[0]
        node = nested
        for part in key.split("."):
            node = node[part]
        flat[key] = node
    return flat


def cmd_predict(args) -> None:
    from competition.cv import predict_run
    from competition.runs import summary_table

    flat = _flat_overrides(args.overrides)
    if args.tta is not None:
        flat["tta"] = args.tta
    candidates = None
    if args.candidates is not None:
        import yaml

        from competition.config import load_yaml
        from competition.errors import ConfigError

        try:
            candidates = load_yaml(args.candidates)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--candidates: not valid YAML ({exc}); e.g. '[hflip, {{name: scale, factor: 2}}]'"
            ) from None
        candidates = candidates if isinstance(candidates, list) else [candidates]
    cv = predict_run(Path(args.run_dir), flat, name=args.name, candidates=candidates)
    print(summary_table(cv))


def _options(cls, args, fields: tuple[str, ...]):
    """``cls`` built from the flags the user gave; a flag left out (``None``) keeps its default."""
    return cls(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})


def cmd_baseline(args) -> None:
    from competition.baseline import BaselineOptions, run_baseline
    from competition.config import load_config
    from competition.runs import summary_table

    fields = ("method", "k", "temperature", "norm", "pca_dim", "C", "hflip")
    options = _options(BaselineOptions, args, fields)
    cv = run_baseline(load_config(args.config, args.overrides), options, folds=args.folds)
    print(summary_table(cv))
    if "lb_full" in cv:
        print(f"{'LB all':>6}  {cv['lb_full']:>10.4f}  (fitted on the whole train set)")
    print(f"{cv['seconds']:.1f}s, embeddings computed: {cv['embeddings']['computed'] or 'none'}")


def cmd_tune(args) -> None:
    from competition.config import load_config, replace
    from competition.tune import report, summary, tune

    config = load_config(args.config, args.overrides)
    flags = {"trials": args.trials, "timeout_s": args.timeout, "storage": args.storage}
    flags.update(study=args.study, workers=args.workers)
    config = replace(config, {f"tune.{k}": v for k, v in flags.items() if v is not None})
    if args.report:
        report(config)
        return
    study = tune(config)
    print(summary(study))
    if any(t.state.name == "COMPLETE" for t in study.trials):
        best = f"runs/{study.study_name}-best"
        print(f"best {config.metric}: {study.best_value:.4f} (trial {study.best_trial.number})")
        print(f"best config: {best}.yaml (train it: competition train {best}.yaml)")
        print(f"best overrides: {best}.overrides.yaml")


def cmd_ensemble(args) -> None:
    from competition.ensemble import blend

    cv = blend(args.runs, args.name, method=args.method, calibrate=args.calibrate)
    for run, weight in zip(cv["runs"], cv["weights"], strict=True):
        print(f"{weight:6.3f}  {run}  (CV {cv['members'][run]:.4f})")
    print(f"{'method':>10}  {'nested':>8}  {'in-sample':>9}")
    for method, scores in cv["methods"].items():
        mark = "  <- chosen" if method == cv["method"] else ""
        print(f"{method:>10}  {scores['nested']:8.4f}  {scores['in_sample']:9.4f}{mark}")
    how = "nested" if cv["nested"] else "in-sample: one common fold"
    print(
        f"blend ({cv['method']}{', calibrated' if cv['calibrate'] else ''}) CV {cv['metric']} "
        f"{cv['mean']:.4f} ± {cv['std']:.4f} ({how}), OOF {cv['oof']:.4f} on {cv['rows']} rows"
    )
    if "warning" in cv:
        print(f"WARNING: {cv['warning']}", file=sys.stderr)
    if "lb" in cv:
        print(f"LB {cv['lb']:.4f}")
    if "submission" in cv:
        print(f"submission: {cv['submission']}")


def cmd_report(args) -> None:
    from competition.report import report_run

    path = report_run(Path(args.run_dir), gradcam=not args.no_gradcam)
    figures = sorted(p.name for p in path.parent.glob("report_*.png"))
    print(f"report: {path}\nfigures: {', '.join(figures)}")


def cmd_adjust(args) -> None:
    from competition.adjust import adjust_run
    from competition.runs import summary_table

    cv = adjust_run(Path(args.run_dir), args.tau, name=args.name)
    taus = ", ".join(f"fold {f}: {t:g}" for f, t in cv["taus"].items())
    print(f"tau ({cv['tau_choice']}): {taus}")
    print(summary_table(cv))


def cmd_decouple(args) -> None:
    from competition.decouple import DecoupleOptions, decouple_run
    from competition.runs import summary_table

    fields = ("method", "epochs", "lr", "select", "inner_fraction")
    options = _options(DecoupleOptions, args, fields)
    cv = decouple_run(Path(args.run_dir), options, name=args.name, folds=args.folds)
    print(summary_table(cv))


def cmd_pseudo(args) -> None:
    from competition.pseudo import pseudo_run
    from competition.runs import summary_table

    flat = _flat_overrides(args.overrides)
    cv = pseudo_run(
        Path(args.run_dir), args.threshold, args.soft, args.name, flat, folds=args.folds
    )
    print(summary_table(cv))
    pseudo = cv["pseudo"]
    taken = ", ".join(f"{c} {n}" for c, n in pseudo["per_class"].items())
    print(f"pseudo-labels: {pseudo['taken']} of {pseudo['of']} test images ({taken})")
    gain = cv.get("gain")
    if gain and gain["gain"] is not None:
        print(
            f"CV gain over {pseudo['source']}: {gain['gain']:+.4f} ({gain['before']:.4f} -> "
            f"{gain['after']:.4f} on folds {gain['folds']})"
        )


def cmd_export(args) -> None:
    from competition.export import export

    summary = export(args.runs, args.out, force=args.force, tolerance=args.tolerance)
    checked = ", ".join(
        f"{run}: " + ("not verified" if gap is None else f"max |p - run| {gap:.1e}")
        for run, gap in summary["verified"].items()
    )
    print(
        f"bundle: {summary['path']} ({summary['bytes'] / 2**20:.1f} MiB, {summary['networks']} "
        f"fold network(s)); test images: {checked or 'not verified'}"
    )
    print(f"run it: python {summary['path']}/predict.py --images DIR --sample-submission CSV")


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
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="data-parallel processes (one per GPU, or CPU processes with gloo): runs "
        "torchrun --nproc-per-node N -m competition train ...; data.batch_size stays the global "
        "batch",
    )
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser(
        "predict", help="a new run from a finished run's fold weights with other TTA or test data"
    )
    predict.add_argument("run_dir", help="a run folder, e.g. runs/trashnet")
    predict.add_argument("overrides", nargs="*", help="overrides such as tta=[identity,hflip]")
    predict.add_argument(
        "--name", default=None, help="the new run's name (default: <run>-<what changed>-<hash>)"
    )
    predict.add_argument(
        "--tta",
        choices=["auto"],
        help="auto: choose TTA views greedily on OOF (kept only when the OOF metric improves)",
    )
    predict.add_argument(
        "--candidates",
        help="views --tta auto tries, YAML: '[hflip, d4, five_crop, {name: scale, factor: 1.3}]' "
        "(default: hflip, vflip, d4, five_crop, ten_crop, scale 1.15 and 1.3, multiscale)",
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
    baseline.add_argument(
        "--C",
        type=float,
        help="inverse L2 strength of linear (default: chosen per fold by inner CV, 0.3 to 30)",
    )
    baseline.add_argument("--hflip", action="store_true", help="average with mirrored embeddings")
    baseline.add_argument(
        "--folds", type=_folds_arg, default=None, help="only these folds, e.g. 0,2"
    )
    baseline.set_defaults(func=cmd_baseline)

    tune = sub.add_parser("tune", help="Optuna study of the recipe against the CV score")
    tune.add_argument("config", help="YAML config; its tune section sets trials and dimensions")
    tune.add_argument("overrides", nargs="*", help="config overrides, e.g. tune.trials=30")
    tune.add_argument(
        "--trials", type=int, help="the study's budget: trials in all, every worker and machine"
    )
    tune.add_argument("--timeout", type=float, help="seconds; no trial starts after (timeout_s)")
    tune.add_argument(
        "--storage",
        help="runs/x.journal (default runs/<study>-study.journal), x.db, or an RDB URL such as "
        "postgresql+psycopg://user@host/db (pip install -e '.[postgres]')",
    )
    tune.add_argument("--study", help="the study's name in its storage (default: the config's)")
    tune.add_argument("--workers", type=int, help="worker processes on this machine (default 1)")
    tune.add_argument(
        "--report", action="store_true", help="plots and a table of trials; runs no trial"
    )
    tune.set_defaults(func=cmd_tune)

    ensemble = sub.add_parser("ensemble", help="blend finished runs with weights fitted on OOF")
    ensemble.add_argument("runs", nargs="+", help="run folders, e.g. runs/a runs/b")
    ensemble.add_argument("--name", required=True, help="name of the blend (runs/<name>)")
    ensemble.add_argument(
        "--method",
        default="auto",
        help="mean, rank, geometric, hill (Caruana) or optimize; auto (default): the best "
        "nested OOF score",
    )
    ensemble.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="temperature-scale each run on OOF first, for runs whose probabilities differ in "
        "scale (default: on for metric=log_loss only)",
    )
    ensemble.set_defaults(func=cmd_ensemble)

    export = sub.add_parser(
        "export", help="an offline inference bundle (Kaggle, internet off) of a run or a blend"
    )
    export.add_argument("runs", nargs="+", help="run folders (several: averaged equally)")
    export.add_argument("out", help="the bundle's folder, e.g. bundles/exp1 (not inside runs/)")
    export.add_argument("--force", action="store_true", help="replace a bundle already at OUT")
    export.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest |bundle - run| allowed on the first test images (default 1e-4)",
    )
    export.set_defaults(func=cmd_export)

    adjust = sub.add_parser(
        "adjust", help="a new run: a finished run's probabilities logit-adjusted (Menon et al.)"
    )
    adjust.add_argument("run_dir", help="a finished run folder, e.g. runs/exp1")
    adjust.add_argument(
        "--tau",
        default="auto",
        help="auto (chosen on the other folds' OOF rows, nested) or a number; 1 is the paper's",
    )
    adjust.add_argument("--name", default=None, help="the new run (default <run>-adjust-tau<T>)")
    adjust.set_defaults(func=cmd_adjust)

    decouple = sub.add_parser(
        "decouple", help="a new run: a training run's fold models with a re-fitted classifier"
    )
    decouple.add_argument("run_dir", help="a finished training run, e.g. runs/exp1")
    decouple.add_argument("--method", required=True, help="crt, tau_norm, lws or ncm")
    decouple.add_argument("--epochs", type=int, help="crt/lws passes over the rows (100)")
    decouple.add_argument("--lr", type=float, help="crt/lws Adam LR (1e-3 crt, 1e-2 lws)")
    decouple.add_argument(
        "--select", help="tau_norm: inner (a part of the fold's train rows) or folds (other folds)"
    )
    decouple.add_argument("--inner-fraction", type=float, help="tau_norm inner part (0.2)")
    decouple.add_argument("--name", default=None, help="the new run (default <run>-<method>)")
    decouple.add_argument(
        "--folds", type=_folds_arg, default=None, help="only these folds, e.g. 0,2"
    )
    decouple.set_defaults(func=cmd_decouple)

    pseudo = sub.add_parser(
        "pseudo",
        help="a new run trained with a finished run's confident test predictions as labels",
    )
    pseudo.add_argument("run_dir", help="a finished run whose fold ensemble labels the test set")
    pseudo.add_argument(
        "--threshold", type=float, required=True, help="fold-mean confidence to take an image"
    )
    pseudo.add_argument(
        "--soft", action="store_true", help="train on the ensemble's probabilities, not arg-max"
    )
    pseudo.add_argument(
        "--name", default=None, help="the new run (default <run>-pseudo-<hard|soft>-t<T>)"
    )
    pseudo.add_argument("--folds", type=_folds_arg, default=None, help="only these folds")
    pseudo.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optim.epochs=5")
    pseudo.set_defaults(func=cmd_pseudo)

    check = sub.add_parser(
        "check", help="audit the data: unreadable files, duplicates, label conflicts, balance"
    )
    check.add_argument("config", help="YAML config, e.g. configs/trashnet.yaml")
    check.add_argument("overrides", nargs="*", help="config overrides key=value")
    check.add_argument(
        "--threshold", type=int, help="near duplicates: pHash bits apart, of 64 (default 4)"
    )
    check.set_defaults(func=cmd_check)

    report = sub.add_parser(
        "report",
        help="rewrite a finished run's report.md and figures, with Grad-CAM of its worst mistakes",
    )
    report.add_argument("run_dir", help="a finished run folder, e.g. runs/trashnet")
    report.add_argument(
        "--no-gradcam", action="store_true", help="skip Grad-CAM (it loads each fold's weights)"
    )
    report.set_defaults(func=cmd_report)

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
    from competition import distributed

    args = parse(argv)
    if distributed.launched() and args.func is not cmd_train:
        print(
            "error: under torchrun only `competition train` runs data-parallel; run the other "
            "verbs as one process",
            file=sys.stderr,
        )
        return 2
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
