"""Training and re-prediction as fold producers of the run record (:mod:`competition.runs`).

``train`` trains one model per fold (:class:`~competition.engine.FoldTrainer`), keeps the best
epoch and predicts the fold's validation rows (OOF), the test set and a holdout with the TTA views.
``predict`` writes a *new* run from another run's fold weights with other settings (TTA, eval size,
another test set): the source run never changes, so two choices compare side by side on OOF.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from competition import distributed
from competition.config import Config, replace, require_one_backbone
from competition.device import select_device
from competition.engine import FoldTrainer, load_checkpoint
from competition.errors import ConfigError, DamagedFileError
from competition.predict import predict_probs
from competition.runs import (
    FoldPredictions,
    FoldResult,
    FoldTask,
    OutputDirs,
    RunRecord,
    produce_run,
    run_reference,
)
from competition.runtime import onnx_dir
from competition.workspace import Workspace


def predict_splits(workspace: Workspace, model, fold: int, valid_index: np.ndarray, oof=None):
    """OOF probabilities of ``valid_index`` (unless given) and of every test/holdout split, with
    the TTA views merged as ``tta_merge`` says."""
    config = workspace.config

    def predict(loader, desc):  # under torchrun: this process's shard, then all shards in order
        return distributed.gather_rows(
            predict_probs(
                model,
                loader,
                workspace.device,
                workspace.views,
                amp=config.amp,
                channels_last=config.model.channels_last,
                desc=desc,
                merge=config.tta_merge,
                runtime=config.inference.runtime,
                cache_dir=onnx_dir(config),
            )
        )

    if oof is None:
        oof = predict(workspace.loader("train", valid_index), f"fold {fold} OOF")
    splits = {s: predict(workspace.loader(s), f"fold {fold} {s}") for s in workspace.split_names()}
    return oof, splits


class TrainFold:
    """Producer: train fold ``k`` from scratch (or resume it), then predict with its best model."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def __call__(self, task: FoldTask) -> FoldPredictions:
        ws, config = self.workspace, self.workspace.config
        fold, valid_index = task.fold, task.valid_index
        torch.manual_seed(config.seed + fold)
        targets = ws.targets
        counts = self.class_counts(task)
        model = ws.create_model()  # the same initial weights in every process
        torch.manual_seed(config.seed + fold + 7_919 * distributed.rank())  # own dropout, mixup
        trainer = FoldTrainer(
            fold,
            model,
            ws.create_loss(counts),
            ws.create_batch_augments(model),
            config,
            ws.metric,
            task.directory,
            ws.device,
            len(ws.classes),
            on_epoch_end=lambda epoch, row: ws.pm.hook.competition_epoch_end(
                fold=fold, epoch=epoch, metrics=row, run_dir=task.run_dir
            ),
            log=ws.log,
        )
        trained = trainer.fit(
            self.train_loader(task), ws.loader("train", valid_index), targets[valid_index]
        )
        oof, splits = predict_splits(ws, trainer.load_best(), fold, valid_index)
        return FoldPredictions(oof, splits, trained)

    def class_counts(self, task: FoldTask) -> list[int]:
        """Training images per class (what class-balanced losses see)."""
        targets = self.workspace.targets[task.train_index]
        return np.bincount(targets, minlength=len(self.workspace.classes)).tolist()

    def train_loader(self, task: FoldTask):
        """The fold's training batches; a subclass may add rows (:mod:`competition.pseudo`)."""
        seed = self.workspace.config.seed + task.fold
        return self.workspace.loader("train", task.train_index, train=True, seed=seed)


