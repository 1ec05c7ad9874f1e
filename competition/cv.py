"""The K-fold runner: folds -> a model per fold -> OOF, CV score, test predictions, submission.

A run lives in ``runs/<name>/``; each finished fold leaves ``fold_<k>/result.json``, so a killed run
resumes: finished folds are skipped and an unfinished fold resumes from its ``last.pt``.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from competition.config import REPO_ROOT, Config
from competition.data import Competition, read_competition
from competition.device import select_device
from competition.engine import FoldResult, FoldTrainer
from competition.errors import ConfigError, PluginError
from competition.folds import FOLDS_DIR, load_or_make_folds
from competition.images import MappedImages, cached_images
from competition.io import load_torch, save_numpy, write_csv, write_json, write_text
from competition.loaders import ImageDataset, SamplePipeline, make_loader
from competition.manager import get_plugin_manager, resolve
from competition.metrics import cv_scores, get_metric
from competition.predict import predict_probs, tta_views
from competition.report import write_report
from competition.submission import write_submission

RUNS_DIR = REPO_ROOT / "runs"
SUBMISSIONS_DIR = REPO_ROOT / "submissions"
PACKAGES = ("torch", "torchvision", "timm", "albumentations", "kornia", "optuna", "pluggy", "numpy")


def environment() -> dict:
    """Package versions and git commit, saved beside each run's config."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit or None,
        "git_dirty": bool(dirty),
    }


