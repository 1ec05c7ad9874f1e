"""Built-in losses; every one accepts hard (B,) and soft (B, K) targets.

* ``cross_entropy``: label smoothing from Szegedy et al. 2016, "Rethinking the Inception
  Architecture for Computer Vision"; optional class weights.
* ``focal``: Lin et al. 2017, "Focal Loss for Dense Object Detection".
* ``class_balanced``: Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples".
* ``logit_adjusted``: Menon et al. 2021, "Long-tail Learning via Logit Adjustment".
* ``balanced_softmax``: Ren et al. 2020, "Balanced Meta-Softmax for Long-Tailed Visual Recognition".
* ``ldam``: Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
  Loss"; ``ldam_drw`` and ``ce_drw`` add their deferred re-weighting (DRW): class-balanced
  weights (Cui et al. 2019, effective number) from a configured epoch on, through ``set_epoch``.

A hard target is turned into a one-hot row and goes through the same code as a soft one, so a
one-hot soft target gives exactly the value of the hard target. Every loss takes
``label_smoothing`` (the smoothed target is ``(1 - eps) * target + eps / K``). Losses compute in
float32 whatever the dtype of the logits (autocast).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from competition import hookimpl
from competition.errors import ConfigError, DataError, reject_unknown_params


def _bad(loss: str, param: str, value, must: str) -> ConfigError:
    return ConfigError(
        f"loss '{loss}': parameter '{param}'={value!r} is invalid; it must be {must}."
    )


def _number(loss: str, param: str, value, low: float, high: float, must: str) -> float:
    """``value`` as a float in ``[low, high]``, or a ConfigError naming the loss and parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(loss, param, value, must)
    if not (low <= float(value) <= high):
        raise _bad(loss, param, value, must)
    return float(value)


