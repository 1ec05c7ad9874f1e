"""Every backbone plugin passes the shipped conformance check: a representative slice of timm,
with every pooling, head and fine-tuning strategy."""

import pytest

from competition.config import ModelConfig
from competition.conformance.backbones import check_backbone
from competition.manager import components

MODELS = ["resnet10t", "test_efficientnet", "test_convnext", "test_vit", "test_byobnet"]


@pytest.mark.parametrize("name", MODELS)
def test_timm_backbones_conform(name):
    check_backbone(components("backbones")[name], ModelConfig(backbone=name))


@pytest.mark.parametrize(
    "settings",
    [
        {"pooling": "gem"},
        {"head": "cosine"},
        {"finetune": "head"},
        {"finetune": "last_n", "last_n": 1},
        {"finetune": "full", "backbone_lr_factor": 0.1, "drop_rate": 0.3},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_heads_and_strategies_conform(settings):
    config = ModelConfig(backbone="resnet10t", **settings)
    check_backbone(components("backbones")["resnet10t"], config)


def test_the_check_rejects_a_broken_backbone():
    import torch

    class Ignores(torch.nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(num_classes))

        def forward(self, x):
            return self.bias.expand(len(x), -1)

    with pytest.raises(AssertionError, match="ignores the input"):
        check_backbone(lambda config, k: Ignores(k))