class Run:
    """Everything a run shares across folds: data, caches, plugins, paths."""

    def __init__(
        self,
        config: Config,
        runs_dir: Path = RUNS_DIR,
        folds_dir: Path = FOLDS_DIR,
        submissions_dir: Path = SUBMISSIONS_DIR,
        log=print,
    ):
        self.config = config
        self.log = log
        self.pm = get_plugin_manager()
        self.run_dir = Path(runs_dir) / config.name
        self.submissions_dir = Path(submissions_dir)
        self.metric = get_metric(config.metric)
        self.device = select_device(config.device)
        self.competition: Competition = read_competition(config)
        self.classes = self.competition.classes
        self.fold_of = load_or_make_folds(
            self.competition.train, config.competition.name, config.folds, folds_dir, log
        )
        data = config.data
        self.eval_size = data.eval_image_size or data.image_size
        self.cache_side = round(max(data.image_size, self.eval_size) / data.crop_pct)
        self._images: dict[str, MappedImages] = {}
        self.views = tta_views(config.tta, self.pm)

    # -- data -------------------------------------------------------------------------------------

    def images(self, split: str) -> MappedImages:
        """The cached uint8 images of ``train``, ``test`` or ``holdout``."""
        if split not in self._images:
            table = getattr(self.competition, split)
            data = self.config.data
            self._images[split] = cached_images(
                list(table["path"]),
                self.cache_side,
                REPO_ROOT / data.cache_dir,
                data.resize,
                data.num_workers,
                desc=f"{self.config.competition.name}-{split}",
            )
        return self._images[split]

    def loader(self, split: str, index=None, train: bool = False, seed: int = 0):
        data = self.config.data
        table = getattr(self.competition, split)
        images = self.images(split)
        targets = table["target"].to_numpy() if "target" in table else None
        if index is not None:
            images = _Subset(images, index)
            targets = None if targets is None else targets[index]
        specs, size, key = (
            (self.config.augment.train, data.image_size, "augment.train")
            if train
            else (self.config.augment.eval, self.eval_size, "augment.eval")
        )
        pipeline = SamplePipeline(specs, size, key, self.pm)
        pipeline(np.array(images[0]))  # fail here, not in a worker, if the output size is wrong
        dataset = ImageDataset(images, targets, pipeline)
        batch = data.batch_size if train else (data.eval_batch_size or data.batch_size * 2)
        return make_loader(
            dataset, batch, train, data.num_workers, seed, pin=self.device.type == "cuda"
        )

    # -- components -------------------------------------------------------------------------------

    def create_model(self) -> torch.nn.Module:
        model = self.pm.hook.competition_create_model(
            config=self.config, num_classes=len(self.classes)
        )
        if model is None:
            raise PluginError(
                "no plugin answered competition_create_model; is plugins.backbones blocked?"
            )
        return model

    def create_loss(self, class_counts: list[int]) -> torch.nn.Module:
        factory = resolve("losses", self.config.loss.name, "loss.name", self.pm)
        return factory(len(self.classes), class_counts, **self.config.loss.params)

    def create_batch_augments(self, model: torch.nn.Module) -> list:
        augments = []
        for i, spec in enumerate(self.config.augment.batch):
            augment = resolve("batch_augments", spec.name, f"augment.batch[{i}].name", self.pm)(
                **spec.params
            )
            if hasattr(augment, "attach"):
                augment.attach(model)
            augments.append(augment)
        return augments

    # -- folds ------------------------------------------------------------------------------------

    def fold_dir(self, fold: int) -> Path:
        return self.run_dir / f"fold_{fold}"

    def fold_done(self, fold: int) -> bool:
        return (self.fold_dir(fold) / "result.json").is_file()

    def fold_score(self, fold: int) -> float:
        """The metric on one finished fold's OOF rows (with TTA), as ``cv.json`` reports it."""
        oof = pd.read_csv(self.fold_dir(fold) / "oof.csv", dtype={"id": str}, keep_default_na=False)
        return self.metric(oof["target"].to_numpy(), oof[self.classes].to_numpy())

    def train_fold(self, fold: int) -> FoldResult:
        config, fold_dir = self.config, self.fold_dir(fold)
        train_index = np.flatnonzero(self.fold_of != fold)
        valid_index = np.flatnonzero(self.fold_of == fold)
        torch.manual_seed(config.seed + fold)
        self.pm.hook.competition_fold_start(fold=fold, run_dir=self.run_dir, config=config)
        train_targets = self.competition.train["target"].to_numpy()
        counts = np.bincount(train_targets[train_index], minlength=len(self.classes)).tolist()
        model = self.create_model()
        trainer = FoldTrainer(
            fold,
            model,
            self.create_loss(counts),
            self.create_batch_augments(model),
            config,
            self.metric,
            fold_dir,
            self.device,
            len(self.classes),
            on_epoch_end=lambda epoch, row: self.pm.hook.competition_epoch_end(
                fold=fold, epoch=epoch, metrics=row, run_dir=self.run_dir
            ),
            log=self.log,
        )
        result = trainer.fit(
            self.loader("train", train_index, train=True, seed=config.seed + fold),
            self.loader("train", valid_index),
            train_targets[valid_index],
        )
        model = trainer.load_best()
        self.predict_fold(model, fold, valid_index)
        write_json(fold_dir / "result.json", dataclasses.asdict(result))
        self.pm.hook.competition_fold_end(fold=fold, result=result, run_dir=self.run_dir)
        return result

    def _predict(self, model, loader, desc: str) -> np.ndarray:
        return predict_probs(
            model,
            loader,
            self.device,
            self.views,
            amp=self.config.amp and self.device.type == "cuda",
            channels_last=self.config.model.channels_last,
            desc=desc,
        )

    def predict_fold(
        self, model: torch.nn.Module, fold: int, valid_index: np.ndarray | None
    ) -> None:
        """OOF rows (with TTA) and test / holdout probabilities of one fold's best model."""
        fold_dir = self.fold_dir(fold)
        if valid_index is not None:
            table = self.competition.train.iloc[valid_index]
            probs = self._predict(model, self.loader("train", valid_index), f"fold {fold} OOF")
            oof = pd.DataFrame(
                {"id": table["id"].to_numpy(), "fold": fold, "target": table["target"].to_numpy()}
            )
            oof[self.classes] = probs
            write_csv(fold_dir / "oof.csv", oof)
        for split in ("test", "holdout"):
            if getattr(self.competition, split) is not None:
                save_numpy(
                    fold_dir / f"{split}_probs.npy",
                    self._predict(model, self.loader(split), f"fold {fold} {split}"),
                )

    # -- the whole run ----------------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        path = self.run_dir / "config.yaml"
        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        if path.is_file() and yaml.safe_load(path.read_text()) != self.config.to_dict():
            raise ConfigError(
                f"{self.run_dir} holds a run with another config. Choose a new run name "
                f"(name=...) or delete {self.run_dir} to start over."
            )
        self._check_folds_unchanged()
        write_text(path, text)
        write_json(self.run_dir / "environment.json", environment())

    def _check_folds_unchanged(self) -> None:
        """A run keeps the fold split it started with; a changed train table needs a new run."""
        current = pd.DataFrame(
            {"id": self.competition.train["id"].astype(str), "fold": self.fold_of}
        )
        path = self.run_dir / "folds.csv"
        if path.is_file():
            saved = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
            if not saved.reset_index(drop=True).equals(current.reset_index(drop=True)):
                raise ConfigError(
                    f"{self.run_dir}: the train table or its folds changed since this run started "
                    f"(see {path}). Choose a new run name (name=...) or delete {self.run_dir}."
                )
            return
        write_csv(path, current)

    def run(self, folds: list[int] | None = None) -> dict:
        """Train the requested folds (default: all), then summarise what is done."""
        k = self.config.folds.k
        folds = list(range(k)) if folds is None else folds
        bad = [f for f in folds if not 0 <= f < k]
        if bad:
            raise ConfigError(f"--folds: fold(s) {bad} out of range 0..{k - 1}")
        self.prepare_run_dir()
        self.pm.hook.competition_configure(config=self.config)
        started = time.perf_counter()
        for fold in folds:
            if self.fold_done(fold):
                self.log(f"fold {fold}: already done, skipped ({self.fold_dir(fold)})")
                continue
            self.train_fold(fold)
        cv = self.summarise()
        cv["seconds"] = round(time.perf_counter() - started, 1)
        write_json(self.run_dir / "cv.json", cv)
        self.pm.hook.competition_run_end(run_dir=self.run_dir, cv=cv)
        return cv

    def summarise(self) -> dict:
        """OOF table, cv.json, fold-mean test predictions, submission and report."""
        done = [f for f in range(self.config.folds.k) if self.fold_done(f)]
        if not done:
            raise ConfigError(f"{self.run_dir}: no finished fold to summarise")
        oof = pd.concat(
            [
                pd.read_csv(self.fold_dir(f) / "oof.csv", dtype={"id": str}, keep_default_na=False)
                for f in done
            ]
        )
        write_csv(self.run_dir / "oof.csv", oof)
        cv = cv_scores(
            self.metric,
            oof["target"].to_numpy(),
            oof[self.classes].to_numpy(),
            oof["fold"].to_numpy(),
        )
        cv["k"] = self.config.folds.k
        if self.competition.holdout is not None:
            holdout = np.mean(
                [np.load(self.fold_dir(f) / "holdout_probs.npy") for f in done], axis=0
            )
            cv["lb"] = self.metric(self.competition.holdout["target"].to_numpy(), holdout)
        if self.competition.test is not None:
            test = np.mean([np.load(self.fold_dir(f) / "test_probs.npy") for f in done], axis=0)
            path = self.submissions_dir / f"{self.config.name}.csv"
            write_submission(path, self.competition, self.config, test)
            cv["submission"] = str(path)
        write_report(self.run_dir, cv, oof, self.classes)
        return cv


