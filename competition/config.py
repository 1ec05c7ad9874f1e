"""YAML -> typed, frozen config. ``key=value`` overrides; unknown keys and wrong types are rejected.

Every section is a frozen dataclass; :func:`load_config` reads a YAML file, applies overrides such
as ``optim.lr=0.01`` (values parsed as YAML) and checks every key against the dataclasses, naming
the full key path in errors. YAML is read with the YAML 1.2 core schema (:func:`load_yaml`), so
``3e-4`` is a number and ``yes``, ``off`` or ``2024-01-01`` are strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from competition.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- YAML 1.2 -------------------------------------------------------------------------------------

_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_TAG = "tag:yaml.org,2002:"
_IMPLICIT_12 = [  # YAML 1.2 core schema, in resolution order (an int before a float)
    ("null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("int", _INT, list("-+0123456789")),
    ("float", _FLOAT, list("-+.0123456789")),
]


class YAML12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars and unique mapping keys.

    PyYAML follows YAML 1.1, where ``3e-4`` (no dot) is a string, ``yes``/``off`` are booleans,
    ``010`` is octal 8 and ``1:30`` is 90; here they are 0.0003, strings, 10 and a string.
    """

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if not _INT.fullmatch(text):  # an explicit !!int in a YAML 1.1 form
            return super().construct_yaml_int(node)
        return int(text[2:], 8) if text.startswith("0o") else int(text, 0 if "x" in text else 10)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _TAG + "merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class YAML12Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that also quotes strings YAML 1.2 reads as numbers (``'3e-4'``), so
    its output reads back the same with :func:`load_yaml` and with ``yaml.safe_load``."""


# the loader keeps only YAML 1.1's merge key (<<); the dumper keeps all of 1.1 and adds 1.2
YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag == _TAG + "merge"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx, _first in _IMPLICIT_12:
    YAML12Loader.add_implicit_resolver(_TAG + _tag, _rx, _first)
    YAML12Dumper.add_implicit_resolver(_TAG + _tag, _rx, _first)
YAML12Loader.add_constructor(_TAG + "int", YAML12Loader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """Parse YAML text as YAML 1.2 (core schema); raises ``yaml.YAMLError`` on bad YAML."""
    return yaml.load(text, Loader=YAML12Loader)


def dump_yaml(data: Any) -> str:
    """YAML text that :func:`load_yaml` (and ``yaml.safe_load``) read back as ``data``."""
    return yaml.dump(data, Dumper=YAML12Dumper, sort_keys=False, allow_unicode=True)


# -- plain names ----------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def plain_name(value: str, key: str) -> str:
    """Return ``value`` if it is a plain name, else raise ConfigError naming ``key`` and the rule.

    A plain name is 1-128 letters, digits, ``.``, ``_`` or ``-``, not starting with ``.`` or ``-``:
    it names files and folders (runs/<name>, submissions/<name>.csv, folds/<name>-*.csv), so it
    can never be a path (``..``, ``a/b``, ``/abs``) or escape those folders.
    """
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    text = value if isinstance(value, str) else ""
    suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")[:128] or "x"
    raise ConfigError(
        f"{key}={value!r}: names are plain names (1-128 letters, digits, '.', '_', '-', not "
        f"starting with '.' or '-'), used in file and folder names (runs/<name>, "
        f"submissions/<name>.csv, folds/<name>-*.csv); choose e.g. {key}={suggestion}"
    )


@dataclass(frozen=True)
class CompetitionConfig:
    """Where the data is and how it is laid out."""

    name: str = "competition"
    layout: Literal["kaggle", "folders"] = "kaggle"
    root: str = "."  # data folder; relative paths are relative to the repo root
    # kaggle layout
    train_csv: str = "train.csv"
    id_column: str = "id"
    label_column: str = "label"
    group_column: str | None = None
    train_images: str = "train"
    image_pattern: str = "{id}"  # file name inside the image folder, e.g. "{id}.jpg"
    test_images: str | None = "test"
    test_csv: str | None = None  # ids of the test set; default: the sample submission's ids
    sample_submission: str | None = "sample_submission.csv"
    solution_csv: str | None = None  # labelled hidden test set, scored as "LB" when present
    # folders layout: <root>/<train_dir>/<class>/*.jpg
    train_dir: str = "train"
    holdout_dir: str | None = None  # labelled class folders scored as "LB" (e.g. val)
    test_dir: str | None = None  # unlabelled images to predict
    classes: list[str] | None = None  # the class list; default: sorted labels of the train set
    submission_format: Literal["label", "probabilities"] = "label"


@dataclass(frozen=True)
class FoldsConfig:
    """How the train set is split."""

    k: int = 5
    seed: int = 42
    method: Literal["stratified", "group", "stratified_group"] = "stratified"


@dataclass(frozen=True)
class DataConfig:
    """Image sizes, cache and loaders."""

    image_size: int = 224  # training resolution
    eval_image_size: int | None = None  # FixRes: evaluate at another resolution (default: same)
    crop_pct: float = 0.875  # cache at size / crop_pct; eval centre-crops back to size
    resize: Literal["crop", "squash"] = "crop"  # keep aspect (centre crop) or squash to square
    cache_dir: str = ".cache/images"
    batch_size: int = 32
    eval_batch_size: int | None = None
    num_workers: int = 2
    # training rows per epoch: a registered sampler (plugins/samplers.py) and its params
    sampler: TransformSpec = field(default_factory=lambda: TransformSpec("instance_balanced"))


@dataclass(frozen=True)
class ModelConfig:
    """The network: a backbone by name, its weights, head and fine-tuning strategy."""

    # a list of backbones (and of weights, one per backbone) is for baselines only: their
    # embeddings are concatenated (competition.baseline); training takes one backbone
    backbone: str | list[str] = "resnet18"
    pretrained: str | list[str] | None = None  # a weights file or package; never the network
    pooling: Literal["avg", "gem"] = "avg"
    head: Literal["linear", "cosine"] = "linear"
    drop_rate: float = 0.0
    finetune: Literal["full", "last_n", "head"] = "full"
    last_n: int = 1  # stages trained with finetune=last_n
    backbone_lr_factor: float = 1.0  # backbone LR = head LR x factor
    channels_last: bool = True
    # torch.compile the network for training and inference (falls back to eager with a message
    # where the backend cannot compile, e.g. inductor without a C++ compiler)
    compile: bool = False
    compile_backend: str = "inductor"  # a torch.compile backend: inductor, aot_eager, eager...
    # passed to timm.create_model, e.g. {img_size: 64} or {dynamic_img_size: true} for a ViT
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: cosine with linear warm-up."""

    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    epochs: int = 10
    warmup_epochs: float = 1.0
    ema_decay: float | None = None  # exponential moving average of weights, e.g. 0.999
    grad_clip: float | None = None