def run_cv(
    config: Config, folds: list[int] | None = None, log=print, after_fold=None, **paths
) -> dict:
    """Run (or resume) the K-fold cross-validation described by ``config``; its ``cv`` dict.

    ``paths`` are :class:`~competition.runs.OutputDirs` fields (tests point them at a temp dir).
    """
    require_one_backbone(config, "train")
    dirs = OutputDirs(**paths)
    if distributed.launched():  # under torchrun: join the process group; one process reports
        distributed.setup(select_device(config.device))
        log = log if distributed.is_main() else _quiet
    with distributed.main_first():  # rank 0 writes the folds and the image caches
        workspace = Workspace(config, dirs.folds_dir, log)
        if distributed.active() and distributed.is_main():
            for split in ("train", *workspace.split_names()):
                workspace.images(split)
    return produce_run(workspace, {"verb": "train"}, TrainFold(workspace), folds, dirs, after_fold)


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than rank 0 under torchrun."""


# -- predict: a new run from another run's fold weights ------------------------------------------

#: Settings a re-prediction may change; anything else would need the folds to be trained again.
PREDICT_KEYS = (
    "name",
    "tta",
    "tta_merge",
    "tracking",
    "device",
    "amp",
    "inference",
    "metric",
    "data.eval_image_size",
    "data.eval_batch_size",
    "data.num_workers",
    "data.cache_dir",
    "augment.eval",
    "competition.test_images",
    "competition.test_csv",
    "competition.test_dir",
    "competition.sample_submission",
    "competition.solution_csv",
    "competition.holdout_dir",
    "competition.submission_format",
)


class PredictFold:
    """Producer: load fold ``k``'s best weights from the source run and predict with them."""

    def __init__(self, workspace: Workspace, weights: RunRecord, oof: dict | None = None):
        self.workspace, self.weights = workspace, weights
        self.oof = oof or {}  # fold -> OOF probabilities made already (by ``--tta auto``)

    def __call__(self, task: FoldTask) -> FoldPredictions:
        started = time.perf_counter()
        model = self.load_model(task.fold)
        oof, splits = predict_splits(
            self.workspace, model, task.fold, task.valid_index, self.oof.get(task.fold)
        )
        info = {"weights": run_reference(self.weights.path)}
        return FoldPredictions(
            oof, splits, FoldResult(task.fold, seconds=time.perf_counter() - started, info=info)
        )

    def load_model(self, fold: int) -> torch.nn.Module:
        """Fold ``fold``'s best model of the weights run, on the workspace's device."""
        ws = self.workspace
        path = self.weights.fold_dir(fold) / "best.pt"
        fix = (
            f"retrain fold {fold} of {self.weights.path}: rm -r {path.parent}, then run its "
            "train command again"
        )
        state = load_checkpoint(path, str(path), fix, map_location=ws.device)["model"]
        model = ws.create_model().to(ws.device)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DamagedFileError(
                f"{path} does not fit the model of {ws.config.name} ({str(exc)[:200]}): predict "
                "uses the architecture the weights were trained with"
            ) from None
        return model


def derived_name(source: str, overrides: dict) -> str:
    """``<source>-<what changed>``, e.g. ``exp1-tta-identity-hflip``, short and plain."""
    text = "-".join(
        f"{key.split('.')[-1]}-{json.dumps(value, default=str)}" for key, value in overrides.items()
    )
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.")[:48].strip("-.")
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
    return f"{source}-{slug or 'predict'}-{digest[:6]}"


def predict_run(
    run_dir: str | Path,
    overrides: dict | None = None,
    name: str | None = None,
    log=print,
    candidates: list | None = None,
    **paths,
) -> dict:
    """A new run predicted by ``run_dir``'s fold weights with ``overrides`` (e.g. other TTA).

    The new run's ``config.yaml`` holds its own settings and names the run whose weights it used;
    the source run is not changed. ``tta="auto"`` chooses the views on OOF among ``candidates``
    (:mod:`competition.tta_select`).
    """
    overrides = dict(overrides or {})
    auto = overrides.get("tta") == "auto"
    if candidates is not None and not auto:
        raise ConfigError("predict --candidates: only with --tta auto (it lists what auto tries)")
    source = RunRecord.open(run_dir)
    if source.produced_by.get("verb") in ("baseline", "ensemble", "adjust", "decouple"):
        raise ConfigError(
            f"predict {run_dir}: a {source.produced_by['verb']} run has no fold weights to "
            "predict with; run its verb again with the new settings"
        )
    fixed = [k for k in overrides if not any(k == p or k.startswith(p + ".") for p in PREDICT_KEYS)]
    if fixed:
        raise ConfigError(
            f"predict: {', '.join(fixed)} cannot change: the fold weights in {run_dir} were "
            f"trained with them. predict changes {', '.join(PREDICT_KEYS[1:])}; train a new run "
            "for anything else."
        )
    weights = source.weights_run()
    named = {**overrides, **({"candidates": candidates} if candidates is not None else {})}
    name = name or overrides.pop("name", None) or derived_name(source.name, named)
    settings = {k: v for k, v in overrides.items() if not (auto and k == "tta")}
    config = replace(source.config, {**settings, "name": name})
    dirs = OutputDirs(**{"runs_dir": Path(run_dir).parent, **paths})
    if (Path(dirs.runs_dir) / name).resolve() == Path(run_dir).resolve():
        raise ConfigError(f"predict --name {name}: that is the source run; choose another name")
    workspace = Workspace(config, dirs.folds_dir, log)
    produced_by = {
        "verb": "predict",
        "source": run_reference(source.path),
        "weights": run_reference(weights.path),
        "changed": overrides,
    }
    producer = PredictFold(workspace, weights)
    if auto:
        from competition.tta_select import auto_tta

        producer = auto_tta(producer, source, candidates, produced_by, dirs)
    return produce_run(producer.workspace, produced_by, producer, source.done_folds(), dirs)


__all__ = ["PREDICT_KEYS", "PredictFold", "TrainFold", "derived_name", "predict_run", "run_cv"]
