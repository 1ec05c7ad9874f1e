"""Frozen-feature baselines: k-NN, nearest class mean and logistic regression on embeddings.

No training of the network: the pretrained backbone embeds every image once (``model.embed``, eval
transforms at the eval size), the embeddings are cached on disk, and a cheap classifier is fitted
per fold on the fold's train part. A baseline is a fold producer of the run record
(:mod:`competition.runs`): its run has the same files, events and submission as a training run.

Methods and the probabilities they give:

* ``knn``: cosine k-nearest neighbours with a similarity-weighted vote, weights
  ``exp(similarity / temperature)`` (Wu et al. 2018, "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination"; Caron et al. 2021, DINO, use k=20, temperature 0.07).
  The probability of a class is its share of the weight of the k neighbours (one-hot for k=1).
* ``ncm``: nearest class mean with cosine similarity (Mensink et al. 2013, "Distance-Based Image
  Classification: Generalizing to New Classes at Near-Zero Cost"); probabilities are a softmax of
  the similarities to the class means divided by the temperature.
* ``linear``: multinomial logistic regression (scikit-learn, L2 penalty ``C``), its own
  probabilities: the classic linear probe. Unless ``--C`` is given, ``C`` is chosen on each
  fold's train rows by an inner stratified 3-fold CV over :data:`C_GRID` on the competition's
  metric (ties broken by log loss), then refitted on all of them (Kornblith et al. 2019, "Do
  Better ImageNet Models Transfer Better?", tune the probe's L2 strength on a validation split).

Feature normalisation (``norm``), fitted on each fold's train rows only: ``none``, ``l2``,
``center_l2`` (subtract the train mean, then L2; Wang et al. 2019, "SimpleShot: Revisiting
Nearest-Neighbor Classification for Few-Shot Learning"), ``pca`` / ``pca_whiten`` (centre, project
on the first ``pca_dim`` principal components, optionally whitened, then L2). k-NN and NCM always
compare L2-normalised vectors (cosine).

Several backbones (``model.backbone: [tf_efficientnet_lite0, tf_efficientnet_lite1]`` with
``model.pretrained`` a list of the same length, or null): each backbone's embeddings are cached on
their own, centred (train-row mean) and L2-normalised block by block, concatenated, then
normalised as above; each block then weighs alike whatever its width or scale.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from competition.config import REPO_ROOT, Config, replace
from competition.device import autocast, to_device
from competition.errors import ConfigError, PluginError
from competition.images import cache_key
from competition.io import atomic_path, remove_orphan_temporaries
from competition.metrics import Metric, get_metric, log_loss
from competition.progress import progress
from competition.runs import FoldPredictions, FoldResult, FoldTask, OutputDirs, produce_run
from competition.runtime import inference_forward, onnx_dir
from competition.workspace import Workspace

METHODS = ("knn", "ncm", "linear")
NORMS = ("none", "l2", "center_l2", "pca", "pca_whiten")
SPLITS = ("train", "test", "holdout")
#: Values of ``C`` the linear probe's inner CV tries (``--C`` fixes one instead).
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
INNER_FOLDS = 3


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        close = difflib.get_close_matches(value, valid, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{key}={value!r}: unknown.{hint} Choose one of {', '.join(valid)}.")


@dataclasses.dataclass(frozen=True)
class BaselineOptions:
    """How embeddings are normalised and classified (see the module docstring)."""

    method: str = "knn"
    k: int = 20  # neighbours (knn)
    temperature: float = 0.07  # similarity temperature (knn weights, ncm softmax)
    norm: str = "center_l2"
    pca_dim: int = 256  # components kept by norm=pca / pca_whiten (capped by rows and features)
    C: float | None = None  # inverse L2 strength (linear); None: inner CV over C_GRID
    hflip: bool = False  # average the embeddings of the image and its mirror image

    def __post_init__(self):
        _choice(self.method, METHODS, "--method")
        _choice(self.norm, NORMS, "--norm")
        if self.k < 1:
            raise ConfigError(f"--k={self.k}: must be at least 1")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature={self.temperature}: must be positive")
        if self.pca_dim < 1:
            raise ConfigError(f"--pca-dim={self.pca_dim}: must be at least 1")
        if self.C is not None and self.C <= 0:
            raise ConfigError(f"--C={self.C}: must be positive")


# -- normalisation and classifiers ----------------------------------------------------------------


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Normaliser:
    """Feature normalisation; :meth:`fit` sees the train rows only, :meth:`transform` any rows."""

    def __init__(self, kind: str = "center_l2", pca_dim: int = 256, blocks=None):
        _choice(kind, NORMS, "--norm")
        self.kind, self.pca_dim = kind, pca_dim
        self.blocks = list(blocks) if blocks is not None and len(blocks) > 1 else None
        self.block_mean_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.pca_: PCA | None = None

    def _blockwise(self, x: np.ndarray) -> np.ndarray:
        """Each backbone's block centred on the train mean and L2-normalised (several only)."""
        if self.blocks is None:
            return x
        if x.shape[1] != sum(self.blocks):
            raise ConfigError(f"features of width {x.shape[1]}, expected blocks {self.blocks}")
        edges = np.cumsum([0, *self.blocks])
        centred = x - self.block_mean_
        return np.hstack([l2(centred[:, a:b]) for a, b in itertools.pairwise(edges)])

    def fit(self, x: np.ndarray) -> Normaliser:
        x = np.asarray(x, dtype=np.float64)
        if self.blocks is not None:
            self.block_mean_ = x.mean(axis=0)
            x = self._blockwise(x)
        self.mean_ = x.mean(axis=0)
        if self.kind in ("pca", "pca_whiten"):
            dim = min(self.pca_dim, x.shape[0] - 1, x.shape[1])
            if dim < 1:
                raise ConfigError(f"--norm={self.kind}: needs at least 2 training rows")
            whiten = self.kind == "pca_whiten"
            self.pca_ = PCA(dim, whiten=whiten, svd_solver="covariance_eigh").fit(x)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.blocks is not None:
            if self.block_mean_ is None:
                raise RuntimeError("Normaliser.transform before fit")
            x = self._blockwise(x)
        if self.kind == "none":
            return x
        if self.kind == "l2":
            return l2(x)
        if self.mean_ is None:
            raise RuntimeError("Normaliser.transform before fit")
        if self.kind == "center_l2":
            return l2(x - self.mean_)
        return l2(self.pca_.transform(x))


