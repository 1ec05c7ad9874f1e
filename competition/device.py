"""The device a run uses: selection, bf16/fp16 autocast, uint8 host batches to float on device."""

from __future__ import annotations

import contextlib

import torch

from competition.errors import ConfigError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"device={name}: not a device name (auto, cpu, cuda, cuda:1, mps)"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(
                f"device={name}: {count} CUDA device(s) here. Use device=auto or cpu."
            )
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device={name}: MPS is not available here. Use device=auto or cpu.")
    return device


def bf16_supported() -> bool:
    """Native bf16 (Ampere and newer); older GPUs (T4, V100) get fp16 with a GradScaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation and never emulates
        return torch.cuda.is_bf16_supported()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it, else fp16; nothing on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the host -> float in [0, 1] on ``device``."""
    images = images.to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.contiguous(memory_format=layout).float().div_(255)