@dataclass(frozen=True)
class LossConfig:
    """The loss by name; ``params`` go to its factory."""

    name: str = "cross_entropy"
    params: dict[str, Any] = field(default_factory=lambda: {"label_smoothing": 0.1})


@dataclass(frozen=True)
class TransformSpec:
    """One component by name with its parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample CPU transforms (train/eval) and batch augmentations on the device, in order."""

    train: list[TransformSpec] = field(
        default_factory=lambda: [
            TransformSpec("RandomResizedCrop", {"scale": [0.35, 1.0]}),
            TransformSpec("HorizontalFlip"),
        ]
    )
    eval: list[TransformSpec] = field(default_factory=lambda: [TransformSpec("CenterCrop")])
    batch: list[TransformSpec] = field(default_factory=list)
    mix_off_last_epochs: int = 0  # switch mixing augmentations off for the last N epochs


@dataclass(frozen=True)
class TuneConfig:
    """An Optuna study over the recipe, scored by the CV mean."""

    trials: int = 20
    timeout_s: float | None = None
    # built-in search dimensions to open (plugins/search_space.py); plugins may add their own
    params: list[str] = field(
        default_factory=lambda: ["optim.lr", "optim.weight_decay", "loss.params.label_smoothing"]
    )
    # the YAML search space: {dotted.key: {float: [low, high], log: true} | {categorical: [...]}}
    space: dict[str, Any] = field(default_factory=dict)
    # stops a bad trial early; steps are numbered across folds and epochs
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    folds: list[int] | None = None  # score trials on these folds; the best then runs on all folds
    # a journal file (x.journal), SQLite (x.db, sqlite:///x.db) or an RDB URL (postgresql+psycopg://)
    storage: str | None = None  # default: runs/<study>-study.journal
    study: str | None = None  # the study's name in its storage (default: name)
    workers: int = 1  # worker processes on this machine, all on one study and one trial budget


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow tracking (plugins/tracking.py): where runs are logged, under which experiment."""

    tracking_uri: str | None = None  # default: sqlite:///<runs folder>/mlflow.db
    experiment: str | None = None  # default: competition.name
    artifact_location: str | None = None  # a new experiment's artifacts (default: beside the db)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers fed by the event hooks; all off unless set."""

    tensorboard: bool = False  # event files under runs/<name>/tensorboard
    mlflow: MlflowConfig | None = None  # a mapping turns MLflow on ({} for the defaults)


