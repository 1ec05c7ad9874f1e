"""The search space a study names in YAML (``tune.space``), applied to one trial's config.

::

    tune:
      space:
        optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
        optim.epochs: {int: [4, 12], step: 2}
        data.image_size: {categorical: [24, 32, 40]}
        model.backbone: {categorical: [resnet10t, resnet18]}
        loss: {categorical: [{name: cross_entropy}, {name: focal, params: {gamma: 2.0}}]}
        loss.params.gamma: {float: [1.0, 4.0], when: {loss.name: focal}}
        augment.batch: {categorical: [[], [{name: mixup, alpha: 0.2}], [randaugment]]}
        augment.batch.mixup.alpha: {float: [0.1, 1.0]}

Dimensions are suggested in the order written, each on the config the earlier ones made: a
define-by-run, conditional space (Akiba et al. 2019, "Optuna: A Next-generation Hyperparameter
Optimization Framework"). A dimension with ``when`` is suggested only when those keys hold those
values; one that names a component of a list (``augment.batch.mixup.alpha``: the ``alpha`` of the
batch augmentation named ``mixup``) only when that component is in the list. A categorical choice
may be any YAML value (a section, a list); the trial records it as its YAML text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from competition.config import Config, build, check_ranges
from competition.errors import ConfigError, reject_unknown_params

#: list-valued keys whose items are components by name, and the registry each comes from
COMPONENT_LISTS = {
    "augment.batch": "batch_augments",
    "augment.train": "sample_transforms",
    "augment.eval": "sample_transforms",
    "tta": "tta",
}
_KINDS = ("float", "int", "categorical")
_SPEC_KEYS = (*_KINDS, "log", "step", "when")
_PRIMITIVE = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Dimension:
    """One searched key: a float or int range (``log``, ``step``) or categorical choices."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: tuple = ()  # ((dotted.key, value), ...): all must hold for the dimension to be searched

    def labels(self) -> list:
        """What the trial records for each choice: the value itself, or its YAML text."""
        if all(isinstance(c, _PRIMITIVE) for c in self.choices):
            return list(self.choices)
        return [_yaml_text(c) for c in self.choices]

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, log=self.log, step=self.step or 1
            )
        labels = self.labels()
        label = trial.suggest_categorical(self.key, labels)
        return self.choices[labels.index(label)]


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip()


def _number(value, key: str, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"tune.space.{key}: {value!r} must be {what}")
    return value


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    """``tune.space`` as dimensions, in order; a bad spec is a ConfigError naming its key."""
    dims = []
    for key, spec in (space or {}).items():
        where = f"tune.space.{key}"
        example = "e.g. {float: [1.0e-4, 1.0e-2], log: true} or {categorical: [a, b]}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping, {example}; got {spec!r}")
        reject_unknown_params(where, spec, _SPEC_KEYS)
        kinds = [k for k in _KINDS if k in spec]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of float, int, categorical ({example})")
        kind = kinds[0]
        when = spec.get("when") or {}
        if not isinstance(when, dict):
            raise ConfigError(f"{where}.when: expected a mapping such as {{loss.name: focal}}")
        if kind == "categorical":
            choices = spec["categorical"]
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.categorical: expected a non-empty list of choices")
            extra = [k for k in ("log", "step") if k in spec]
            if extra:
                raise ConfigError(f"{where}: {', '.join(extra)} apply to float and int ranges")
            dim = Dimension(key, kind, choices=tuple(choices), when=tuple(when.items()))
            if len(set(map(repr, dim.labels()))) != len(choices):
                raise ConfigError(f"{where}.categorical: a choice is listed twice")
        else:
            bounds = spec[kind]
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise ConfigError(f"{where}.{kind}: expected [low, high], got {bounds!r}")
            low, high = (_number(b, key, kind == "int") for b in bounds)
            log = spec.get("log", False)
            step = spec.get("step")
            if not isinstance(log, bool):
                raise ConfigError(f"{where}.log: expected true or false")
            if step is not None and (_number(step, key, kind == "int") <= 0 or log):
                raise ConfigError(f"{where}.step: a positive number, and not with log: true")
            if low > high or (log and low <= 0):
                raise ConfigError(
                    f"{where}.{kind}: [{low}, {high}] must have low <= high"
                    + (" and low > 0 (log: true)" if log else "")
                )
            dim = Dimension(key, kind, low, high, log, step, when=tuple(when.items()))
        dims.append(dim)
    return dims


def _get(data: dict, key: str):
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _locate(data: dict, key: str):
    """``(container, field)`` that ``key`` sets in the config dict ``data``; ``None`` when the
    component it names is not in its list (the dimension is then inactive)."""
    parts = key.split(".")
    node = data
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        if not isinstance(node, dict):
            raise ConfigError(f"tune.space.{key}: '{'.'.join(parts[:i])}' is not a section")
        child = node.setdefault(part, {})
        if isinstance(child, list):  # a list of components: the next part is a component's name
            name = parts[i + 1]
            matches = [c for c in child if isinstance(c, dict) and c.get("name") == name]
            if not matches:
                return None
            if i + 2 >= len(parts):
                raise ConfigError(
                    f"tune.space.{key}: name a parameter of '{name}', e.g. {key}.alpha"
                )
            node = matches[0].setdefault("params", {})
            rest = parts[i + 2 :]
            for sub in rest[:-1]:
                node = node.setdefault(sub, {})
            return node, rest[-1]
        node = child
        i += 1
    return node, parts[-1]


def _normalised(data: dict, where: str) -> dict:
    try:
        return check_ranges(build(Config, data)).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def apply_space(trial, config: Config, dims: list[Dimension]) -> Config:
    """``config`` with every active dimension of ``dims`` suggested by ``trial``, in order."""
    data = config.to_dict()
    for dim in dims:
        try:
            if any(_get(data, k) != v for k, v in dim.when):
                continue
        except KeyError as exc:
            raise ConfigError(f"tune.space.{dim.key}.when: unknown key {exc}") from None
        target = _locate(data, dim.key)
        if target is None:
            continue
        node, field_name = target
        node[field_name] = dim.suggest(trial)
        data = _normalised(data, f"tune.space.{dim.key}")
    return check_ranges(build(Config, data))


def check_space(config: Config, dims: list[Dimension], pm=None) -> None:
    """Fail before any trial: unknown keys and components, values the config refuses."""
    from competition.manager import resolve

    for dim in dims:
        where = f"tune.space.{dim.key}"
        for prefix, kind in COMPONENT_LISTS.items():
            rest = dim.key[len(prefix) + 1 :].split(".") if dim.key.startswith(prefix + ".") else []
            if rest:
                resolve(kind, rest[0], where, pm)
        base = config.to_dict()
        for key, _ in dim.when:
            try:
                _get(base, key)
            except KeyError:
                raise ConfigError(f"{where}.when: unknown key '{key}'") from None
        probes = list(dim.choices) if dim.kind == "categorical" else [dim.low, dim.high]
        for value in probes:
            data = config.to_dict()
            target = _locate(data, dim.key)
            if target is None:
                continue
            target[0][target[1]] = value
            _normalised(data, where)


__all__ = ["COMPONENT_LISTS", "Dimension", "apply_space", "check_space", "parse_space"]
