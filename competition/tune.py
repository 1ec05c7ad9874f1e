"""Search spaces for Optuna studies: every plugin suggests ``{"dotted.key": value}`` for a trial.

The suggestions are merged (a later plugin overrides an earlier one for the same key) and applied
to the config, which validates every key and type.
"""

from __future__ import annotations

from competition.config import Config, replace
from competition.errors import ConfigError
from competition.manager import get_plugin_manager


def suggest_config(trial, config: Config, pm=None) -> Config:
    """The config for one Optuna ``trial``: ``config`` with every plugin's suggestions applied."""
    pm = pm or get_plugin_manager()
    overrides: dict = {}
    for suggestions in reversed(pm.hook.competition_search_space(trial=trial, config=config)):
        overrides.update(suggestions or {})
    try:
        return replace(config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"a search space suggested a bad value: {exc}") from exc
