"""Each hook as a plugin author meets it: registration, model creation, events, search space."""

import optuna
import pytest
import torch

from competition import hookimpl
from competition.config import load_config
from competition.cv import run_cv
from competition.errors import ConfigError
from competition.manager import get_plugin_manager
from competition.tune import suggest_config
from tests.conftest import trashnet_config


@pytest.mark.parametrize(
    ("hook", "example"),
    [
        ("competition_register_backbones", "resnet10t"),
        ("competition_register_losses", "cross_entropy"),
        ("competition_register_sample_transforms", "RandomResizedCrop"),
        ("competition_register_batch_augments", "mixup"),
        ("competition_register_tta", "hflip"),
    ],
)
def test_builtin_registration_hooks_answer(hook, example):
    mappings = getattr(get_plugin_manager().hook, hook)()
    assert any(example in mapping for mapping in mappings)


class _Recorder:
    """Records every event a run emits, and answers create_model before the built-in does."""

    def __init__(self):
        self.events = []

    @hookimpl
    def competition_configure(self, config):
        self.events.append(("configure", config.name))

    @hookimpl
    def competition_fold_start(self, fold, run_dir, config):
        self.events.append(("fold_start", fold))

    @hookimpl
    def competition_epoch_end(self, fold, epoch, metrics, run_dir):
        self.events.append(("epoch_end", fold, epoch, sorted(metrics)))

    @hookimpl
    def competition_fold_end(self, fold, result, run_dir):
        self.events.append(("fold_end", fold, result.best_epoch))

    @hookimpl
    def competition_run_end(self, run_dir, cv):
        self.events.append(("run_end", cv["folds_done"]))

    @hookimpl
    def competition_create_model(self, config, num_classes):
        self.events.append(("create_model", num_classes))
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, num_classes),
        )


def test_events_fire_in_order_and_a_user_model_wins(trashnet_small, tmp_path, run_paths):
    recorder = _Recorder()
    pm = get_plugin_manager()
    pm.register(recorder, name="recorder")
    try:
        run_cv(trashnet_config(trashnet_small, tmp_path), folds=[0], **run_paths)
    finally:
        pm.unregister(recorder)
    kinds = [event[0] for event in recorder.events]
    assert kinds == ["configure", "fold_start", "create_model", "epoch_end", "fold_end", "run_end"]
    assert recorder.events[2] == ("create_model", 6)
    assert "val_accuracy" in recorder.events[3][3]
    assert recorder.events[-1] == ("run_end", [0])


class _Space:
    @hookimpl
    def competition_search_space(self, trial, config):
        return {
            "optim.lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
            "loss.name": trial.suggest_categorical("loss", ["cross_entropy", "focal"]),
        }


def test_search_space_suggestions_are_applied_and_validated():
    pm = get_plugin_manager()
    space = _Space()
    pm.register(space, name="space")
    try:
        config = load_config(None, ["tune.params=[]"])  # only this plugin's dimensions
        trial = optuna.trial.FixedTrial({"lr": 0.01, "loss": "focal"})
        tuned = suggest_config(trial, config)
        assert tuned.optim.lr == 0.01 and tuned.loss.name == "focal"
        assert tuned.data == config.data
    finally:
        pm.unregister(space)

    class _Bad:
        @hookimpl
        def competition_search_space(self, trial, config):
            return {"optim.epochs": 2.5}

    bad = _Bad()
    pm.register(bad, name="bad")
    try:
        with pytest.raises(ConfigError, match=r"optim\.epochs: expected an integer"):
            suggest_config(optuna.trial.FixedTrial({}), load_config(None, ["tune.params=[]"]))
    finally:
        pm.unregister(bad)
