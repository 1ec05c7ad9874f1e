"""The device a run uses: selection, bf16/fp16 autocast (GPU, or bf16 on CPU), uint8 host batches
to float on the device."""

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


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype the config key ``amp`` means on ``device`` (``None``: full precision).

    ``true``: bf16 on GPUs that support it, else fp16, nothing on CPU; ``bf16``: bf16 on any
    device, the CPU included (oneDNN runs bf16 matmuls and convolutions natively on AVX-512-BF16
    and AMX cores, and emulates them elsewhere); ``fp16``: fp16 on CUDA only; ``false``: off.
    """
    if amp is True:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16 if device.type in ("cuda", "cpu") else None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"amp=fp16: fp16 autocast is for CUDA, not {device.type}; use bf16")
        return torch.float16
    return None


def autocast(device: torch.device, amp: bool | str):
    """Autocast as the config key ``amp`` says on ``device`` (see :func:`amp_dtype`)."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool | str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return amp_dtype(device, amp) is torch.float16


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the host -> float in [0, 1] on ``device``."""
    images = images.to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.contiguous(memory_format=layout).float().div_(255)
