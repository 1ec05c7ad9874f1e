"""The timm backbone plugin: registry, hook, heads, pooling, fine-tuning strategies."""

from __future__ import annotations

import pluggy
import pytest
import timm
import torch
from timm.data import resolve_data_config

from competition import PROJECT, hookspecs
from competition.config import Config, ModelConfig
from competition.errors import ConfigError, PluginError
from competition.manager import components, get_plugin_manager, resolve
from plugins import backbones
from plugins.backbones import Classifier, GeM

K = 4


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(backbone: str = "resnet10t", **kwargs) -> Classifier:
    torch.manual_seed(0)
    return Classifier(backbone, ModelConfig(backbone=backbone, **kwargs), K)


def trainable(model: Classifier) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def bn_stats(model: Classifier) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.backbone.named_buffers() if n.endswith("running_mean")}


# -- registry and hook ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_manager():
    """A manager with this plugin only, so the registry is tested on its own."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(backbones, name="plugins.backbones")
    return pm


def test_registry_is_lazy_over_the_timm_zoo(own_manager):
    available = components("backbones", own_manager)
    assert "resnet10t" in available and "resnet18.a1_in1k" in available
    assert "resnet10x" not in available and "hf-hub:timm/resnet18" not in available
    assert len(available) == len(timm.list_models()) > 1000
    model = resolve("backbones", "test_efficientnet", "model.backbone", own_manager)(
        ModelConfig(backbone="test_efficientnet"), K
    )
    assert isinstance(model, Classifier) and model(images()).shape == (4, K)


def test_create_model_through_the_plugin_manager():
    config = Config(model=ModelConfig(backbone="resnet10t"))
    model = get_plugin_manager().hook.competition_create_model(config=config, num_classes=K)
    assert isinstance(model, Classifier) and model.name == "resnet10t"
    assert model(images(2)).shape == (2, K)


def test_unknown_backbone_lists_close_names():
    config = Config(model=ModelConfig(backbone="resnet10x"))
    with pytest.raises(
        PluginError, match=r"model.backbone: unknown backbone 'resnet10x'.*resnet10t"
    ):
        get_plugin_manager().hook.competition_create_model(config=config, num_classes=K)


# -- normalisation, embeddings, heads -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet10t", "test_resnet"])  # ImageNet vs 0.5 mean/std
def test_normalises_with_the_pretrained_config(arch):
    model = build(arch).eval()
    expected = resolve_data_config({}, model=timm.create_model(arch))
    assert model.data_config == {
        k: expected[k] for k in ("mean", "std", "input_size", "crop_pct", "interpolation")
    }
    mean = torch.tensor(expected["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(expected["std"]).view(1, 3, 1, 1)
    x = images(2)
    with torch.no_grad():
        manual = model.backbone.forward_features((x - mean) / std).mean(dim=(2, 3))
        assert torch.allclose(model.embed(x), manual, atol=1e-5)
        raw = model.backbone.forward_features(x).mean(dim=(2, 3))
        assert not torch.allclose(model.embed(x), raw, atol=1e-3)


def test_embed_is_pooled_features_before_the_head():
    model = build("test_efficientnet", drop_rate=0.5).eval()
    x = images(3)
    with torch.no_grad():
        feats = model.embed(x)
        assert feats.shape == (3, model.backbone.num_features)
        assert torch.allclose(model(x), model.head(feats), atol=1e-6)  # dropout off in eval


@pytest.mark.parametrize("pooling", ["avg", "gem"])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_pooling_and_heads_give_logits(pooling, head):
    model = build("test_efficientnet", pooling=pooling, head=head)
    logits = model(images(5))
    assert logits.shape == (5, K) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)


def test_gem_interpolates_between_mean_and_max():
    x = torch.rand(2, 8, 5, 5) + 0.1
    gem = GeM()
    assert gem.p.item() == 3.0 and gem.p.requires_grad
    with torch.no_grad():
        gem.p.fill_(1.0)
        assert torch.allclose(gem(x), x.mean(dim=(2, 3)), atol=1e-6)
        gem.p.fill_(200.0)
        assert torch.allclose(gem(x), x.amax(dim=(2, 3)), atol=0.03)
        gem.p.fill_(3.0)
        assert (gem(x) > x.mean(dim=(2, 3))).all()


def test_cosine_head_is_scaled_cosine_similarity():
    model = build(head="cosine").eval()
    scale = model.head.scale.item()
    with torch.no_grad():
        feats = model.embed(images())
        logits = model(images())
        w = torch.nn.functional.normalize(model.head.weight, dim=1)
        expected = scale * torch.nn.functional.normalize(feats, dim=1) @ w.T
    assert torch.allclose(logits, expected, atol=1e-5)
    assert logits.abs().max() <= scale + 1e-5
    assert model.head.scale.requires_grad


def test_gem_on_tokens_is_refused():
    model = build("test_vit", pooling="gem")
    with pytest.raises(ConfigError, match=r"model\.pooling=gem"):
        model(images(1, 160))


# -- stages and fine-tuning -----------------------------------------------------------------------


def test_stages_shallow_to_deep():
    model = build("resnet10t")
    stages = model.stages()
    assert len(stages) == 5
    assert stages[-1] is model.backbone.layer4 and stages[1] is model.backbone.layer1
    assert [i["num_chs"] for i in model.backbone.feature_info] == [64, 64, 128, 256, 512]
    assert len(build("test_efficientnet").stages()) == 5


def test_full_trains_everything_with_a_backbone_lr_factor():
    model = build(finetune="full", backbone_lr_factor=0.1)
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    groups = model.param_groups()
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}


def test_last_n_trains_the_last_stages_and_what_follows():
    model = build("resnet10t", finetune="last_n", last_n=1, backbone_lr_factor=0.5)
    names = trainable(model)
    assert any(n.startswith("backbone.layer4.") for n in names)
    assert not any(n.startswith(("backbone.layer3.", "backbone.conv1.")) for n in names)
    assert {"head.weight", "head.bias"} <= names
    assert [g["lr_scale"] for g in model.param_groups()] == [0.5, 1.0]
    assert sum(len(g["params"]) for g in model.param_groups()) == len(names)

    effnet = build("test_efficientnet", finetune="last_n", last_n=2)
    names = trainable(effnet)
    # stages are blocks.0,1,2,3,4: the last two and conv_head/bn2 after them train
    for prefix in (
        "backbone.blocks.3.",
        "backbone.blocks.4.",
        "backbone.conv_head.",
        "backbone.bn2.",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
    assert not any(n.startswith(("backbone.blocks.2.", "backbone.conv_stem.")) for n in names)


def test_last_n_keeps_frozen_batch_norm_statistics():
    model = build("resnet10t", finetune="last_n", last_n=1).train()
    assert model.training and not model.backbone.layer3[0].bn1.training
    assert model.backbone.layer4[0].bn1.training
    before = bn_stats(model)
    model(images(8))
    after = bn_stats(model)
    frozen = [n for n in before if not n.startswith("layer4.")]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])


def test_head_only_is_a_linear_probe():
    model = build("test_efficientnet", finetune="head", pooling="gem").train()
    assert trainable(model) == {"pool.p", "head.weight", "head.bias"}
    groups = model.param_groups()
    assert len(groups) == 1 and groups[0]["lr_scale"] == 1.0 and len(groups[0]["params"]) == 3
    before = bn_stats(model)
    model(images(8)).sum().backward()
    assert all(torch.equal(before[n], b) for n, b in bn_stats(model).items())
    assert all(p.grad is None for p in model.backbone.parameters())


def test_bad_finetune_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.last_n"):
        build(finetune="last_n", last_n=0)
    with pytest.raises(ConfigError, match=r"model\.backbone=resnet10x"):
        Classifier("resnet10x", ModelConfig(), K)
