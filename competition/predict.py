"""Batched inference: softmax probabilities averaged over test-time augmentation views."""

from __future__ import annotations

import numpy as np
import torch

from competition.config import TransformSpec
from competition.device import autocast, to_device
from competition.manager import resolve
from competition.progress import progress


def tta_views(specs: list[TransformSpec], pm=None) -> list:
    return [
        resolve("tta", spec.name, f"tta[{i}].name", pm)(**spec.params)
        for i, spec in enumerate(specs)
    ]


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    views: list | None = None,
    amp: bool = True,
    channels_last: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Class probabilities (N, K) in loader order, averaged over ``views`` (identity if none)."""
    model.eval()
    views = views or [lambda x: x]
    chunks = []
    for images, _ in progress(loader, desc=desc, unit="batch"):
        images = to_device(images, device, channels_last)
        probs = None
        for view in views:
            with autocast(device, amp):
                logits = model(view(images))
            p = logits.float().softmax(dim=1)
            probs = p if probs is None else probs + p
        chunks.append((probs / len(views)).cpu())
    return torch.cat(chunks).numpy().astype(np.float64)
