"""Grad-CAM (Selvaraju et al. 2017): where a fold's model looked when it made a prediction.

The gradient of a class's logit with respect to the last convolutional feature map (the map the
model pools: the input of ``model.pool`` for the built-in classifier, else the output of the
model's last ``Conv2d``) is averaged over space into one weight per channel; the map is the ReLU
of the weighted channel sum, upsampled to the input and scaled to [0, 1] per image. Each OOF image
is explained by the fold model that predicted it, on the model's own eval input (no TTA).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from competition.errors import PluginError


def _capture_features(model: torch.nn.Module, store: dict):
    """Hook the feature map Grad-CAM weighs: the pooling's input, else the last Conv2d output."""
    pool = getattr(model, "pool", None)
    if isinstance(pool, torch.nn.Module):
        return pool.register_forward_pre_hook(lambda module, inputs: store.update(a=inputs[0]))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise PluginError(
            f"Grad-CAM: {type(model).__name__} has no pooling module and no Conv2d layer; "
            "it needs a convolutional feature map"
        )
    return convs[-1].register_forward_hook(lambda module, inputs, output: store.update(a=output))


def grad_cam(
    model: torch.nn.Module, images: torch.Tensor, targets: list[np.ndarray]
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Grad-CAM maps (B, H, W) in [0, 1] of ``images`` (B, 3, H, W floats in [0, 1]) for each
    array of class indices in ``targets`` (e.g. the predicted and the true classes), and the
    (height, width) of the feature map they were computed on (their real resolution)."""
    model.eval()
    store: dict = {}
    handle = _capture_features(model, store)
    maps = []
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # frozen backbones still get grads
            logits = model(x)
            features = store.get("a")
            if features is None or features.ndim != 4 or not features.requires_grad:
                raise PluginError(
                    f"Grad-CAM: {type(model).__name__} gives no (B, C, H, W) feature map to its "
                    "pooling (a transformer's tokens?); Grad-CAM needs a convolutional backbone"
                )
            for i, target in enumerate(targets):
                index = torch.tensor(np.array(target), device=logits.device).long()
                score = logits.gather(1, index[:, None]).sum()
                (grads,) = torch.autograd.grad(score, features, retain_graph=i < len(targets) - 1)
                weights = grads.float().mean(dim=(2, 3), keepdim=True)
                cam = torch.relu((weights * features.float()).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
                cam = cam[:, 0]
                peak = cam.flatten(1).max(1).values.clamp_min(1e-12)
                maps.append((cam / peak[:, None, None]).detach().cpu().numpy())
    finally:
        handle.remove()
    return maps, tuple(features.shape[-2:])


def explain_rows(record, competition, rows: pd.DataFrame, log=print):
    """Grad-CAM of OOF ``rows`` (id, fold, target_index, predicted) with their folds' models.

    Returns ``(images, maps, feature_size)``: the model's eval input of each row (H, W, 3
    uint8), a ``(map of the predicted class, map of the true class)`` pair per row, in ``rows``'
    order, and the (height, width) of the feature map behind the maps.
    """
    from competition.config import REPO_ROOT, replace
    from competition.device import select_device, to_device
    from competition.engine import load_checkpoint
    from competition.images import decode
    from competition.loaders import SamplePipeline
    from competition.manager import get_plugin_manager

    config = record.config
    weights = record.weights_run()
    pm = get_plugin_manager()
    device = select_device(config.device)
    data = config.data
    eval_size = data.eval_image_size or data.image_size
    side = round(max(data.image_size, eval_size) / data.crop_pct)  # the image cache's side
    pipeline = SamplePipeline(config.augment.eval, eval_size, "augment.eval", pm)
    path_of = dict(zip(competition.train["id"].astype(str), competition.train["path"], strict=True))
    # the architecture only: the fold's best.pt replaces every weight
    bare = replace(config, {"model.pretrained": None})
    images: list = [None] * len(rows)
    maps: list = [None] * len(rows)
    for fold, group in rows.reset_index(drop=True).groupby("fold"):
        path = weights.fold_dir(int(fold)) / "best.pt"
        fix = f"it is written by training fold {fold} of {weights.path}"
        state = load_checkpoint(path, str(path), fix, map_location=device)["model"]
        model = pm.hook.competition_create_model(config=bare, num_classes=len(record.classes()))
        model.load_state_dict(state)
        model.to(device)
        batch = np.stack(
            [pipeline(decode(REPO_ROOT / path_of[i], side, data.resize)) for i in group["id"]]
        )
        tensor = to_device(torch.from_numpy(batch).permute(0, 3, 1, 2), device, False)
        (predicted, true), feature_size = grad_cam(
            model, tensor, [group["predicted"].to_numpy(), group["target_index"].to_numpy()]
        )
        for j, position in enumerate(group.index):
            images[position] = batch[j]
            maps[position] = (predicted[j], true[j])
        log(f"Grad-CAM: fold {fold}, {len(group)} image(s)")
    return images, maps, feature_size


__all__ = ["explain_rows", "grad_cam"]
