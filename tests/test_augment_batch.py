"""Batch augmentations (plugins/augment_batch.py) on real photographs, on the CPU."""

from __future__ import annotations

import builtins

import pytest
import torch

from competition.conformance.augment import (
    StagedNet,
    check_batch_augment,
    image_batch,
    soft_targets,
)
from competition.errors import ConfigError, PluginError
from competition.manager import components
from plugins import augment_batch

BATCH_AUGMENTS = sorted(components("batch_augments"))
MIXING = {"mixup", "cutmix", "manifold_mixup"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BATCH_AUGMENTS)
def test_conformance_every_registered_batch_augment(name, device):
    check_batch_augment(components("batch_augments")[name], device=device)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("randaugment", {"n": 3, "m": 15}),
        ("autoaugment", {"policy": "cifar10"}),
        ("mixup", {"alpha": 1.0, "p": 0.5}),
        ("cutmix", {"alpha": 0.5, "p": 0.5}),
        ("manifold_mixup", {"stage": 1}),
        ("manifold_mixup", {"module": "stage2.0"}),
        ("manifold_mixup", {"stage": [0, 1], "alpha": 0.4}),
    ],
)
def test_conformance_with_params(name, params):
    check_batch_augment(components("batch_augments")[name], params=params)


def test_built_ins_are_registered_and_mixing_ones_say_so():
    registry = components("batch_augments")
    expected = {"autoaugment", "randaugment", "trivialaugment", "mixup", "cutmix", "hflip"}
    assert expected | MIXING <= set(registry)
    for name in BATCH_AUGMENTS:
        if registry.provider(name) == "plugins.augment_batch":
            assert registry[name]().mixes == (name in MIXING), name


def test_policies_change_images_not_targets():
    images, targets = image_batch(8), soft_targets(8)
    for name in ("autoaugment", "randaugment", "trivialaugment"):
        torch.manual_seed(0)
        out, out_targets = components("batch_augments")[name]()(images, targets)
        assert not torch.equal(out, images), name
        assert out_targets is targets


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    mixup = components("batch_augments")["mixup"](alpha=0.4)
    images, targets = image_batch(8), soft_targets(8)
    torch.manual_seed(1)
    out, out_targets = mixup(images, targets)
    lam, perm = mixup.lam, mixup.perm
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(out, lam * images + (1 - lam) * images[perm], atol=1e-6)
    assert torch.allclose(out_targets, lam * targets + (1 - lam) * targets[perm], atol=1e-6)


