"""Deferred re-weighting (Cao et al. 2019): LDAM-DRW and CE-DRW against the paper's formulas,
and the engine's ``set_epoch`` call that switches the weights on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from competition.conformance.losses import check_loss
from competition.errors import ConfigError
from competition.manager import components
from plugins.losses import effective_number_weights
from tests.conftest import trashnet_config

COUNTS = [100, 20, 5]


def test_effective_number_weights_hand_worked():
    # Cui et al. 2019: w_j = (1 - beta) / (1 - beta^n_j), normalised to sum to K
    beta = 0.9
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in COUNTS], dtype=torch.float64)
    assert torch.allclose(effective_number_weights(COUNTS, beta), (raw / raw.sum() * 3).float())


@pytest.mark.parametrize("name", ["ce_drw", "ldam_drw"])
def test_drw_conformance(name):
    check_loss(components("losses")[name])


def test_ce_drw_switches_at_the_last_quarter():
    loss = components("losses")["ce_drw"](3, COUNTS)
    logits, targets = (
        torch.randn(8, 3, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 2, 0, 0, 1, 2, 2]),
    )
    weights = effective_number_weights(COUNTS, 0.9999)
    plain, weighted = F.cross_entropy(logits, targets), F.cross_entropy(logits, targets, weights)
    for epoch, want in [(0, plain), (14, plain), (15, weighted), (19, weighted)]:
        loss.set_epoch(epoch, 20)  # floor(0.75 * 20) = 15: epochs 16..20 (from 1) re-weighted
        assert torch.allclose(loss(logits, targets), want), epoch


def test_ldam_drw_matches_cao_et_al():
    loss = components("losses")["ldam_drw"](3, COUNTS, max_m=0.5, s=30.0, drw_epoch=3)
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    m = torch.tensor(COUNTS, dtype=torch.float64).pow(-0.25)
    m = (m * 0.5 / m.max()).float()
    shifted = 30.0 * (logits - F.one_hot(targets, 3) * m)
    loss.set_epoch(1, 10)  # epoch 2 (from 1): before drw_epoch=3
    assert torch.allclose(loss(logits, targets), F.cross_entropy(shifted, targets))
    loss.set_epoch(2, 10)
    weights = effective_number_weights(COUNTS, 0.9999)
    assert torch.allclose(loss(logits, targets), F.cross_entropy(shifted, targets, weights))


def test_bad_drw_epoch_is_named():
    with pytest.raises(ConfigError, match="drw_epoch"):
        components("losses")["ce_drw"](3, COUNTS, drw_epoch=0)


def test_engine_calls_set_epoch(kaggle_small, tmp_path, run_paths, monkeypatch):
    """A 2-epoch run with drw_epoch=2 trains epoch 1 plain and epoch 2 re-weighted."""
    from competition.cv import run_cv
    from plugins import losses

    seen = []
    original = losses.CrossEntropyDRW.set_epoch

    def record(self, epoch, epochs):
        original(self, epoch, epochs)
        seen.append((epoch, epochs, self.reweighting))

    monkeypatch.setattr(losses.CrossEntropyDRW, "set_epoch", record)
    config = trashnet_config(
        kaggle_small, tmp_path, "loss.name=ce_drw", "loss.params={drw_epoch: 2}", "optim.epochs=2"
    )
    run_cv(config, folds=[0], log=lambda *_: None, **run_paths)
    assert seen == [(0, 2, False), (1, 2, True)]
