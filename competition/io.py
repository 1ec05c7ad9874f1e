"""Atomic writes: every output goes to a temporary file that is renamed into place.

A crash or a kill never leaves half a CSV, JSON or checkpoint behind. A temporary file is named
``.<target>.<pid>.<random>.tmp``; one whose writer is no longer alive is an orphan of a kill, and
:func:`remove_orphan_temporaries` deletes it on the next start (image caches leave GBs).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_orphan_temporaries(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Delete ``.*.<pid>.*.tmp`` files under ``directory`` whose writing process is gone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for tmp in directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # [".<target>", pid, random, "tmp"]
        if len(parts) != 4 or not parts[1].isdigit() or _writer_alive(int(parts[1])):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_numpy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def save_torch(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, map_location="cpu"):
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)