@dataclass(frozen=True)
class InferenceConfig:
    """How OOF, test and embedding forwards run (competition.runtime); results equal eager's."""

    # auto: the fastest runtime that is installed and proven equal on this model; eager: plain
    # PyTorch; compile: torch.compile; onnxruntime: the optional extra (pip install .[onnx])
    runtime: Literal["auto", "eager", "compile", "onnxruntime"] = "auto"


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    # autocast: true = bf16 (fp16 on older GPUs) on GPU, off on CPU; bf16 = bf16 on GPU and CPU
    amp: bool | Literal["bf16", "fp16"] = True
    metric: str = "accuracy"
    competition: CompetitionConfig = field(default_factory=CompetitionConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tta: list[TransformSpec] = field(default_factory=lambda: [TransformSpec("identity")])
    tta_merge: Literal["mean_probs", "mean_logits"] = "mean_probs"  # how TTA views combine
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def data_root(self) -> Path:
        """The competition's data folder, resolved against the repo root."""
        return (REPO_ROOT / self.competition.root).resolve()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building from plain data ---------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if tp is TransformSpec and isinstance(value, str):
            value = {"name": value}
        if tp is TransformSpec and isinstance(value, dict) and "params" not in value:
            value = {
                "name": value.get("name"),
                "params": {k: v for k, v in value.items() if k != "name"},
            }
        return build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r} (quote it in YAML)")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def build(cls, data: Any, path: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{key_path}: unknown key.{hint} Known keys: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], key_path)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    if missing:
        raise ConfigError(f"{path or 'config'}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


#: (key, test, what it must be): values the types allow but the runner cannot use
RANGES = [
    ("folds.k", lambda v: v >= 2, "at least 2"),
    ("data.image_size", lambda v: v >= 8, "at least 8"),
    ("data.eval_image_size", lambda v: v is None or v >= 8, "at least 8"),
    ("data.crop_pct", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.batch_size", lambda v: v >= 1, "at least 1"),
    ("data.eval_batch_size", lambda v: v is None or v >= 1, "at least 1"),
    ("data.num_workers", lambda v: v >= 0, "0 or more"),
    ("optim.lr", lambda v: v > 0, "positive"),
    ("optim.weight_decay", lambda v: v >= 0, "0 or more"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.epochs", lambda v: v >= 1, "at least 1"),
    ("optim.warmup_epochs", lambda v: v >= 0, "0 or more"),
    ("optim.ema_decay", lambda v: v is None or 0 < v < 1, "in (0, 1)"),
    ("model.drop_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.backbone_lr_factor", lambda v: v >= 0, "0 or more"),
    ("augment.mix_off_last_epochs", lambda v: v >= 0, "0 or more"),
    ("tune.trials", lambda v: v >= 1, "at least 1"),
    ("tune.workers", lambda v: v >= 1, "at least 1"),
]


#: keys that name files or folders: each must pass :func:`plain_name`
PLAIN_NAMES = ["name", "competition.name"]


def check_ranges(config: Config) -> Config:
    """Reject values the runner cannot use (a zero batch size, crop_pct 0, a path as a name...)."""
    for key in PLAIN_NAMES:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        plain_name(value, key)
    for key, ok, what in RANGES:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{key}: {value!r} must be {what}")
    return config


def require_one_backbone(config: Config, verb: str) -> str:
    """The one backbone ``verb`` builds; a list in ``model.backbone`` is for baselines only."""
    backbone = config.model.backbone
    if not isinstance(backbone, str):
        raise ConfigError(
            f"model.backbone={backbone}: {verb} builds one network; a list of backbones is for "
            "frozen-feature baselines (competition baseline CONFIG --method linear). Set one "
            "backbone (and one model.pretrained), train a run per backbone and blend the runs "
            "with competition ensemble."
        )
    return backbone


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=0.01")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw)
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. {id}.jpg): take the text as it is
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    try:
        return check_ranges(build(Config, data))
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def flat_keys(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.001, ...}``: a nested config dict as dotted keys (empty sections kept)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def replace(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``{"dotted.key": value}`` applied and validated."""
    data = config.to_dict()
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{part}' is not a section")
        node[parts[-1]] = value
    return check_ranges(build(Config, data))
