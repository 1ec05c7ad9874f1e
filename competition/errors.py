"""Errors a user can act on: each message names the culprit (file, row, key) and the fix."""


class CompetitionError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(CompetitionError):
    """A config key is unknown, missing or of the wrong type."""


class DataError(CompetitionError):
    """A data file, row or image is missing or malformed."""


class PluginError(CompetitionError):
    """A plugin failed to load, or a component name is unknown."""