def test_mixup_lambda_follows_beta():
    mixup = augment_batch.Mixup(alpha=0.2)
    images, targets = image_batch(2, 8), soft_targets(2)
    torch.manual_seed(0)
    lams = []
    for _ in range(400):
        mixup(images, targets)
        lams.append(mixup.lam)
    lams = torch.tensor(lams)
    # Beta(0.2, 0.2): mean 0.5, most mass near 0 and 1
    assert abs(lams.mean().item() - 0.5) < 0.06
    assert ((lams < 0.1) | (lams > 0.9)).float().mean() > 0.5


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    cutmix = components("batch_augments")["cutmix"](alpha=1.0)
    images, targets = image_batch(8, 40), soft_targets(8)
    for seed in range(5):
        torch.manual_seed(seed)
        out, out_targets = cutmix(images, targets)
        top, bottom, left, right = cutmix.box
        perm = cutmix.perm
        inside = torch.zeros(40, 40, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(out[:, :, inside], images[perm][:, :, inside])
        assert torch.equal(out[:, :, ~inside], images[:, :, ~inside])
        lam = 1 - inside.float().mean().item()
        assert cutmix.lam == pytest.approx(lam)
        assert torch.allclose(out_targets, lam * targets + (1 - lam) * targets[perm], atol=1e-6)


def test_probability_zero_leaves_the_batch_alone():
    images, targets = image_batch(4), soft_targets(4)
    for name in ("mixup", "cutmix"):
        out, out_targets = components("batch_augments")[name](p=0.0)(images, targets)
        assert out is images and out_targets is targets


def test_hflip_flips_about_half_the_images():
    images, targets = image_batch(64, 16), soft_targets(64)
    torch.manual_seed(0)
    out, _ = components("batch_augments")["hflip"]()(images, targets)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 20 < sum(flipped) < 44


def _stage1_then_rest(model, x, mix=None):
    """The forward of StagedNet by hand (layer by layer: no stage hook runs), mixing stage1."""
    h = model.stem(x)
    for layer in model.stage1:
        h = layer(h)
    if mix is not None:
        lam, perm = mix
        h = lam * h + (1 - lam) * h[perm]
    return model.head(model.stage2(h).mean(dim=(2, 3)))


def test_manifold_mixup_mixes_hidden_features_on_the_armed_forward_only():
    torch.manual_seed(0)
    model = StagedNet(num_classes=5).train()
    aug = components("batch_augments")["manifold_mixup"](stage=0, alpha=1.0)
    aug.attach(model)
    assert aug.targets == ["stage1"]
    images, targets = image_batch(8), soft_targets(8)
    with torch.no_grad():
        plain = model(images)
        out, mixed_targets = aug(images, targets)
        assert out is images
        lam, perm = aug.lam, aug.perm
        assert torch.allclose(mixed_targets, lam * targets + (1 - lam) * targets[perm])
        expected = _stage1_then_rest(model, images, (lam, perm))
        assert torch.allclose(model(images), expected, atol=1e-5)  # the armed forward mixes
        assert not torch.allclose(expected, plain, atol=1e-3)
        assert torch.allclose(model(images), plain, atol=1e-6)  # then it is disarmed
        # eval forwards are never mixed and leave it armed for the next training forward
        aug(images, targets)
        model.eval()
        assert torch.allclose(model(images), plain, atol=1e-6)
        model.train()
        assert torch.allclose(model(images), _stage1_then_rest(model, images, (aug.lam, aug.perm)))
        # detach removes the hooks
        aug.detach()
        assert torch.allclose(model(images), plain, atol=1e-6)


def test_manifold_mixup_default_picks_among_all_but_the_last_stage():
    model = StagedNet()
    aug = augment_batch.ManifoldMixup()
    aug.attach(model)
    assert aug.targets == ["stage1"]


def test_manifold_mixup_errors_name_the_fix():
    aug = augment_batch.ManifoldMixup()
    with pytest.raises(PluginError, match="attach"):
        aug(image_batch(2), soft_targets(2))
    with pytest.raises(ConfigError, match="stage=5 out of range; the model has 2 stages"):
        augment_batch.ManifoldMixup(stage=5).attach(StagedNet())
    with pytest.raises(ConfigError, match="Did you mean stage2"):
        augment_batch.ManifoldMixup(module="stage_2").attach(StagedNet())
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(PluginError, match="no stages"):
        augment_batch.ManifoldMixup(stage=0).attach(plain)


def test_unknown_and_bad_params_name_the_augmentation():
    registry = components("batch_augments")
    with pytest.raises(ConfigError, match=r"'randaugment'.*'magnitude'.*Valid parameters: n, m"):
        registry["randaugment"](magnitude=9)
    with pytest.raises(ConfigError, match="'mixup': alpha=0"):
        registry["mixup"](alpha=0)
    with pytest.raises(ConfigError, match=r"'cutmix': p=1\.5"):
        registry["cutmix"](p=1.5)
    with pytest.raises(ConfigError, match="'randaugment'"):
        registry["randaugment"](m=40)


def test_missing_kornia_is_a_clear_plugin_error(monkeypatch):
    real_import = builtins.__import__

    def no_kornia(name, *args, **kwargs):
        if name == "kornia" or name.startswith("kornia."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kornia)
    with pytest.raises(
        PluginError, match="augmentation 'randaugment' needs kornia: pip install kornia"
    ):
        components("batch_augments")["randaugment"]()


class _Broken:
    """A batch augmentation that breaks one rule of the contract."""

    mixes = False

    def __init__(self, fault: str):
        self.fault = fault

    def __call__(self, images, targets):
        if self.fault == "range":
            return images * 2, targets
        if self.fault == "dtype":
            return images.double(), targets
        if self.fault == "targets":
            return images, targets.roll(1, dims=0)
        if self.fault == "sum":
            return images, targets * 0.5
        if self.fault == "unseeded":
            noise = torch.from_numpy(__import__("numpy").random.rand(*images.shape)).float()
            return (images + 0.01 * noise).clamp(0, 1), targets
        raise AssertionError(self.fault)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("range", r"left \[0, 1\]"),
        ("dtype", "dtype"),
        ("targets", "mixes is False but the targets changed"),
        ("sum", "sum to one"),
        ("unseeded", "same torch.manual_seed"),
    ],
)
def test_conformance_catches_broken_augments(fault, message):
    with pytest.raises(AssertionError, match=message):
        check_batch_augment(lambda: _Broken(fault))