class _Subset:
    """Rows ``index`` of an array, read lazily (keeps the memory map)."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.index[i]]


def run_cv(config: Config, folds: list[int] | None = None, **paths) -> dict:
    """Run (or resume) the K-fold cross-validation described by ``config``."""
    return Run(config, **paths).run(folds)


def load_run_config(run_dir: Path) -> Config:
    from competition.config import build

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not a run folder (no config.yaml). Pass runs/<name>.")
    return build(Config, yaml.safe_load(path.read_text()))


def predict_run(run_dir: Path, overrides: dict | None = None, **paths) -> dict:
    """Re-predict test and holdout from each finished fold's best.pt (e.g. with other TTA)."""
    from competition.config import replace

    config = load_run_config(run_dir)
    if overrides:
        config = replace(config, overrides)
    runs_dir = Path(run_dir).parent
    run = Run(config, runs_dir=runs_dir, **paths)
    run._check_folds_unchanged()
    for fold in range(config.folds.k):
        if run.fold_done(fold):
            model = run.create_model().to(run.device)
            model.load_state_dict(load_torch(run.fold_dir(fold) / "best.pt", run.device)["model"])
            run.predict_fold(model, fold, np.flatnonzero(run.fold_of == fold))
    cv = run.summarise()
    write_json(run.run_dir / "cv.json", cv)
    return cv


def summary_table(cv: dict) -> str:
    """A short text table of a run's scores."""
    lines = [f"{'fold':>6}  {cv['metric']:>10}"]
    for fold, score in zip(cv["folds_done"], cv["folds"], strict=True):
        lines.append(f"{fold:>6}  {score:>10.4f}")
    lines.append(f"{'CV':>6}  {cv['mean']:>10.4f} ± {cv['std']:.4f}")
    lines.append(f"{'OOF':>6}  {cv['oof']:>10.4f}")
    if "lb" in cv:
        lines.append(f"{'LB':>6}  {cv['lb']:>10.4f}")
    if "submission" in cv:
        lines.append(f"submission: {cv['submission']}")
    return "\n".join(lines)


__all__ = ["Run", "load_run_config", "predict_run", "run_cv", "summary_table"]