def _counts(loss: str, num_classes: int, class_counts) -> torch.Tensor:
    """Per-class training counts as a float64 tensor; every class must have a sample."""
    if class_counts is None:
        raise ConfigError(
            f"loss '{loss}' needs class_counts (the number of training samples of each class); "
            "the core passes them from the fold's training labels. Use 'cross_entropy' or "
            "'focal' when counts are not known."
        )
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() != num_classes:
        raise ConfigError(
            f"loss '{loss}': class_counts has {counts.numel()} entries, expected one per class "
            f"({num_classes})."
        )
    empty = [k for k, n in enumerate(counts.tolist()) if not n > 0]
    if empty:
        raise DataError(
            f"loss '{loss}': class(es) {empty} have no training samples, so their prior is zero "
            "and the loss is undefined. Use stratified folds so every class is in every training "
            "split, drop the class, or choose 'cross_entropy'/'focal'."
        )
    return counts


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float (B, K) target rows from hard (B,) or soft (B, K) targets."""
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            raise ValueError(
                f"soft targets must have shape (B, {num_classes}), got {tuple(targets.shape)}"
            )
        q = targets.float()
    else:
        if targets.ndim != 1:
            raise ValueError(f"hard targets must have shape (B,), got {tuple(targets.shape)}")
        q = F.one_hot(targets.long(), num_classes).float()
    return q


class _SoftLoss(nn.Module):
    """Shared plumbing: number of classes, label smoothing, target conversion."""

    loss_name = ""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(
                f"loss '{self.loss_name}': num_classes={num_classes!r}, expected an int >= 2."
            )
        self.num_classes = num_classes
        self.label_smoothing = _number(
            self.loss_name, "label_smoothing", label_smoothing, 0.0, 1.0, "a number in [0, 1]"
        )

    def _inputs(self, logits: torch.Tensor, targets: torch.Tensor):
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"loss '{self.loss_name}': logits must have shape (B, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        raw = soft_targets(targets, self.num_classes).to(logits.device)
        smooth = raw
        if self.label_smoothing:
            smooth = raw * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return logits.float(), raw, smooth

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}"


class CrossEntropyLoss(_SoftLoss):
    """Cross-entropy with label smoothing and optional class weights.

    With ``weight`` the value matches ``F.cross_entropy(..., weight=...)``: a weighted mean whose
    denominator is the weight of each sample's (unsmoothed) target.
    """

    loss_name = "cross_entropy"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        label_smoothing: float = 0.0,
        weight: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, label_smoothing)
        w = None
        if weight is not None:
            must = f"a list of {num_classes} numbers >= 0, one per class"
            try:
                w = torch.as_tensor(list(weight), dtype=torch.float32)
            except (TypeError, ValueError):
                raise _bad(self.loss_name, "weight", weight, must) from None
            if w.ndim != 1 or w.numel() != num_classes or not bool((w >= 0).all()):
                raise _bad(self.loss_name, "weight", weight, must)
        self.register_buffer("weight", w)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, raw, smooth = self._inputs(logits, targets)
        nll = -F.log_softmax(logits, dim=1)
        if self.weight is None:
            return (smooth * nll).sum(dim=1).mean()
        w = self.weight.to(logits.device)
        return (smooth * nll * w).sum() / (raw * w).sum()


class FocalLoss(_SoftLoss):
    """Softmax focal loss ``-sum_k q_k (1 - p_k)^gamma log p_k``; ``gamma=0`` is cross-entropy."""

    loss_name = "focal"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        gamma: float = 2.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__(num_classes, label_smoothing)
        self.gamma = _number(self.loss_name, "gamma", gamma, 0.0, math.inf, "a number >= 0")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _, smooth = self._inputs(logits, targets)
        log_p = F.log_softmax(logits, dim=1)
        modulation = (1.0 - log_p.exp()).clamp(min=0.0).pow(self.gamma)
        return -(smooth * modulation * log_p).sum(dim=1).mean()


class ClassBalancedLoss(FocalLoss):
    """Cross-entropy (``gamma=0``) or focal loss weighted by inverse effective numbers of samples.

    Class ``j`` weighs ``(1 - beta) / (1 - beta^n_j)``, normalised to sum to ``K``; a sample weighs
    the target-weighted sum of its class weights. ``beta=0`` gives the plain loss.
    """

    loss_name = "class_balanced"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        beta: float = 0.999,
        gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__(num_classes, gamma=gamma, label_smoothing=label_smoothing)
        self.beta = _number(self.loss_name, "beta", beta, 0.0, 1.0 - 1e-12, "a number in [0, 1)")
        counts = _counts(self.loss_name, num_classes, class_counts)
        effective = (1.0 - torch.pow(self.beta, counts)) / (1.0 - self.beta)
        w = 1.0 / effective
        self.register_buffer("class_weight", (w / w.sum() * num_classes).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, raw, smooth = self._inputs(logits, targets)
        log_p = F.log_softmax(logits, dim=1)
        modulation = (1.0 - log_p.exp()).clamp(min=0.0).pow(self.gamma)
        per_sample = -(smooth * modulation * log_p).sum(dim=1)
        sample_weight = raw @ self.class_weight.to(logits.device)
        return (sample_weight * per_sample).mean()


class LogitAdjustedLoss(_SoftLoss):
    """Cross-entropy on ``logits + tau * log(prior)``; predict with the plain logits.

    The adjustment lives in the loss only, so the trained model's logits are already balanced.
    """

    loss_name = "logit_adjusted"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__(num_classes, label_smoothing)
        self.tau = _number(self.loss_name, "tau", tau, 0.0, math.inf, "a number >= 0")
        counts = _counts(self.loss_name, num_classes, class_counts)
        self.register_buffer("adjustment", (self.tau * torch.log(counts / counts.sum())).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _, smooth = self._inputs(logits, targets)
        adjusted = logits + self.adjustment.to(logits.device)
        return -(smooth * F.log_softmax(adjusted, dim=1)).sum(dim=1).mean()


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Cross-entropy on ``logits + log(n_j)``: the softmax of the training label distribution."""

    loss_name = "balanced_softmax"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        label_smoothing: float = 0.0,
    ):
        super().__init__(num_classes, class_counts, tau=1.0, label_smoothing=label_smoothing)


