"""Test-time augmentation views (plugins/tta.py) and their batched, merged inference
(competition/predict.py) on real photographs and a real timm model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from competition.config import TransformSpec
from competition.conformance.augment import check_tta_view, image_batch
from competition.errors import ConfigError
from competition.manager import components
from competition.predict import (
    DEFAULT_MAX_ROWS,
    batch_logits,
    merge_logits,
    predict_probs,
    tta_views,
)

TTA_VIEWS = sorted(components("tta"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GROUPS = {"d4": 8, "five_crop": 5, "ten_crop": 10, "multiscale": 3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TTA_VIEWS)
def test_conformance_every_registered_view(name, device):
    params = {"size": 40} if name == "scale" else {}
    out = check_tta_view(components("tta")[name], params=params, device=device)
    assert isinstance(out, list) == (name in GROUPS)
    if name in GROUPS:
        assert len(out) == GROUPS[name]


@pytest.mark.parametrize(
    "name, params",
    [
        ("scale", {"size": 24}),
        ("scale", {"size": [40, 48]}),
        ("scale", {"factor": 1.25}),
        ("crop", {"position": "bottom_left", "fraction": 0.5, "flip": True}),
        ("five_crop", {"fraction": 0.75}),
        ("multiscale", {"sizes": [24, 40]}),
        ("multiscale", {"factors": [1.0, 1.5]}),
    ],
)
def test_conformance_with_params(name, params):
    check_tta_view(components("tta")[name], params=params)


def test_built_ins_do_what_they_say():
    views = components("tta")
    images = image_batch(4, 32)
    assert views["identity"]()(images) is images
    assert torch.equal(views["hflip"]()(images), images.flip(-1))
    assert torch.equal(views["vflip"]()(images), images.flip(-2))
    assert torch.equal(views["rot180"]()(images), images.flip(-1).flip(-2))
    assert torch.equal(views["transpose"]()(images), images.transpose(-1, -2))
    assert torch.equal(views["antitranspose"]()(images), images.transpose(-1, -2).flip(-1, -2))
    assert views["scale"](size=48)(images).shape == (4, 3, 48, 48)
    assert views["scale"](size=[40, 24])(images).shape == (4, 3, 40, 24)
    assert views["scale"](factor=0.5)(images).shape == (4, 3, 16, 16)
    assert views["scale"](size=32)(images) is images


def test_d4_is_the_dihedral_group():
    """Eight distinct views, closed under composition; rot90 has order 4, mirrors order 2."""
    views = components("tta")
    d4 = views["d4"]()
    images = image_batch(2, 32)
    outputs = [v(images) for v in d4]
    for a, b in itertools.combinations(outputs, 2):
        assert not torch.equal(a, b)
    for a, b in itertools.product(d4, d4):  # the composition of two elements is an element
        composed = a(b(images))
        assert any(torch.equal(composed, out) for out in outputs)
    rot90 = views["rot90"]()
    assert torch.equal(rot90(rot90(rot90(rot90(images)))), images)
    assert torch.equal(views["rot270"]()(rot90(images)), images)
    for mirror in ("hflip", "vflip", "transpose", "antitranspose"):
        view = views[mirror]()
        assert torch.equal(view(view(images)), images)


def test_crops_are_the_corners_and_centre_resized_back():
    images = image_batch(2, 32)
    crops = components("tta")["ten_crop"](fraction=0.5)
    expected = {
        "center": images[..., 8:24, 8:24],
        "top_left": images[..., :16, :16],
        "top_right": images[..., :16, 16:],
        "bottom_left": images[..., 16:, :16],
        "bottom_right": images[..., 16:, 16:],
    }
    for crop in crops:
        want = F.interpolate(
            expected[crop.position], size=(32, 32), mode="bilinear", antialias=True
        )
        want = want.clamp(0, 1).flip(-1) if crop.flip else want.clamp(0, 1)
        assert torch.allclose(crop(images), want, atol=1e-6), crop
    assert sum(c.flip for c in crops) == 5 and len({(c.position, c.flip) for c in crops}) == 10


def test_multiscale_tests_at_larger_sizes_by_default():
    images = image_batch(2, 32)
    sizes = [tuple(v(images).shape[-2:]) for v in components("tta")["multiscale"]()]
    assert sizes == [(32, 32), (37, 37), (42, 42)]  # factors 1, 1.15, 1.3 (FixRes: larger)


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
    with pytest.raises(ConfigError, match="position='middle' must be one of center"):
        views["crop"](position="middle")
    with pytest.raises(ConfigError, match=r"fraction=1.5 must be in \(0, 1\]"):
        views["five_crop"](fraction=1.5)
    with pytest.raises(ConfigError, match="Did you mean 'fraction'"):
        views["ten_crop"](fractoin=0.8)
    with pytest.raises(ConfigError, match="factors or sizes, not both"):
        views["multiscale"](factors=[1.2], sizes=[40])


def test_conformance_catches_broken_views():
    def noisy():
        return lambda images: (images + 0.01 * torch.rand_like(images)).clamp(0, 1)

    def in_place():
        return lambda images: images.mul_(0.5)

    def repeated_group():
        return [lambda images: images.flip(-1), lambda images: images.flip(-1)]

    with pytest.raises(AssertionError, match="deterministic"):
        check_tta_view(noisy)
    with pytest.raises(AssertionError, match="in place"):
        check_tta_view(in_place)
    with pytest.raises(AssertionError, match="same images"):
        check_tta_view(repeated_group)
    with pytest.raises(AssertionError, match="empty list"):
        check_tta_view(lambda: [])


def test_equal_views_are_predicted_once():
    specs = [TransformSpec("identity"), TransformSpec("hflip"), TransformSpec("d4")]
    specs += [TransformSpec("crop", {"position": "center"}), TransformSpec("five_crop")]
    assert len(tta_views(specs)) == 8 + 5


# -- batched inference and the merge ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()


class _Loader(list):
    """Batches as a DataLoader yields them: (uint8 images, targets)."""


def _loader(n: int = 12, batch: int = 4):
    images = (image_batch(n, 32) * 255).round().to(torch.uint8)
    return _Loader(
        (images[i : i + batch], torch.zeros(len(images[i : i + batch]))) for i in range(0, n, batch)
    )


def test_views_of_one_size_go_through_the_model_together(model):
    """Same-size views are concatenated: one forward per size per batch, not one per view (the
    default on GPUs and ONNX Runtime; eager PyTorch on a CPU runs one view per forward)."""
    views = tta_views([TransformSpec("d4"), TransformSpec("multiscale")])  # 8 + 2 larger sizes
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    cpu, rows = torch.device("cpu"), DEFAULT_MAX_ROWS
    try:
        predict_probs(model, _loader(12, 4), cpu, views, desc="t", max_rows=rows)
    finally:
        handle.remove()
    assert calls == [(32, 3, 32, 32), (4, 3, 37, 37), (4, 3, 42, 42)] * 3
    calls.clear()
    handle = model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:  # eager on a CPU by default: time per image grows with the rows there
        predict_probs(model, _loader(4, 4), cpu, views, desc="t")
    finally:
        handle.remove()
    assert calls == [(4, 3, 32, 32)] * 8 + [(4, 3, 37, 37), (4, 3, 42, 42)]
    calls.clear()
    handle = model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:  # a cap on the rows of one forward splits the concatenation
        predict_probs(model, _loader(4, 4), torch.device("cpu"), views[:8], desc="t", max_rows=12)
    finally:
        handle.remove()
    assert calls == [(12, 3, 32, 32), (12, 3, 32, 32), (8, 3, 32, 32)]


@pytest.mark.parametrize("merge", ["mean_probs", "mean_logits"])
def test_batched_views_match_one_view_at_a_time(model, merge):
    views = tta_views([TransformSpec("ten_crop"), TransformSpec("scale", {"factor": 1.3})])
    loader = _loader(12, 4)
    got = predict_probs(model, loader, torch.device("cpu"), views, desc="t", merge=merge)
    with torch.inference_mode():
        logits = torch.stack(
            [torch.cat([model(v(x.float() / 255)) for x, _ in loader]) for v in views]
        )
    want = logits.softmax(-1).mean(0) if merge == "mean_probs" else logits.mean(0).softmax(-1)
    assert np.allclose(got, want.double().numpy(), atol=1e-5)
    assert np.allclose(got.sum(1), 1.0)


def test_mean_of_logits_differs_from_mean_of_probabilities():
    logits = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])  # two views, one image
    probs = merge_logits(logits, "mean_probs")
    geometric = merge_logits(logits, "mean_logits")
    assert torch.allclose(probs, logits.softmax(-1).mean(0))
    assert torch.allclose(geometric, torch.tensor([[2.0, 0.5, 0.0]]).softmax(-1))
    assert not torch.allclose(probs, geometric)
    with pytest.raises(ConfigError, match="tta_merge: 'median' is not one of"):
        merge_logits(logits, "median")


def test_batch_logits_keep_view_order(model):
    images = image_batch(3, 32)
    views = tta_views([TransformSpec("hflip"), TransformSpec("scale", {"size": 40})])
    views.insert(1, views[0].__class__(k=1))  # rot90 between two other sizes
    with torch.inference_mode():
        out = batch_logits(model, images, views, torch.device("cpu"))
        for i, view in enumerate(views):
            assert torch.allclose(out[i], model(view(images)), atol=1e-5)
