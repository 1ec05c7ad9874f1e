"""Every timm model as a backbone, wrapped in a :class:`Classifier` with its own pooling and head.

timm: Wightman 2019, "PyTorch Image Models". Pooling and heads:

* ``gem``: generalised-mean pooling, Radenovic et al. 2018, "Fine-tuning CNN Image Retrieval with
  No Human Annotation" (learnable exponent p, initialised to 3).
* ``cosine``: a normalised classifier (cosine similarity of L2-normalised features and weights,
  times a learnable scale), Gidaris & Komodakis 2018, "Dynamic Few-Shot Visual Learning without
  Forgetting"; Wang et al. 2018, "CosFace: Large Margin Cosine Loss for Deep Face Recognition".

Fine-tuning strategies (``model.finetune``): ``full`` trains everything (the backbone at
``backbone_lr_factor`` x the head's LR), ``last_n`` trains the last ``last_n`` stages, what follows
them and the head, ``head`` trains the head only (a linear probe). Frozen parts keep their
batch-norm statistics: their BN layers stay in eval mode even in ``model.train()``.

``model.kwargs`` go to ``timm.create_model``: ``img_size`` builds a ViT (Dosovitskiy et al. 2021)
for another input size, ``dynamic_img_size`` lets it take any size (position embeddings
interpolated), ``drop_path_rate`` sets stochastic depth (Huang et al. 2016).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache, partial

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from competition import hookimpl
from competition.config import ModelConfig, require_one_backbone
from competition.errors import ConfigError
from competition.manager import resolve
from plugins.pretrained import load_pretrained

#: ``timm.create_model`` arguments the template sets itself; ``model.kwargs`` may not.
RESERVED_KWARGS = frozenset({"pretrained", "num_classes", "global_pool", "model_name"})


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): (mean x^p)^(1/p), learnable p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class AvgPool(nn.Module):
    """Global average pooling: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class CosineClassifier(nn.Module):
    """Logits = scale * cos(feature, class weight) (Gidaris & Komodakis 2018; Wang et al. 2018)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0, learn_scale=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def _upto(names: list[str], boundary: str) -> set[str]:
    """``names`` (registration order) up to and including the last one inside ``boundary``."""
    last = max((i for i, n in enumerate(names) if n.startswith(boundary + ".")), default=-1)
    return set(names[: last + 1])


class Classifier(nn.Module):
    """A timm backbone (no pooling, no classifier) + pooling + dropout + head.

    Takes float images in [0, 1] (B, 3, H, W) and normalises them with the mean/std of the
    backbone's pretrained config. ``embed(x)`` returns pooled features (B, D), ``forward(x)``
    logits (B, num_classes).
    """

    def __init__(self, name: str, config: ModelConfig, num_classes: int):
        super().__init__()
        self.name = name
        self.config = config
        reserved = sorted(RESERVED_KWARGS & set(config.kwargs))
        if reserved:
            raise ConfigError(
                f"model.kwargs: {', '.join(reserved)} are set by the template (pretrained weights "
                "come from model.pretrained, the head from model.head); remove them"
            )
        try:
            self.backbone = timm.create_model(
                name, pretrained=False, num_classes=0, global_pool="", **config.kwargs
            )
        except Exception as exc:
            given = f" with model.kwargs={config.kwargs}" if config.kwargs else ""
            raise ConfigError(
                f"model.backbone={name}: timm cannot build it{given}: {exc}. model.kwargs must be "
                "arguments of this timm model's constructor (e.g. img_size, drop_path_rate)"
            ) from exc
        if config.pretrained:
            load_pretrained(self.backbone, config.pretrained)
        cfg = resolve_data_config({}, model=self.backbone)
        self.data_config = {
            k: cfg[k] for k in ("mean", "std", "input_size", "crop_pct", "interpolation")
        }
        size = config.kwargs.get("img_size")  # the size it was built for, not its weights' size
        if size is not None:
            size = tuple(size) if isinstance(size, list | tuple) else (size, size)
            self.data_config["input_size"] = (3, *size)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

        dim = self.backbone.num_features
        self.pool = GeM() if config.pooling == "gem" else AvgPool()
        self.dropout = nn.Dropout(config.drop_rate)
        if config.head == "cosine":
            self.head = CosineClassifier(dim, num_classes)
        else:
            self.head = nn.Linear(dim, num_classes)
        self._frozen_norms: list[str] = []
        self._freeze(config.finetune, config.last_n)

    # -- structure --------------------------------------------------------------------------------

    def stages(self) -> list[nn.Module]:
        """The backbone's stages, shallow to deep (timm's ``feature_info`` modules)."""
        return [self.backbone.get_submodule(name) for name in self._stage_names()]

    def _stage_names(self) -> list[str]:
        info = getattr(self.backbone, "feature_info", None)
        if not info:
            raise ConfigError(f"model.backbone={self.name}: timm lists no stages (feature_info)")
        return [f["module"] for f in info]

    def _freeze(self, strategy: str, last_n: int) -> None:
        params = [n for n, _ in self.backbone.named_parameters()]
        buffers = [n for n, _ in self.backbone.named_buffers()]
        if strategy == "full":
            frozen_params, frozen_buffers = set(), set()
        elif strategy == "head":
            frozen_params, frozen_buffers = set(params), set(buffers)
        elif strategy == "last_n":
            if last_n < 1:
                raise ConfigError(f"model.last_n={last_n}: must be at least 1 with finetune=last_n")
            stages = self._stage_names()
            if last_n >= len(stages):
                frozen_params, frozen_buffers = set(), set()
            else:  # freeze everything up to the end of the stage before the last n
                boundary = stages[len(stages) - last_n - 1]
                frozen_params, frozen_buffers = _upto(params, boundary), _upto(buffers, boundary)
        else:
            raise ConfigError(f"model.finetune={strategy!r}: expected full, last_n or head")
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name not in frozen_params)
        self._frozen_norms = []
        for name, module in self.backbone.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
            own += [f"{name}.{n}" for n, _ in module.named_buffers(recurse=False)]
            if own and all(n in frozen_params or n in frozen_buffers for n in own):
                self._frozen_norms.append(name)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        """Like ``nn.Module.train``, but batch norms of frozen parts stay in eval mode."""
        super().train(mode)
        for name in self._frozen_norms:
            self.backbone.get_submodule(name).eval()
        return self

    def param_groups(self) -> list[dict]:
        """Trainable parameters: the backbone at ``backbone_lr_factor``, pooling and head at 1."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for m in (self.pool, self.head) for p in m.parameters() if p.requires_grad]
        groups = [
            {"params": backbone, "lr_scale": float(self.config.backbone_lr_factor)},
            {"params": head, "lr_scale": 1.0},
        ]
        return [g for g in groups if g["params"]]

    # -- forward ----------------------------------------------------------------------------------

    def _pool(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
                features = features.permute(0, 3, 1, 2)
            return self.pool(features)
        if features.ndim == 3:  # tokens (B, N, C): average the patch tokens
            if isinstance(self.pool, GeM):
                raise ConfigError(
                    f"model.pooling=gem needs a convolutional feature map; {self.name} gives "
                    "tokens. Use model.pooling=avg."
                )
            prefix = getattr(self.backbone, "num_prefix_tokens", 0) or 0
            return features[:, prefix:].mean(dim=1)
        raise ConfigError(
            f"model.backbone={self.name}: unexpected features {tuple(features.shape)}"
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) of images in [0, 1], before dropout and head."""
        x = (x - self.mean) / self.std
        try:
            features = self.backbone.forward_features(x)
        except AssertionError as exc:  # timm's fixed-size models: "Input height (64) doesn't match"
            size = tuple(x.shape[-2:])
            raise ConfigError(
                f"model.backbone={self.name} does not take {size[0]}x{size[1]} px images ({exc}). "
                f"Build it for this size: model.kwargs={{img_size: {size[0]}}}, or "
                "model.kwargs={dynamic_img_size: true} for a ViT that takes any size"
            ) from exc
        return self._pool(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))


# -- the zoo --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


class TimmBackbones(Mapping):
    """Lazy ``{name: factory}`` over every timm model; tagged names (``resnet18.a1_in1k``) work."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and ":" not in name and timm.is_model(name)

    def __getitem__(self, name: str):
        if name not in self:
            raise KeyError(name)
        return partial(Classifier, name)

    def __iter__(self) -> Iterator[str]:
        return iter(_timm_names())

    def __len__(self) -> int:
        return len(_timm_names())


@hookimpl
def competition_register_backbones():
    return TimmBackbones()


@hookimpl(trylast=True)
def competition_create_model(config, num_classes):
    factory = resolve("backbones", require_one_backbone(config, "a model"), "model.backbone")
    return factory(config.model, num_classes)
