"""Decoupled classifiers on a finished training run's fold models, without retraining the backbone
(Kang et al. 2020, "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR).

Each fold's ``best.pt`` embeds the images (``model.embed``: pooled features, eval transforms);
only the classifier changes, and the result is a new run (a producer of :mod:`competition.runs`)
whose OOF, CV and submission compare and blend like any other:

* ``crt``: classifier re-training: a new linear classifier fitted on the frozen features of the
  fold's train rows, drawn with class-balanced sampling (the ``class_balanced`` sampler).
* ``tau_norm``: the trained classifier's weights rescaled ``w_j / ||w_j||^tau``, bias dropped.
  ``tau`` (grid :data:`TAUS`) is chosen by the run's metric without the rows it scores:
  ``select=inner`` (default) on a stratified part (``inner_fraction``) of the fold's train rows;
  those rows were seen in training, so the choice leans to small ``tau``; ``select=folds`` on
  the other folds' OOF rows, each scored by its own fold model (held out from that model).
* ``lws``: learnable weight scaling: only a per-class scale ``f_j`` of the classifier's logits
  (``f_j w_j x + b_j``) is learned, with class-balanced sampling.
* ``ncm``: nearest class mean of the run's own fine-tuned features (cosine, centred then L2; see
  :class:`competition.baseline.NCM`).

Features are cached under ``.cache/embeddings`` keyed on the content of ``best.pt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedShuffleSplit

from competition.baseline import (
    BaselineOptions,
    embedding_key,
    embeddings_dir,
    extract,
    fit_predict,
)
from competition.config import plain_name, replace
from competition.engine import load_checkpoint
from competition.errors import ConfigError, DamagedFileError, PluginError
from competition.io import atomic_path, remove_orphan_temporaries
from competition.manager import components, did_you_mean
from competition.runs import (
    FoldPredictions,
    FoldResult,
    FoldTask,
    OutputDirs,
    RunRecord,
    produce_run,
    run_reference,
)
from competition.workspace import Workspace

METHODS = ("crt", "tau_norm", "lws", "ncm")
SELECT = ("inner", "folds")
#: The grid ``tau_norm`` searches (Kang et al. search tau in [0, 2]).
TAUS = tuple(np.round(np.arange(0.0, 2.01, 0.1), 2).tolist())


@dataclasses.dataclass(frozen=True)
class DecoupleOptions:
    """Which classifier, and how it is fitted (see the module docstring)."""

    method: str = "crt"
    epochs: int = 100  # passes of class-balanced draws over the train rows (crt, lws)
    lr: float | None = None  # Adam learning rate; default 1e-3 (crt), 1e-2 (lws)
    batch_size: int = 128
    weight_decay: float = 5e-4  # crt
    select: str = "inner"  # tau_norm: where tau is chosen
    inner_fraction: float = 0.2  # tau_norm, select=inner: share of the train rows scored

    def __post_init__(self):
        for value, valid, key in (
            (self.method, METHODS, "--method"),
            (self.select, SELECT, "--select"),
        ):
            if value not in valid:
                raise ConfigError(
                    f"{key}={value!r}: unknown.{did_you_mean(value, valid)} Choose one of "
                    f"{', '.join(valid)}."
                )
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr={self.lr}: must be positive")
        if not 0 < self.inner_fraction < 1:
            raise ConfigError(f"--inner-fraction={self.inner_fraction}: must be in (0, 1)")


# -- classifiers on frozen features ---------------------------------------------------------------


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).numpy()


def head_parts(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The classifier's weight (K, D), bias (K,) or None, and its kind (``linear``/``cosine``)."""
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        bias = None if head.bias is None else head.bias.detach().float().cpu()
        return head.weight.detach().float().cpu(), bias, "linear"
    if head is not None and hasattr(head, "weight") and hasattr(head, "scale"):
        return head.weight.detach().float().cpu(), head.scale.detach().float().cpu(), "cosine"
    raise PluginError(
        "decouple: the model has no linear or cosine head (model.head); decoupling needs "
        "plugins.backbones.Classifier or a model with the same head attribute"
    )


def head_logits(x: torch.Tensor, weight, extra, kind: str) -> torch.Tensor:
    """The trained head's logits of features ``x``."""
    if kind == "cosine":
        return extra * F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))
    return F.linear(x, weight, extra)


