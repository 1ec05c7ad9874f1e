"""Test-time augmentation views (plugins/tta.py) on real photographs."""

from __future__ import annotations

import pytest
import torch

from competition.conformance.augment import check_tta_view, image_batch
from competition.errors import ConfigError
from competition.manager import components

TTA_VIEWS = sorted(components("tta"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TTA_VIEWS)
def test_conformance_every_registered_view(name, device):
    params = {"size": 40} if name == "scale" else {}
    check_tta_view(components("tta")[name], params=params, device=device)


@pytest.mark.parametrize("params", [{"size": 24}, {"size": [40, 48]}, {"factor": 1.25}])
def test_conformance_scale_params(params):
    check_tta_view(components("tta")["scale"], params=params)


def test_built_ins_do_what_they_say():
    views = components("tta")
    images = image_batch(4, 32)
    assert views["identity"]()(images) is images
    assert torch.equal(views["hflip"]()(images), images.flip(-1))
    assert torch.equal(views["vflip"]()(images), images.flip(-2))
    assert views["scale"](size=48)(images).shape == (4, 3, 48, 48)
    assert views["scale"](size=[40, 24])(images).shape == (4, 3, 40, 24)
    assert views["scale"](factor=0.5)(images).shape == (4, 3, 16, 16)
    assert views["scale"](size=32)(images) is images


def test_scale_antialiases_when_shrinking():
    images = image_batch(4, 64)
    small = components("tta")["scale"](factor=0.25)(images)
    # antialiased bilinear averages 4x4 blocks; plain bilinear would sample single pixels
    blocks = torch.nn.functional.avg_pool2d(images, 4)
    assert (small - blocks).abs().mean() < 0.02


def test_bad_params_are_config_errors():
    views = components("tta")
    with pytest.raises(ConfigError, match="exactly one of size"):
        views["scale"]()
    with pytest.raises(ConfigError, match="exactly one of size"):
        views["scale"](size=32, factor=1.1)
    with pytest.raises(ConfigError, match="factor=-1"):
        views["scale"](factor=-1)
    with pytest.raises(ConfigError, match=r"'hflip': unknown parameter\(s\) 'p'"):
        views["hflip"](p=0.5)


def test_conformance_catches_broken_views():
    def noisy():
        return lambda images: (images + 0.01 * torch.rand_like(images)).clamp(0, 1)

    def in_place():
        return lambda images: images.mul_(0.5)

    with pytest.raises(AssertionError, match="deterministic"):
        check_tta_view(noisy)
    with pytest.raises(AssertionError, match="in place"):
        check_tta_view(in_place)
