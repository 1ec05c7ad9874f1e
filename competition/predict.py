"""Batched inference: softmax probabilities averaged over test-time augmentation views."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from competition.config import TransformSpec
from competition.manager import resolve


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it, else fp16; nothing on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the host -> float in [0, 1] on ``device``."""
    images = images.to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.contiguous(memory_format=layout).float().div_(255)


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
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = to_device(images, device, channels_last)
        probs = None
        for view in views:
            with autocast(device, amp):
                logits = model(view(images))
            p = logits.float().softmax(dim=1)
            probs = p if probs is None else probs + p
        chunks.append((probs / len(views)).cpu())
    return torch.cat(chunks).numpy().astype(np.float64)
