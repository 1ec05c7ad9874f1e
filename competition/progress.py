"""Progress bars on a terminal only: in a log file (``make demo > log``) they would be kilobytes of
carriage-return redraws, so there the epoch and fold lines are the whole record."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A transient tqdm bar when stderr is a terminal; a silent pass-through otherwise."""
    return tqdm(iterable, disable=None, leave=False, **kwargs)