class LDAMLoss(_SoftLoss):
    """Label-distribution-aware margin: ``s * (z_k - q_k * m_k)`` into soft cross-entropy.

    Margins ``m_j`` are proportional to ``n_j^(-1/4)``, the largest equal to ``max_m``. A hard
    target subtracts ``m_y`` from the target logit only, as in the paper; a soft target subtracts
    each class's margin weighted by its target mass. ``s=30`` is the paper's scale for a
    normalised (cosine) classifier; with a plain linear head a scale near 1 trains better.
    """

    loss_name = "ldam"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        max_m: float = 0.5,
        s: float = 30.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__(num_classes, label_smoothing)
        self.max_m = _number(self.loss_name, "max_m", max_m, 0.0, math.inf, "a number >= 0")
        self.s = _number(self.loss_name, "s", s, 1e-12, math.inf, "a number > 0")
        counts = _counts(self.loss_name, num_classes, class_counts)
        m = counts.pow(-0.25)
        self.register_buffer("margins", (m * (self.max_m / m.max())).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, raw, smooth = self._inputs(logits, targets)
        shifted = self.s * (logits - raw * self.margins.to(logits.device))
        return -(smooth * F.log_softmax(shifted, dim=1)).sum(dim=1).mean()


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019 class weights ``(1 - beta) / (1 - beta^n_j)``, normalised to sum to ``K``."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(beta, counts))
    return (w / w.sum() * len(counts)).float()


class _DeferredReweighting:
    """Deferred re-weighting (DRW; Cao et al. 2019): class-balanced weights from an epoch on.

    The engine calls ``set_epoch(epoch, epochs)`` (0-based epoch) before each training epoch.
    ``drw_epoch`` is the first epoch (counting from 1) trained with the weights; the default is
    the start of the last quarter (``floor(0.75 * epochs) + 1``: epoch 151 of 200). Weights are
    Cui et al.'s effective-number weights with ``beta`` (0.9999 as in Cao et al.'s code); the loss
    is their weighted mean, as ``F.cross_entropy(weight=...)`` computes it. Before the switch, and
    when ``set_epoch`` was never called, the loss is unweighted.
    """

    def _init_drw(self, num_classes: int, class_counts, beta: float, drw_epoch) -> None:
        self.beta = _number(self.loss_name, "beta", beta, 0.0, 1.0 - 1e-12, "a number in [0, 1)")
        if drw_epoch is not None and (
            isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 1
        ):
            raise _bad(self.loss_name, "drw_epoch", drw_epoch, "an epoch number >= 1, or null")
        self.drw_epoch = drw_epoch
        counts = _counts(self.loss_name, num_classes, class_counts)
        self.register_buffer("drw_weight", effective_number_weights(counts, self.beta))
        self.reweighting = False

    def drw_start(self, epochs: int) -> int:
        """The 0-based epoch from which the weights apply."""
        return self.drw_epoch - 1 if self.drw_epoch is not None else math.floor(0.75 * epochs)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Switch the class-balanced weights on from :meth:`drw_start` (called by the engine)."""
        self.reweighting = epoch >= self.drw_start(epochs)

    def _weighted(self, per_class: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Mean of ``per_class`` (B, K) summed over K; the weighted mean while re-weighting."""
        if not self.reweighting:
            return per_class.sum(dim=1).mean()
        w = self.drw_weight.to(per_class.device)
        return (per_class * w).sum() / (raw * w).sum()


class CrossEntropyDRW(_DeferredReweighting, _SoftLoss):
    """CE-DRW (Cao et al. 2019): cross-entropy, class-balanced weights from ``drw_epoch`` on."""

    loss_name = "ce_drw"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        beta: float = 0.9999,
        drw_epoch: int | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__(num_classes, label_smoothing)
        self._init_drw(num_classes, class_counts, beta, drw_epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, raw, smooth = self._inputs(logits, targets)
        return self._weighted(-smooth * F.log_softmax(logits, dim=1), raw)


class LDAMDRWLoss(_DeferredReweighting, LDAMLoss):
    """LDAM-DRW (Cao et al. 2019): the LDAM margin loss, class-balanced weights from
    ``drw_epoch`` on (their schedule: the last part of training)."""

    loss_name = "ldam_drw"

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        *,
        max_m: float = 0.5,
        s: float = 30.0,
        beta: float = 0.9999,
        drw_epoch: int | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__(
            num_classes, class_counts, max_m=max_m, s=s, label_smoothing=label_smoothing
        )
        self._init_drw(num_classes, class_counts, beta, drw_epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, raw, smooth = self._inputs(logits, targets)
        shifted = self.s * (logits - raw * self.margins.to(logits.device))
        return self._weighted(-smooth * F.log_softmax(shifted, dim=1), raw)


LOSSES: dict[str, type[_SoftLoss]] = {
    "cross_entropy": CrossEntropyLoss,
    "focal": FocalLoss,
    "class_balanced": ClassBalancedLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "ldam": LDAMLoss,
    "ce_drw": CrossEntropyDRW,
    "ldam_drw": LDAMDRWLoss,
}


def _checked_factory(name: str, cls: type[_SoftLoss]):
    """A factory that rejects unknown parameters with a ConfigError listing the valid ones."""
    valid = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]

    def factory(num_classes: int, class_counts: Sequence[int] | None = None, **params):
        reject_unknown_params(f"loss '{name}'", params, valid)
        return cls(num_classes, class_counts, **params)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__doc__ = cls.__doc__
    factory.loss_class = cls
    factory.params = tuple(valid)
    return factory


@hookimpl
def competition_register_losses():
    """The built-in losses by name."""
    return {name: _checked_factory(name, cls) for name, cls in LOSSES.items()}
