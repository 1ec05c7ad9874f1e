"""Frozen-feature baselines: k-NN, nearest class mean and logistic regression on embeddings.

No training of the network: the pretrained backbone embeds every image once (``model.embed``, eval
transforms at the eval size), the embeddings are cached on disk, and a cheap classifier is fitted
per fold on the fold's train part. The run writes the same files as ``competition train``
(``fold_<k>/{oof.csv, test_probs.npy, holdout_probs.npy, result.json}``), so
:meth:`competition.cv.Run.summarise` makes ``oof.csv``, ``cv.json``, the report and the submission.

Methods and the probabilities they give:

* ``knn``: cosine k-nearest neighbours with a similarity-weighted vote, weights
  ``exp(similarity / temperature)`` (Wu et al. 2018, "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination"; Caron et al. 2021, DINO, use k=20, temperature 0.07).
  The probability of a class is its share of the weight of the k neighbours (one-hot for k=1).
* ``ncm``: nearest class mean with cosine similarity (Mensink et al. 2013, "Distance-Based Image
  Classification: Generalizing to New Classes at Near-Zero Cost"); probabilities are a softmax of
  the similarities to the class means divided by the temperature.
* ``linear``: multinomial logistic regression (scikit-learn, L2 penalty ``C``), its own
  probabilities: the classic linear probe.

Feature normalisation (``norm``), fitted on each fold's train rows only: ``none``, ``l2``,
``center_l2`` (subtract the train mean, then L2; Wang et al. 2019, "SimpleShot: Revisiting
Nearest-Neighbor Classification for Few-Shot Learning"), ``pca`` / ``pca_whiten`` (centre, project
on the first ``pca_dim`` principal components, optionally whitened, then L2). k-NN and NCM always
compare L2-normalised vectors (cosine).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from competition.config import REPO_ROOT, Config, replace
from competition.cv import Run
from competition.device import autocast, to_device
from competition.errors import ConfigError, PluginError
from competition.images import cache_key
from competition.io import atomic_path, save_numpy, write_csv, write_json

METHODS = ("knn", "ncm", "linear")
NORMS = ("none", "l2", "center_l2", "pca", "pca_whiten")
SPLITS = ("train", "test", "holdout")


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
    C: float = 1.0  # inverse L2 strength (linear)
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
        if self.C <= 0:
            raise ConfigError(f"--C={self.C}: must be positive")


# -- normalisation and classifiers ----------------------------------------------------------------


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Normaliser:
    """Feature normalisation; :meth:`fit` sees the train rows only, :meth:`transform` any rows."""

    def __init__(self, kind: str = "center_l2", pca_dim: int = 256):
        _choice(kind, NORMS, "--norm")
        self.kind, self.pca_dim = kind, pca_dim
        self.mean_: np.ndarray | None = None
        self.pca_: PCA | None = None

    def fit(self, x: np.ndarray) -> Normaliser:
        x = np.asarray(x, dtype=np.float64)
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


class Linear:
    """Multinomial logistic regression (L2 penalty, lbfgs)."""

    def __init__(self, num_classes: int, C: float = 1.0):
        self.num_classes = num_classes
        self.model = LogisticRegression(C=C, max_iter=2000)

    def fit(self, x: np.ndarray, y: np.ndarray) -> Linear:
        self.model.fit(x, y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(x), self.num_classes))
        probs[:, self.model.classes_] = self.model.predict_proba(x)
        return probs


def make_classifier(options: BaselineOptions, num_classes: int):
    if options.method == "knn":
        return KNN(num_classes, options.k, options.temperature)
    if options.method == "ncm":
        return NCM(num_classes, options.temperature)
    return Linear(num_classes, options.C)


def fit_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    queries: list[np.ndarray],
    num_classes: int,
    options: BaselineOptions,
) -> list[np.ndarray]:
    """Fit normaliser and classifier on the train rows; class probabilities of each query set."""
    norm = Normaliser(options.norm, options.pca_dim).fit(train_x)
    classifier = make_classifier(options, num_classes).fit(norm.transform(train_x), train_y)
    return [classifier.predict_proba(norm.transform(q)) for q in queries]


# -- embeddings -----------------------------------------------------------------------------------


def embeddings_dir(config: Config) -> Path:
    """``<data.cache_dir>/../embeddings`` (``.cache/embeddings`` by default)."""
    return (REPO_ROOT / config.data.cache_dir).parent / "embeddings"


def embedding_key(run: Run, split: str, view: str) -> str:
    """Everything an embedding depends on: model, weights, pooling, eval pipeline, the images."""
    config, data = run.config, run.config.data
    pretrained = config.model.pretrained
    weights = {"source": pretrained}
    if pretrained and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        weights.update(size=stat.st_size, mtime=stat.st_mtime_ns)
    paths = [Path(p) for p in getattr(run.competition, split)["path"]]
    parts = {
        "backbone": config.model.backbone,
        "weights": weights,
        "pooling": config.model.pooling,
        "eval_size": run.eval_size,
        "crop_pct": data.crop_pct,
        "eval": [dataclasses.asdict(s) for s in config.augment.eval],
        "images": cache_key(paths, run.cache_side, data.resize),
        "view": view,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.inference_mode()
def extract(run: Run, model: torch.nn.Module, split: str, views: list[str]) -> dict:
    """Embeddings (N, D) float32 of ``split`` for each view (``identity``, ``hflip``)."""
    amp = run.config.amp and run.device.type == "cuda"
    channels_last = run.config.model.channels_last
    chunks: dict[str, list] = {view: [] for view in views}
    for images, _ in tqdm(run.loader(split), desc=f"embed {split}", unit="batch", leave=False):
        images = to_device(images, run.device, channels_last)
        for view in views:
            x = images.flip(3) if view == "hflip" else images
            with autocast(run.device, amp):
                chunks[view].append(model.embed(x).float().cpu())
    return {view: torch.cat(c).numpy().astype(np.float32) for view, c in chunks.items()}


class EmbeddingStore:
    """Embeddings of a run's splits, computed once per image and view and cached on disk."""

    def __init__(self, run: Run, log=print):
        self.run, self.log = run, log
        self.directory = embeddings_dir(run.config)
        self.model: torch.nn.Module | None = None
        self.computed: list[str] = []  # "<split>/<view>" computed (not read from the cache)
        self.seconds = 0.0

    def path(self, split: str, view: str) -> Path:
        name = self.run.config.competition.name
        backbone = self.run.config.model.backbone.replace("/", "_")
        key = embedding_key(self.run, split, view)
        return self.directory / f"{name}-{split}-{backbone}-{self.run.eval_size}px-{view}-{key}.npy"

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            model = self.run.create_model()
            if not callable(getattr(model, "embed", None)):
                raise PluginError(
                    f"model.backbone={self.run.config.model.backbone}: the model has no embed(x); "
                    "baselines need pooled features (plugins.backbones.Classifier has one)."
                )
            model = model.to(self.run.device).eval()
            if self.run.config.model.channels_last:
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