class KNN:
    """Cosine k-NN, similarity-weighted vote with weights exp(similarity / temperature)."""

    def __init__(self, num_classes: int, k: int = 10, temperature: float = 0.07):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def fit(self, x: np.ndarray, y: np.ndarray) -> KNN:
        self.x, self.y = l2(x), np.asarray(y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        similarity = l2(x) @ self.x.T  # (N, M)
        k = min(self.k, len(self.y))
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(similarity, top, axis=1)
        weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / self.temperature)
        probs = np.zeros((len(x), self.num_classes))
        np.add.at(probs, (np.arange(len(x))[:, None], self.y[top]), weights)
        return probs / probs.sum(axis=1, keepdims=True)


class NCM:
    """Nearest class mean (cosine); softmax of the similarities / temperature."""

    def __init__(self, num_classes: int, temperature: float = 0.07):
        self.num_classes, self.temperature = num_classes, temperature

    def fit(self, x: np.ndarray, y: np.ndarray) -> NCM:
        x, y = l2(x), np.asarray(y)
        self.present = np.isin(np.arange(self.num_classes), y)
        means = np.zeros((self.num_classes, x.shape[1]))
        for c in np.flatnonzero(self.present):
            means[c] = x[y == c].mean(axis=0)
        self.means = l2(means)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = l2(x) @ self.means.T / self.temperature
        logits[:, ~self.present] = -np.inf  # a class absent from the train rows gets 0
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)


