"""The plugin manager: built-in plugins first, then the ``competition`` entry-point group.

Components (backbones, losses, transforms, metrics, weights, ...) are looked up by name through
:func:`components` and :func:`resolve`; an unknown name is a :class:`PluginError` that lists close
names (:func:`did_you_mean`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import re
from collections.abc import Mapping
from functools import lru_cache

import pluggy

from competition import PROJECT, hookspecs
from competition.errors import PluginError

#: Built-in plugins, registered exactly as a third-party plugin would be.
DEFAULT_PLUGINS = (
    "plugins.backbones",
    "plugins.losses",
    "plugins.augment_cpu",
    "plugins.augment_batch",
    "plugins.tta",
    "plugins.search_space",
    "plugins.metrics",
    "plugins.pretrained",
    "plugins.samplers",
    "plugins.tracking",
)

#: Component kinds and the hook that registers each.
KINDS = {
    "backbones": "competition_register_backbones",
    "losses": "competition_register_losses",
    "sample_transforms": "competition_register_sample_transforms",
    "batch_augments": "competition_register_batch_augments",
    "tta": "competition_register_tta",
    "metrics": "competition_register_metrics",
    "weights": "competition_register_weights",
    "samplers": "competition_register_samplers",
}
SINGULAR = {
    "backbones": "backbone",
    "losses": "loss",
    "sample_transforms": "sample transform",
    "batch_augments": "batch augmentation",
    "tta": "TTA view",
    "metrics": "metric",
    "weights": "weights package",
    "samplers": "sampler",
}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not look like our bug
            dist = ep.dist.name if ep.dist else "unknown package"
            raise PluginError(
                f"plugin '{ep.name}' ({ep.value}) from package '{dist}' failed to import: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it: pip uninstall {dist}"
            ) from exc
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as exc:
            dist = ep.dist.name if ep.dist else "unknown package"
            raise PluginError(f"plugin '{ep.name}' from package '{dist}': {exc}") from exc


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built once)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_points(pm)
    _check_hook_names(pm)
    return pm


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """A misspelled hook would register silently and do nothing: name it and the closest hook."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        names = [n for n in dir(hookspecs) if n.startswith("competition_")]
        unknown = [n for n in re.findall(r"competition_\w+", str(exc)) if n not in names]
        close = difflib.get_close_matches(unknown[0], names, n=1) if unknown else []
        hint = f" Did you mean {close[0]}?" if close else ""
        raise PluginError(f"{exc}.{hint} Known hooks: {', '.join(names)}") from exc


class ChainedComponents(Mapping):
    """Read-only view over the mappings plugins returned; later plugins override earlier ones."""

    def __init__(self, kind: str, layers: list[tuple[str, Mapping]]):
        self.kind = kind
        self.layers = layers  # (plugin name, mapping), lowest priority first

    def _find(self, name: str):
        for plugin_name, mapping in reversed(self.layers):
            if name in mapping:
                return plugin_name, mapping[name]
        return None

    def __getitem__(self, name: str):
        found = self._find(name)
        if found is None:
            raise KeyError(name)
        return found[1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def __iter__(self):
        seen = set()
        for _, mapping in reversed(self.layers):
            for name in mapping:
                if name not in seen:
                    seen.add(name)
                    yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def provider(self, name: str) -> str:
        """The name of the plugin that provides component ``name``."""
        found = self._find(name)
        if found is None:
            raise KeyError(name)
        return found[0]


def components(kind: str, pm: pluggy.PluginManager | None = None) -> ChainedComponents:
    """All components of ``kind`` (a key of :data:`KINDS`) from every registered plugin."""
    if kind not in KINDS:
        raise PluginError(f"unknown component kind '{kind}'; kinds: {', '.join(KINDS)}")
    pm = pm or get_plugin_manager()
    hook = getattr(pm.hook, KINDS[kind])
    layers = []
    # get_hookimpls() lists plugins in call order reversed: built-ins first, later ones override.
    for impl in hook.get_hookimpls():
        mapping = impl.function()
        if mapping:
            layers.append((impl.plugin_name, mapping))
    return ChainedComponents(kind, layers)


def did_you_mean(name: str, names) -> str:
    """`` Did you mean: a, b?`` naming the registered ``names`` closest to ``name`` (difflib), or
    an empty string when none is close."""
    close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def resolve(kind: str, name: str, key: str, pm: pluggy.PluginManager | None = None):
    """The factory registered as ``name``; ``key`` is the config key that chose it (for errors)."""
    available = components(kind, pm)
    if name in available:
        return available[name]
    names = sorted(available)
    hint = did_you_mean(name, names)
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    raise PluginError(
        f"{key}: unknown {SINGULAR[kind]} '{name}'.{hint} Available: {shown}. "
        "See `competition plugins`."
    )