def run_baseline(config: Config, options: BaselineOptions, log=print, **paths) -> dict:
    """K-fold CV of a frozen-feature baseline; writes ``runs/<name>-<method>/`` like a training run.

    ``paths`` are :class:`~competition.cv.Run`'s ``runs_dir``, ``folds_dir``, ``submissions_dir``.
    Every fold is recomputed (it takes seconds); the embeddings come from the cache when present.
    With a holdout set, ``cv["lb_full"]`` is its score when fitted on the whole train set.
    """
    started = time.perf_counter()
    config = replace(config, {"name": f"{config.name}-{options.method}"})
    run = Run(config, log=log, **paths)
    run.prepare_run_dir()
    write_json(run.run_dir / "baseline.json", dataclasses.asdict(options))
    store = EmbeddingStore(run, log)
    splits = [s for s in SPLITS if getattr(run.competition, s) is not None]
    features = {split: store.get(split, options.hflip) for split in splits}
    train = run.competition.train
    targets = train["target"].to_numpy()
    others = [s for s in ("test", "holdout") if s in features]
    num_classes = len(run.classes)
    for fold in range(config.folds.k):
        tick = time.perf_counter()
        train_index = np.flatnonzero(run.fold_of != fold)
        valid_index = np.flatnonzero(run.fold_of == fold)
        fold_dir = run.fold_dir(fold)
        probs = fit_predict(
            features["train"][train_index],
            targets[train_index],
            [features["train"][valid_index]] + [features[s] for s in others],
            num_classes,
            options,
        )
        oof = pd.DataFrame(
            {
                "id": train["id"].to_numpy()[valid_index],
                "fold": fold,
                "target": targets[valid_index],
            }
        )
        oof[run.classes] = probs[0]
        write_csv(fold_dir / "oof.csv", oof)
        for split, split_probs in zip(others, probs[1:], strict=True):
            save_numpy(fold_dir / f"{split}_probs.npy", split_probs)
        score = run.metric(targets[valid_index], probs[0])
        result = {
            "fold": fold,
            "best_epoch": 0,
            "best_score": score,
            "history": [],
            "seconds": time.perf_counter() - tick,
            "method": options.method,
        }
        write_json(fold_dir / "result.json", result)
    cv = run.summarise()
    if "holdout" in features:
        (holdout_probs,) = fit_predict(
            features["train"], targets, [features["holdout"]], num_classes, options
        )
        cv["lb_full"] = run.metric(run.competition.holdout["target"].to_numpy(), holdout_probs)
    cv["baseline"] = dataclasses.asdict(options)
    cv["embeddings"] = {"computed": store.computed, "seconds": round(store.seconds, 1)}
    cv["seconds"] = round(time.perf_counter() - started, 1)
    write_json(run.run_dir / "cv.json", cv)
    return cv


__all__ = [
    "KNN",
    "METHODS",
    "NCM",
    "NORMS",
    "BaselineOptions",
    "EmbeddingStore",
    "Linear",
    "Normaliser",
    "fit_predict",
    "run_baseline",
]
