"""Errors a user can act on: each message names the culprit (file, row, key) and the fix."""


class CompetitionError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(CompetitionError):
    """A config key is unknown, missing or of the wrong type."""


class DataError(CompetitionError):
    """A data file, row or image is missing or malformed."""


class DamagedFileError(DataError):
    """A file the template wrote earlier (a checkpoint) is truncated, corrupt or does not fit the
    model; the message names it and the command that lets a rerun make it again."""


class DivergenceError(CompetitionError):
    """Training diverged: a non-finite loss or non-finite validation probabilities. The message
    names the fold, epoch and step, the last good checkpoint and the settings to change."""


class PluginError(CompetitionError):
    """A plugin failed to load, or a component name is unknown."""


def reject_unknown_params(what: str, params, valid) -> None:
    """Raise ConfigError if ``params`` has a key outside ``valid``; ``what`` names the component,
    e.g. "loss 'focal'". The message suggests the closest valid name and lists them all."""
    import difflib

    valid = list(valid)
    unknown = [key for key in params if key not in valid]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), valid, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"{what}: unknown parameter(s) {', '.join(map(repr, unknown))}.{hint} "
            f"Valid parameters: {', '.join(valid) or '(none)'}."
        )
