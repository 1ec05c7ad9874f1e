"""``model.kwargs`` reach ``timm.create_model``: a ViT built for 224 px trains at 64 px."""

from __future__ import annotations

import pytest
import torch

from competition.config import ModelConfig, load_config
from competition.conformance.backbones import check_backbone
from competition.errors import ConfigError
from competition.manager import components
from competition.runs import RunRecord
from tests.conftest import trashnet_config

VIT = "vit_tiny_patch16_224"  # built for 224 px only
TINY = "test_vit"  # timm's test ViT: 160 px, fixed with dynamic_img_size=False
FIXED = {"dynamic_img_size": False}


def factory(name=VIT):
    return components("backbones")[name]


def test_img_size_builds_a_vit_for_64px_and_passes_the_conformance_check():
    model = check_backbone(factory(), ModelConfig(backbone=VIT, kwargs={"img_size": 64}), size=64)
    assert model.data_config["input_size"] == (3, 64, 64)


def test_dynamic_img_size_takes_any_size():
    config = ModelConfig(backbone=VIT, kwargs={"dynamic_img_size": True})
    check_backbone(factory(), config, size=32)


def test_without_kwargs_a_fixed_size_vit_fails_naming_the_fix():
    fixed = ModelConfig(backbone=TINY, kwargs=FIXED)
    with pytest.raises(AssertionError, match=r"model\.kwargs"):
        check_backbone(factory(TINY), fixed, size=64)
    model = factory(TINY)(fixed, 3).eval()
    with pytest.raises(ConfigError, match=r"64x64 px.*img_size: 64"):
        model(torch.rand(1, 3, 64, 64))


def test_the_check_catches_kwargs_that_never_reach_the_model():
    def drops_kwargs(config, num_classes):  # a plugin that builds the model without them
        return factory(TINY)(ModelConfig(backbone=TINY), num_classes)

    config = ModelConfig(backbone=TINY, kwargs={"img_size": 64})
    with pytest.raises(AssertionError, match="did not reach the model"):
        check_backbone(drops_kwargs, config, size=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 3}, "num_classes are set by the template"),
        ({"no_such_argument": 1}, r"model.kwargs=\{'no_such_argument': 1\}"),
    ],
)
def test_bad_kwargs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        factory(TINY)(ModelConfig(backbone=TINY, kwargs=kwargs), 3)


def test_kwargs_parse_from_the_command_line_and_reject_a_non_mapping():
    config = load_config(None, ["model.kwargs={img_size: 64, dynamic_img_size: true}"])
    assert config.model.kwargs == {"img_size": 64, "dynamic_img_size": True}
    with pytest.raises(ConfigError, match=r"model\.kwargs: expected a mapping"):
        load_config(None, ["model.kwargs=64"])


def test_a_fixed_size_vit_trains_at_32px_and_the_run_keeps_its_kwargs(
    kaggle_small, tmp_path, run_paths
):
    from competition.cv import run_cv

    # without the kwargs the model takes 160 px only and the fold fails
    kwargs = "model.kwargs={img_size: 32, dynamic_img_size: false}"
    config = trashnet_config(kaggle_small, tmp_path, f"model.backbone={TINY}", kwargs)
    cv = run_cv(config, folds=[0], log=lambda *_: None, **run_paths)
    assert cv["folds_done"] == [0]
    saved = RunRecord.open(run_paths["runs_dir"] / "t").config
    assert saved.model.kwargs == {"img_size": 32, "dynamic_img_size": False}  # export reads them