def _full_probs(model: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


class Linear:
    """Multinomial logistic regression (L2 penalty, lbfgs); ``C=None``: chosen by inner CV.

    The inner CV splits the rows given to :meth:`fit` (a fold's train rows) into
    :data:`INNER_FOLDS` stratified parts, fits every ``C`` of ``grid`` (ascending, each fit
    warm-started from the previous one), scores the held-out part with ``metric`` (ties: log
    loss) and keeps the best mean; ``C_`` and ``scores_`` say what was chosen and why.
    """

    def __init__(
        self,
        num_classes: int,
        C: float | None = 1.0,
        metric: Metric | None = None,
        grid: tuple[float, ...] = C_GRID,
        seed: int = 0,
    ):
        self.num_classes, self.C, self.grid, self.seed = num_classes, C, tuple(sorted(grid)), seed
        self.metric = metric or get_metric("accuracy")
        self.C_: float | None = C
        self.scores_: dict[float, tuple[float, float]] = {}

    def _inner_scores(self, x: np.ndarray, y: np.ndarray) -> dict[float, tuple[float, float]]:
        counts = np.bincount(y)
        splits = min(INNER_FOLDS, int(counts[counts > 0].min()))
        if splits < 2:
            return {}
        inner = StratifiedKFold(splits, shuffle=True, random_state=self.seed)
        scores: dict[float, list] = {c: [] for c in self.grid}
        for fit_rows, score_rows in inner.split(x, y):
            model = LogisticRegression(max_iter=2000, warm_start=True)
            for c in self.grid:
                model.set_params(C=c).fit(x[fit_rows], y[fit_rows])
                probs = _full_probs(model, x[score_rows], self.num_classes)
                target = y[score_rows]
                scores[c].append((self.metric(target, probs), log_loss(target, probs)))
        return {c: tuple(np.mean(v, axis=0).tolist()) for c, v in scores.items()}

    def fit(self, x: np.ndarray, y: np.ndarray) -> Linear:
        y = np.asarray(y)
        if self.C is None:
            self.scores_ = self._inner_scores(x, y)
            sign = 1.0 if self.metric.higher_is_better else -1.0
            self.C_ = (
                max(self.scores_, key=lambda c: (sign * self.scores_[c][0], -self.scores_[c][1]))
                if self.scores_
                else 1.0  # a class with one train row: no inner split, the default
            )
        self.model = LogisticRegression(C=self.C_, max_iter=2000).fit(x, y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _full_probs(self.model, x, self.num_classes)


def make_classifier(options: BaselineOptions, num_classes: int, metric: Metric | None = None):
    if options.method == "knn":
        return KNN(num_classes, options.k, options.temperature)
    if options.method == "ncm":
        return NCM(num_classes, options.temperature)
    return Linear(num_classes, options.C, metric)


def fit_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    queries: list[np.ndarray],
    num_classes: int,
    options: BaselineOptions,
    blocks: list[int] | None = None,
    metric: Metric | None = None,
    details: dict | None = None,
) -> list[np.ndarray]:
    """Fit normaliser and classifier on the train rows; class probabilities of each query set.

    ``blocks``: the widths of the backbones' features concatenated in the columns; ``metric``
    scores the linear probe's inner CV; ``details`` receives the chosen ``C``.
    """
    norm = Normaliser(options.norm, options.pca_dim, blocks).fit(train_x)
    classifier = make_classifier(options, num_classes, metric)
    classifier.fit(norm.transform(train_x), train_y)
    if details is not None and isinstance(classifier, Linear):
        details["C"] = classifier.C_
        if classifier.scores_:
            details["inner_cv"] = {str(c): s[0] for c, s in classifier.scores_.items()}
    return [classifier.predict_proba(norm.transform(q)) for q in queries]


# -- embeddings -----------------------------------------------------------------------------------


def embeddings_dir(config: Config) -> Path:
    """``<data.cache_dir>/../embeddings`` (``.cache/embeddings`` by default)."""
    return (REPO_ROOT / config.data.cache_dir).parent / "embeddings"


def weights_identity(config: Config) -> dict:
    """What the embedding weights are: a file's content hash, a package name, or a seeded init.

    Without pretrained weights the backbone is initialised from ``seed`` (see
    :meth:`EmbeddingStore._model`), so train and test embeddings always come from one model.
    """
    source = config.model.pretrained
    if source is None:
        return {"random_init": config.seed, "timm": _version("timm"), "torch": _version("torch")}
    path = Path(source)
    if path.is_file():
        digest = hashlib.sha1()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {"file_sha1": digest.hexdigest()}
    return {"package": source}


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def backbone_configs(config: Config) -> list[Config]:
    """One config per backbone of ``model.backbone`` (a name, or a list of names for baselines).

    With a list, ``model.pretrained`` is null (no weights) or a list of the same length.
    """
    model = config.model
    if isinstance(model.backbone, str):
        if isinstance(model.pretrained, list):
            raise ConfigError(
                f"model.pretrained is a list {model.pretrained} but model.backbone is one name "
                f"({model.backbone}): give one weights source, or a list of backbones"
            )
        return [config]
    if not model.backbone:
        raise ConfigError("model.backbone: an empty list; name one backbone or several")
    pretrained = model.pretrained
    if pretrained is None:
        pretrained = [None] * len(model.backbone)
    if not isinstance(pretrained, list) or len(pretrained) != len(model.backbone):
        raise ConfigError(
            f"model.backbone lists {len(model.backbone)} backbones, so model.pretrained must be "
            f"null or a list of {len(model.backbone)} weights sources (one per backbone, e.g. "
            "[efficientnet_lite0_imagenet, efficientnet_lite1_imagenet]), not "
            f"{model.pretrained!r}"
        )
    pairs = list(zip(model.backbone, pretrained, strict=True))
    if len(set(pairs)) < len(pairs):
        raise ConfigError(
            f"model.backbone lists one backbone with the same weights twice: {model.backbone}"
        )
    return [
        replace(config, {"model.backbone": b, "model.pretrained": p})
        for b, p in zip(model.backbone, pretrained, strict=True)
    ]


def embedding_key(run: Workspace, split: str, view: str, config: Config | None = None) -> str:
    """Everything an embedding depends on: weights' content, pooling, eval pipeline, the images.

    ``config``: the one-backbone config (default ``run.config``).
    """
    config = config or run.config
    data = config.data
    paths = [Path(p) for p in getattr(run.competition, split)["path"]]
    parts = {
        "backbone": config.model.backbone,
        "weights": weights_identity(config),
        "pooling": config.model.pooling,
        "eval_size": run.eval_size,
        "crop_pct": data.crop_pct,
        "eval": [dataclasses.asdict(s) for s in config.augment.eval],
        "images": cache_key(paths, run.cache_side, data.resize),
        "view": view,
    }
    if config.model.kwargs:  # another architecture (img_size...); absent keeps old keys valid
        parts["model_kwargs"] = config.model.kwargs
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.inference_mode()
def extract(run: Workspace, model: torch.nn.Module, split: str, views: list[str]) -> dict:
    """Embeddings (N, D) float32 of ``split`` for each view (``identity``, ``hflip``).

    ``model.embed`` runs on ``inference.runtime`` (:mod:`competition.runtime`; equal to eager).
    """
    config = run.config
    channels_last = config.model.channels_last
    chunks: dict[str, list] = {view: [] for view in views}
    loader = run.loader(split)
    count = len(loader.dataset) * len(views)
    runtime = config.inference.runtime
    cache = onnx_dir(config)
    embed = inference_forward(
        model, "embed", run.device, runtime, config.amp, cache, count, run.log
    )
    for images, _ in progress(loader, desc=f"embed {split}", unit="batch"):
        images = to_device(images, run.device, channels_last)
        for view in views:
            x = images.flip(3) if view == "hflip" else images
            with autocast(run.device, config.amp):
                chunks[view].append(embed(x).float().cpu())
    return {view: torch.cat(c).numpy().astype(np.float32) for view, c in chunks.items()}


class EmbeddingStore:
    """Embeddings of a run's splits, computed once per image and view and cached on disk.

    ``config``: the one-backbone config whose model embeds (default ``run.config``).
    """

    def __init__(self, run: Workspace, log=print, config: Config | None = None):
        self.run, self.log = run, log
        self.config = config or run.config
        if not isinstance(self.config.model.backbone, str):
            raise ConfigError("EmbeddingStore embeds with one backbone; see backbone_configs")
        self.directory = embeddings_dir(self.config)
        remove_orphan_temporaries(self.directory)
        self.model: torch.nn.Module | None = None
        self.computed: list[str] = []  # "<split>/<view>" computed (not read from the cache)
        self.seconds = 0.0

    def path(self, split: str, view: str) -> Path:
        name = self.config.competition.name
        backbone = self.config.model.backbone.replace("/", "_")
        key = embedding_key(self.run, split, view, self.config)
        return self.directory / f"{name}-{split}-{backbone}-{self.run.eval_size}px-{view}-{key}.npy"

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            # seeded: a backbone without pretrained weights is the same random one every time
            torch.manual_seed(self.config.seed)
            model = self.run.pm.hook.competition_create_model(
                config=self.config, num_classes=len(self.run.classes)
            )
            if not callable(getattr(model, "embed", None)):
                raise PluginError(
                    f"model.backbone={self.config.model.backbone}: the model has no embed(x); "
                    "baselines need pooled features (plugins.backbones.Classifier has one)."
                )
            model = model.to(self.run.device).eval()
            if self.config.model.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.model = model
        return self.model

    def get(self, split: str, hflip: bool = False) -> np.ndarray:
        """(N, D) embeddings of ``split``; the mean with the mirror image's when ``hflip``."""
        views = ["identity", "hflip"] if hflip else ["identity"]
        paths = {view: self.path(split, view) for view in views}
        missing = [view for view in views if not paths[view].is_file()]
        if missing:
            started = time.perf_counter()
            arrays = extract(self.run, self._model(), split, missing)
            for view, array in arrays.items():
                with atomic_path(paths[view]) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, array)
                self.computed.append(f"{split}/{view}")
            seconds = time.perf_counter() - started
            self.seconds += seconds
            self.log(
                f"embeddings {split} {missing}: computed in {seconds:.1f}s -> {self.directory}"
            )
        return np.mean([np.load(paths[view]) for view in views], axis=0)


