"""Batched inference with test-time augmentation (TTA) views, merged into class probabilities.

Every view of a batch is made on the device; views with the same output size are concatenated
and go through the model together (up to ``max_rows`` images per forward), so TTA costs one large
forward per size, not one per view or per image. Views are merged by the mean of their softmax
probabilities (``mean_probs``) or by the softmax of their mean logits (``mean_logits``, the
geometric mean of the probabilities, renormalised).
"""

from __future__ import annotations

import numpy as np
import torch

from competition.config import TransformSpec
from competition.device import autocast, to_device
from competition.errors import ConfigError, PluginError
from competition.manager import resolve
from competition.progress import progress
from competition.runtime import inference_forward

#: How the views' predictions are combined (the config key ``tta_merge``).
MERGES = ("mean_probs", "mean_logits")
#: Images per forward when views are concatenated (a typical inference batch); see predict_probs.
DEFAULT_MAX_ROWS = 256
#: The same for eager PyTorch on a CPU: one view per forward (the batch's rows), as time per image
#: grows with the rows there (Lite0 at 224 px: 38 img/s at 32 rows, 30 at 64, 17 at 256;
#: bench/inference.py) and there is no launch overhead to share.
CPU_MAX_ROWS = 0


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def expand_view(spec: TransformSpec, key: str, pm=None) -> list:
    """The views one ``tta`` entry names: one view, or several for a group (``d4``)."""
    built = resolve("tta", spec.name, f"{key}.name", pm)(**spec.params)
    views = list(built) if isinstance(built, list | tuple) else [built]
    if not views or not all(callable(v) for v in views):
        raise PluginError(
            f"{key}: TTA view '{spec.name}' returned {built!r}; a factory must return a view "
            "(a callable) or a non-empty list of views"
        )
    return views


def unique_views(views: list) -> list:
    """``views`` without repeats: equal views (``hflip`` alone and inside ``d4``) count once."""
    out = []
    for view in views:
        if not any(same_view(view, seen) for seen in out):
            out.append(view)
    return out


def same_view(a, b) -> bool:
    """Whether two views are one (built-ins compare by their parameters; others by identity)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # a third-party view with an odd __eq__ is only equal to itself
        return False


def tta_views(specs: list[TransformSpec], pm=None) -> list:
    """The views of the config's ``tta`` list, groups expanded, each view once."""
    views = []
    for i, spec in enumerate(specs):
        views += expand_view(spec, f"tta[{i}]", pm)
    return unique_views(views)


def merge_logits(logits: torch.Tensor, merge: str = "mean_probs") -> torch.Tensor:
    """(V, N, K) logits of V views -> (N, K) probabilities, merged as ``merge`` says."""
    if merge == "mean_probs":
        return logits.float().softmax(dim=-1).mean(dim=0)
    if merge == "mean_logits":
        return logits.float().mean(dim=0).softmax(dim=-1)
    raise ConfigError(f"tta_merge: {merge!r} is not one of {', '.join(MERGES)}")


def batch_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    views: list,
    device: torch.device,
    amp: bool | str = True,
    channels_last: bool = False,
    max_rows: int | None = None,
    forward=None,
) -> torch.Tensor:
    """(V, B, K) float32 logits of every view of one batch already on the device.

    Views of the same output size are concatenated, up to ``max_rows`` images per forward
    (default: the larger of the batch and :data:`DEFAULT_MAX_ROWS`). ``forward``: what runs the
    model (:func:`competition.runtime.inference_forward`; default ``model`` itself).
    """
    rows = len(images)
    if max_rows is None:
        kind = getattr(forward, "kind", "eager")  # competition.runtime.Forward says which
        eager_cpu = device.type == "cpu" and kind in ("eager", "channels_last")
        max_rows = CPU_MAX_ROWS if eager_cpu else DEFAULT_MAX_ROWS
    max_rows = max(rows, max_rows)
    forward = forward or model
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out: list[torch.Tensor | None] = [None] * len(views)
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}

    def flush(shape):
        group = pending.pop(shape)
        batch = torch.cat([x for _, x in group]) if len(group) > 1 else group[0][1]
        with autocast(device, amp):
            logits = forward(batch.contiguous(memory_format=layout)).float()
        for j, (i, _) in enumerate(group):
            out[i] = logits[j * rows : (j + 1) * rows]

    for i, view in enumerate(views):
        x = view(images)
        shape = tuple(x.shape[1:])
        pending.setdefault(shape, []).append((i, x))
        if len(pending[shape]) * rows + rows > max_rows:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    return torch.stack(out)


def _view_logits(model, loader, device, desc, views, amp, channels_last, max_rows, runtime, cache):
    """(V, B, K) logits of every batch of ``loader``, one batch at a time, in loader order; the
    forward runs on ``runtime`` (:func:`competition.runtime.inference_forward`)."""
    model.eval()
    views = views or [_identity]
    dataset = getattr(loader, "dataset", None)
    images = len(dataset) * len(views) if hasattr(dataset, "__len__") else None
    forward = inference_forward(model, "forward", device, runtime, amp, cache, images)
    for batch, _ in progress(loader, desc=desc, unit="batch"):
        batch = to_device(batch, device, channels_last)
        yield batch_logits(model, batch, views, device, amp, channels_last, max_rows, forward)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    views: list | None = None,
    amp: bool | str = True,
    channels_last: bool = False,
    desc: str = "predict",
    max_rows: int | None = None,
    runtime: str = "eager",
    cache_dir=None,
) -> np.ndarray:
    """(V, N, K) float32 logits of each view, in loader order (for choosing views on OOF).

    ``runtime``, ``cache_dir``: ``inference.runtime`` and where graphs go (competition.runtime).
    """
    args = (desc, views, amp, channels_last, max_rows, runtime, cache_dir)
    chunks = [logits.cpu() for logits in _view_logits(model, loader, device, *args)]
    return torch.cat(chunks, dim=1).numpy()


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    views: list | None = None,
    amp: bool | str = True,
    channels_last: bool = False,
    desc: str = "predict",
    merge: str = "mean_probs",
    max_rows: int | None = None,
    runtime: str = "eager",
    cache_dir=None,
) -> np.ndarray:
    """Class probabilities (N, K) in loader order, merged over ``views`` (identity if none);
    the views are merged batch by batch, so only (N, K) is kept, never (V, N, K).

    ``runtime``, ``cache_dir``: ``inference.runtime`` and where graphs go (competition.runtime).
    """
    if merge not in MERGES:
        raise ConfigError(f"tta_merge: {merge!r} is not one of {', '.join(MERGES)}")
    args = (desc, views, amp, channels_last, max_rows, runtime, cache_dir)
    chunks = [merge_logits(v, merge).cpu() for v in _view_logits(model, loader, device, *args)]
    return torch.cat(chunks).numpy().astype(np.float64)


__all__ = [
    "DEFAULT_MAX_ROWS",
    "MERGES",
    "batch_logits",
    "expand_view",
    "merge_logits",
    "predict_logits",
    "predict_probs",
    "same_view",
    "tta_views",
    "unique_views",
]
