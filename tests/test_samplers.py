"""Samplers: the conformance check for every built-in, Kang et al.'s formulas, and the wiring
through ``data.sampler`` into a training run (seeded, per fold, epoch-aware)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from competition.conformance.samplers import check_sampler, long_tailed_targets
from competition.errors import ConfigError, PluginError
from competition.manager import components
from competition.workspace import Workspace
from plugins.samplers import class_probabilities
from tests.conftest import trashnet_config

EXPECTED = {
    "instance_balanced": lambda n, t, T: n,
    "class_balanced": lambda n, t, T: np.ones_like(n, dtype=float),
    "square_root": lambda n, t, T: np.sqrt(n),
    "progressively_balanced": lambda n, t, T: (1 - t / T) * n / n.sum() + t / T / len(n),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_sampler_conformance(name):
    check_sampler(components("samplers")[name], expected=EXPECTED[name])


def test_conformance_catches_a_wrong_frequency():
    with pytest.raises(AssertionError, match="class frequencies"):
        check_sampler(components("samplers")["square_root"], expected=EXPECTED["class_balanced"])


def test_class_probabilities_hand_worked():
    # n = (100, 25, 4): q=1 -> n/129; q=0.5 -> (10, 5, 2)/17; q=0 -> 1/3 each
    n = np.array([100, 25, 4])
    assert np.allclose(class_probabilities(n, 1.0), n / 129)
    assert np.allclose(class_probabilities(n, 0.5), np.array([10, 5, 2]) / 17)
    assert np.allclose(class_probabilities(n, 0.0), 1 / 3)


def test_progressive_moves_from_instance_to_class_balanced():
    targets = long_tailed_targets()
    counts = np.bincount(targets)
    sampler = components("samplers")["progressively_balanced"](targets, 5, torch.Generator())
    sampler.set_epoch(0, 4)
    assert np.allclose(sampler.probabilities(), counts / counts.sum())
    sampler.set_epoch(2, 4)
    assert np.allclose(sampler.probabilities(), 0.5 * counts / counts.sum() + 0.5 / 5)


def test_instance_balanced_is_the_shuffle_it_replaces():
    targets = long_tailed_targets()
    sampler = components("samplers")["instance_balanced"](
        targets, 5, torch.Generator().manual_seed(3)
    )
    shuffle = torch.randperm(len(targets), generator=torch.Generator().manual_seed(3)).tolist()
    assert list(sampler) == shuffle


def test_unknown_parameter_and_name_are_named():
    with pytest.raises(ConfigError, match="num_samples"):
        components("samplers")["class_balanced"]([0, 1], 2, None, num_sample=3)


def test_workspace_loader_uses_the_configured_sampler(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, "data.sampler.name=class_balanced")
    ws = Workspace(config, run_paths["folds_dir"], log=lambda *_: None)
    index = np.flatnonzero(ws.fold_of != 0)
    a = ws.loader("train", index, train=True, seed=5)
    b = ws.loader("train", index, train=True, seed=5)
    assert type(a.sampler).__name__ == "ClassBalancedSampler"
    assert len(a.sampler) == len(index)
    assert list(a.sampler) == list(b.sampler)  # seeded: a resumed fold draws the same rows
    assert max(a.sampler) < len(index)
    with pytest.raises(PluginError, match="class_balanced"):
        bad = trashnet_config(kaggle_small, tmp_path, "data.sampler.name=class_balancd")
        Workspace(bad, run_paths["folds_dir"], log=lambda *_: None).loader(
            "train", index, train=True
        )


def test_a_run_trains_with_a_progressive_sampler(kaggle_small, tmp_path, run_paths):
    from competition.cv import run_cv

    config = trashnet_config(
        kaggle_small,
        tmp_path,
        "data.sampler={name: progressively_balanced}",
        "optim.epochs=2",
        "folds.k=2",
    )
    cv = run_cv(config, folds=[0], log=lambda *_: None, **run_paths)
    assert cv["folds_done"] == [0]
    saved = (run_paths["runs_dir"] / "t" / "config.yaml").read_text()
    assert "progressively_balanced" in saved


class _Reversed(torch.utils.data.Sampler):
    """A user's sampler: a random permutation, reversed (instance-balanced)."""

    def __init__(self, targets, num_classes, generator=None, num_samples=None):
        self.n, self.generator = len(targets), generator
        self.num_samples = num_samples or self.n

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        order = []
        while len(order) < self.num_samples:
            order += torch.randperm(self.n, generator=self.generator).flip(0).tolist()
        return iter(order[: self.num_samples])


def test_hook_competition_register_samplers():
    """Every plugin contributes samplers; a user's passes the same conformance check."""
    from competition.manager import get_plugin_manager

    mappings = get_plugin_manager().hook.competition_register_samplers()
    assert any("progressively_balanced" in mapping for mapping in mappings)
    check_sampler(_Reversed, expected=EXPECTED["instance_balanced"])