# -- the run --------------------------------------------------------------------------------------


#: The options each method uses, in the order they appear in a run name.
USED = {
    "knn": ("k", "temperature", "norm", "pca_dim", "hflip"),
    "ncm": ("temperature", "norm", "pca_dim", "hflip"),
    "linear": ("C", "norm", "pca_dim", "hflip"),
}


def baseline_name(name: str, options: BaselineOptions) -> str:
    """``<name>-<method>`` plus the options that differ from the defaults: ``exp-knn-k3-hflip``.

    Each choice of options is its own run, so two choices compare side by side.
    """
    default = BaselineOptions(method=options.method)
    parts = [options.method]
    for key in USED[options.method]:
        value = getattr(options, key)
        if key == "pca_dim" and options.norm not in ("pca", "pca_whiten"):
            continue
        if value != getattr(default, key):
            parts.append(key if value is True else f"{key}{value}")
    return "-".join([name, *parts])


class BaselineFold:
    """Producer: fit the classifier on the fold's train embeddings, predict the rest."""

    def __init__(self, workspace: Workspace, options: BaselineOptions, features: dict, blocks=None):
        self.workspace, self.options, self.features = workspace, options, features
        self.blocks = blocks

    def __call__(self, task: FoldTask) -> FoldPredictions:
        started = time.perf_counter()
        train = self.features["train"]
        targets = self.workspace.targets
        others = [s for s in self.workspace.split_names() if s in self.features]
        probs = fit_predict(
            train[task.train_index],
            targets[task.train_index],
            [train[task.valid_index]] + [self.features[s] for s in others],
            len(self.workspace.classes),
            self.options,
            self.blocks,
            self.workspace.metric,
            details := {"method": self.options.method},
        )
        result = FoldResult(
            task.fold,
            best_score=self.workspace.metric(targets[task.valid_index], probs[0]),
            seconds=time.perf_counter() - started,
            info=details,
        )
        return FoldPredictions(probs[0], dict(zip(others, probs[1:], strict=True)), result)