def tau_norm_logits(x: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Kang et al.'s tau-normalised classifier: ``x . w_j / ||w_j||^tau`` (no bias)."""
    norms = weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return F.linear(x, weight / norms.pow(tau))


def train_on_features(
    logits_of,
    params: list[torch.Tensor],
    x: torch.Tensor,
    y: np.ndarray,
    num_classes: int,
    options: DecoupleOptions,
    lr: float,
    weight_decay: float,
    seed: int,
) -> None:
    """Fit ``params`` of ``logits_of(x)`` by cross-entropy on class-balanced draws of ``x``."""
    sampler_factory = components("samplers")["class_balanced"]
    generator = torch.Generator()
    sampler = sampler_factory(y, num_classes, generator)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps = options.epochs * math.ceil(len(y) / options.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    targets = torch.as_tensor(y, dtype=torch.long)
    for epoch in range(options.epochs):
        generator.manual_seed(seed * 100_003 + epoch)
        order = torch.tensor(list(sampler))
        for start in range(0, len(order), options.batch_size):
            rows = order[start : start + options.batch_size]
            loss = F.cross_entropy(logits_of(x[rows]), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def choose(metric, scores: dict) -> float:
    """The key of the best score in ``scores`` (ties: the first)."""
    best = max(scores.values()) if metric.higher_is_better else min(scores.values())
    return next(k for k, v in scores.items() if v == best)


# -- the producer ---------------------------------------------------------------------------------


class DecoupleFold:
    """Producer: fold ``k``'s features from its ``best.pt``, a new classifier, its predictions."""

    def __init__(self, workspace: Workspace, source: RunRecord, options: DecoupleOptions, log):
        self.workspace, self.source, self.options, self.log = workspace, source, options, log
        self.directory = embeddings_dir(workspace.config)
        remove_orphan_temporaries(self.directory)
        self.feature_seconds = 0.0
        self._heads: dict[int, tuple] = {}

    # features and heads of one fold model

    def _load(self, fold: int) -> torch.nn.Module:
        ws = self.workspace
        path = self.source.fold_dir(fold) / "best.pt"
        fix = (
            f"retrain fold {fold} of {self.source.path} (rm -r {path.parent}; run its train again)"
        )
        state = load_checkpoint(path, str(path), fix)["model"]
        model = ws.create_model()
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DamagedFileError(
                f"{path} does not fit the run's model ({str(exc)[:200]})"
            ) from None
        return model.to(ws.device).eval()

    def features(self, fold: int) -> dict[str, np.ndarray]:
        """Embeddings of ``train`` and every test/holdout split by fold ``fold``'s model."""
        ws = self.workspace
        digest = hashlib.sha1((self.source.fold_dir(fold) / "best.pt").read_bytes()).hexdigest()
        out, model = {}, None
        for split in ["train", *ws.split_names()]:
            key = embedding_key(ws, split, "identity")
            path = self.directory / f"decouple-{digest[:16]}-{split}-{key}.npy"
            if not path.is_file():
                started = time.perf_counter()
                model = model or self._load(fold)
                if not callable(getattr(model, "embed", None)):
                    raise PluginError("decouple: the model has no embed(x) (pooled features)")
                array = extract(ws, model, split, ["identity"])["identity"]
                with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, array)
                self.feature_seconds += time.perf_counter() - started
                self.log(f"fold {fold}: {split} features in {time.perf_counter() - started:.1f}s")
            out[split] = np.load(path)
        if fold not in self._heads:
            self._heads[fold] = head_parts(model or self._load(fold))
        return out

    # the methods

    def _tau_scores(self, fold: int, rows: np.ndarray) -> dict:
        ws = self.workspace
        x = torch.as_tensor(self.features(fold)["train"][rows])
        weight = self._heads[fold][0]
        y = ws.targets[rows]
        return {tau: ws.metric(y, _softmax(tau_norm_logits(x, weight, tau))) for tau in TAUS}

    def choose_tau(self, task: FoldTask) -> float:
        ws, options = self.workspace, self.options
        if options.select == "inner":
            y = ws.targets[task.train_index]
            split = StratifiedShuffleSplit(
                1, test_size=options.inner_fraction, random_state=ws.config.seed + task.fold
            )
            try:
                _, inner = next(split.split(np.zeros(len(y)), y))
            except ValueError:  # a class with one row: an unstratified part
                rng = np.random.default_rng(ws.config.seed + task.fold)
                inner = rng.permutation(len(y))[: max(1, round(options.inner_fraction * len(y)))]
            return choose(ws.metric, self._tau_scores(task.fold, task.train_index[inner]))
        others = [
            f for f in range(ws.config.folds.k) if f != task.fold and self.source.fold_done(f)
        ]
        if not others:
            raise ConfigError("decouple --select folds: needs at least two finished folds")
        totals = {tau: 0.0 for tau in TAUS}
        for other in others:
            rows = np.flatnonzero(ws.fold_of == other)
            for tau, score in self._tau_scores(other, rows).items():
                totals[tau] += score * len(rows)
        return choose(ws.metric, totals)

    def __call__(self, task: FoldTask) -> FoldPredictions:
        started = time.perf_counter()
        ws, options, fold = self.workspace, self.options, task.fold
        features = self.features(fold)
        splits = ws.split_names()
        train = features["train"]
        x_train, y_train = train[task.train_index], ws.targets[task.train_index]
        queries = [train[task.valid_index]] + [features[s] for s in splits]
        weight, extra, kind = self._heads[fold]
        num_classes = len(ws.classes)
        info: dict = {"method": options.method}
        torch.manual_seed(ws.config.seed + fold)
        if options.method == "ncm":
            probs = fit_predict(x_train, y_train, queries, num_classes, BaselineOptions("ncm"))
        elif options.method == "tau_norm":
            if kind != "linear":
                raise ConfigError(
                    f"decouple --method tau_norm: {self.source.path} has a cosine head, whose "
                    "weights are normalised already; use crt, lws or ncm"
                )
            tau = self.choose_tau(task)
            info.update(tau=tau, select=options.select)
            probs = [_softmax(tau_norm_logits(torch.as_tensor(q), weight, tau)) for q in queries]
        else:
            x = torch.as_tensor(x_train)
            if options.method == "crt":
                linear = torch.nn.Linear(x.shape[1], num_classes)
                params, decay = list(linear.parameters()), options.weight_decay
                lr = options.lr or 1e-3

                def logits_of(v):
                    return linear(v)
            else:
                scale = torch.ones(num_classes, requires_grad=True)
                params, decay, lr = [scale], 0.0, options.lr or 1e-2

                def logits_of(v):
                    if kind == "cosine":
                        return scale * head_logits(v, weight, extra, kind)
                    bias = 0.0 if extra is None else extra
                    return scale * F.linear(v, weight) + bias

            train_on_features(
                logits_of,
                params,
                x,
                y_train,
                num_classes,
                options,
                lr,
                decay,
                ws.config.seed + fold,
            )
            with torch.no_grad():
                probs = [_softmax(logits_of(torch.as_tensor(q))) for q in queries]
            if options.method == "lws":
                info["scales"] = [float(s) for s in scale.detach()]
        result = FoldResult(
            fold,
            best_score=ws.metric(ws.targets[task.valid_index], probs[0]),
            seconds=time.perf_counter() - started,
            info=info,
        )
        return FoldPredictions(probs[0], dict(zip(splits, probs[1:], strict=True)), result)


def decouple_run(
    run_dir: str | Path,
    options: DecoupleOptions,
    name: str | None = None,
    folds=None,
    log=print,
    **paths,
) -> dict:
    """A new run: ``run_dir``'s fold models with a decoupled classifier (``options.method``).

    ``run_dir`` must be a training run (it holds ``fold_<k>/best.pt``); the new run is
    ``runs/<name>`` (default ``<run>-<method>``) and the source is not changed.
    """
    source = RunRecord.open(run_dir)
    verb = source.produced_by.get("verb", "train")
    if verb != "train":
        raise ConfigError(
            f"decouple {run_dir}: a {verb} run; decoupling needs the fold models of a training "
            "run (competition train), which hold fold_<k>/best.pt"
        )
    done = source.done_folds()
    if not done:
        raise ConfigError(f"decouple {run_dir}: no finished fold yet; finish its training first")
    folds = done if folds is None else [f for f in folds if f in done]
    suffix = options.method if options.method != "tau_norm" else f"tau_norm-{options.select}"
    name = plain_name(name or f"{source.name}-{suffix}", "decouple --name")
    dirs = OutputDirs(**{"runs_dir": Path(run_dir).parent, **paths})
    if (Path(dirs.runs_dir) / name).resolve() == source.path.resolve():
        raise ConfigError(f"decouple --name {name}: that is the source run; choose another name")
    workspace = Workspace(replace(source.config, {"name": name}), dirs.folds_dir, log)
    producer = DecoupleFold(workspace, source, options, log)
    produced_by = {
        "verb": "decouple",
        "source": run_reference(source.path),
        "method": f"{options.method} (Kang et al. 2020) on the source's fold models' features",
        "decouple": dataclasses.asdict(options),
    }
    cv = produce_run(workspace, produced_by, producer, folds, dirs)
    return {**cv, "feature_seconds": round(producer.feature_seconds, 1)}


__all__ = [
    "METHODS",
    "TAUS",
    "DecoupleFold",
    "DecoupleOptions",
    "decouple_run",
    "head_parts",
    "tau_norm_logits",
]
