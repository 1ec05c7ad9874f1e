"""Conformance check for backbone factories (``competition_register_backbones``)."""

from __future__ import annotations

import torch
from torch import nn

from competition.config import ModelConfig


def check_backbone(factory, model_config: ModelConfig | None = None, num_classes: int = 5, size=32):
    """Assert what the engine relies on; returns the built model.

    The module takes float images in [0, 1] (B, 3, H, W) of ``size`` px and returns finite logits
    (B, K); it is deterministic in eval mode, trains (gradients reach trainable parameters), and
    its optional interfaces (``param_groups``, ``data_config``, ``embed``, ``stages``) are
    well-formed. ``model_config.kwargs`` reach the model (``img_size`` shows in ``data_config``).
    """
    model_config = model_config or ModelConfig()
    model = factory(model_config, num_classes)
    assert isinstance(model, nn.Module), f"factory returned {type(model).__name__}, not nn.Module"
    torch.manual_seed(0)
    images = torch.rand(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        try:
            logits = model(images)
        except Exception as exc:
            raise AssertionError(
                f"the backbone does not run on {size}x{size} px images ({exc}); a model built for "
                "a fixed input size needs model.kwargs (e.g. img_size or dynamic_img_size)"
            ) from exc
        again = model(images)
    assert logits.shape == (2, num_classes), f"logits {tuple(logits.shape)} != (2, {num_classes})"
    assert torch.isfinite(logits).all(), "logits are not finite"
    assert torch.allclose(logits, again), "eval mode is not deterministic"
    assert not torch.allclose(logits[0], logits[1]), "the output ignores the input"

    model.train()
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1]))
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "no trainable parameters"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), "no gradient"

    if hasattr(model, "param_groups"):
        groups = model.param_groups()
        grouped = [p for g in groups for p in g["params"]]
        assert len(grouped) == len({id(p) for p in grouped}), "a parameter is in two groups"
        assert {id(p) for p in grouped} == {id(p) for p in trainable}, (
            "param_groups() must cover exactly the trainable parameters"
        )
        assert all(float(g.get("lr_scale", 1.0)) > 0 for g in groups)
    if hasattr(model, "data_config"):
        config = model.data_config
        assert len(config["mean"]) == 3 and len(config["std"]) == 3
        assert all(s > 0 for s in config["std"])
        wanted = model_config.kwargs.get("img_size")
        if wanted is not None:  # inference outside the template reads it
            wanted = tuple(wanted) if isinstance(wanted, list | tuple) else (wanted, wanted)
            assert tuple(config["input_size"][-2:]) == wanted, (
                f"model.kwargs img_size={wanted} but data_config input_size is "
                f"{config['input_size']}: the kwargs did not reach the model"
            )
    if hasattr(model, "embed"):
        model.eval()
        with torch.no_grad():
            features = model.embed(images)
        assert features.ndim == 2 and features.shape[0] == 2, "embed() must return (B, D)"
    if hasattr(model, "stages"):
        stages = model.stages()
        assert stages and all(isinstance(s, nn.Module) for s in stages)
    return model