def run_baseline(config: Config, options: BaselineOptions, folds=None, log=print, **paths) -> dict:
    """K-fold CV of a frozen-feature baseline as the run ``runs/<name>-<method>[-<options>]/``.

    ``paths`` are :class:`~competition.runs.OutputDirs` fields. The embeddings come from the cache
    when present. With a holdout set, ``cv["lb_full"]`` is its score when fitted on all rows.
    """
    started = time.perf_counter()
    config = replace(config, {"name": baseline_name(config.name, options)})
    dirs = OutputDirs(**paths)
    workspace = Workspace(config, dirs.folds_dir, log)
    stores = [EmbeddingStore(workspace, log, c) for c in backbone_configs(config)]
    splits = ["train", *workspace.split_names()]
    parts = {split: [store.get(split, options.hflip) for store in stores] for split in splits}
    features = {split: np.hstack(arrays) for split, arrays in parts.items()}
    blocks = [a.shape[1] for a in parts["train"]] if len(stores) > 1 else None
    produced_by = {"verb": "baseline", "baseline": dataclasses.asdict(options)}
    producer = BaselineFold(workspace, options, features, blocks)
    cv = produce_run(workspace, produced_by, producer, folds, dirs)
    if "holdout" in features:
        (holdout_probs,) = fit_predict(
            features["train"],
            workspace.targets,
            [features["holdout"]],
            len(workspace.classes),
            options,
            blocks,
            workspace.metric,
        )
        cv["lb_full"] = workspace.metric(
            workspace.competition.holdout["target"].to_numpy(), holdout_probs
        )
    cv["embeddings"] = {
        "computed": [c for store in stores for c in store.computed],
        "seconds": round(sum(store.seconds for store in stores), 1),
        "dims": [a.shape[1] for a in parts["train"]],
    }
    cv["seconds"] = round(time.perf_counter() - started, 1)
    return cv


__all__ = [
    "C_GRID",
    "KNN",
    "METHODS",
    "NCM",
    "NORMS",
    "BaselineOptions",
    "EmbeddingStore",
    "Linear",
    "Normaliser",
    "backbone_configs",
    "fit_predict",
    "run_baseline",
]
