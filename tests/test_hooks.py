"""Each hook as a plugin author meets it: registration, model creation, events, search space."""

import numpy as np
import optuna
import pytest
import timm
import torch

from competition import hookimpl
from competition.config import ModelConfig, load_config
from competition.conformance.metrics import check_metric
from competition.cv import run_cv
from competition.errors import ConfigError, PluginError
from competition.manager import components, get_plugin_manager
from competition.metrics import Metric, get_metric
from competition.tune import suggest_config
from plugins.backbones import Classifier
from plugins.pretrained import WeightsPackage, load_pretrained
from tests.conftest import trashnet_config


@pytest.mark.parametrize(
    ("hook", "example"),
    [
        ("competition_register_backbones", "resnet10t"),
        ("competition_register_losses", "cross_entropy"),
        ("competition_register_sample_transforms", "RandomResizedCrop"),
        ("competition_register_batch_augments", "mixup"),
        ("competition_register_tta", "hflip"),
        ("competition_register_metrics", "qwk"),
        ("competition_register_weights", "efficientnet_lite2_imagenet"),
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


def test_events_fire_in_order_and_a_user_model_wins(kaggle_small, tmp_path, run_paths):
    recorder = _Recorder()
    pm = get_plugin_manager()
    pm.register(recorder, name="recorder")
    try:
        run_cv(trashnet_config(kaggle_small, tmp_path), folds=[0], **run_paths)
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


@pytest.fixture
def registered():
    """Register plugins on the process's manager for one test; unregistered afterwards."""
    pm, names = get_plugin_manager(), []

    def register(plugin, name):
        pm.register(plugin, name=name)
        names.append(name)

    yield register
    for name in names:
        if pm.get_plugin(name) is not None:  # a test may unregister it itself
            pm.unregister(name=name)


def _brier(targets, probs):
    """Multiclass Brier score (Brier 1950): mean squared distance to the one-hot target."""
    return float(((probs - np.eye(probs.shape[1])[targets]) ** 2).sum(axis=1).mean())


def test_hook_competition_register_metrics(registered):
    brier = Metric("my_metric", _brier, higher_is_better=False)

    class MyMetric:
        @hookimpl
        def competition_register_metrics(self):
            return {"my_metric": brier}

    registered(MyMetric(), "my_metric_plugin")
    assert get_metric("my_metric") is brier
    assert components("metrics").provider("my_metric") == "my_metric_plugin"
    assert get_metric("accuracy").name == "accuracy"  # the built-ins are still there
    check_metric(get_metric("my_metric"))  # the shipped conformance check, as a user runs it
    assert get_metric("my_metric")([1], np.array([[0.2, 0.8]])) == pytest.approx(0.08)
    get_plugin_manager().unregister(name="my_metric_plugin")
    with pytest.raises(PluginError, match="unknown metric 'my_metric'"):
        get_metric("my_metric")


def test_hook_competition_register_weights(registered, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=10).state_dict()
    path = tmp_path / "my_weights.pth"
    torch.save(source, path)
    package = WeightsPackage(
        "resnet10t",
        lambda model: torch.load(path, map_location="cpu", weights_only=True),
        "pip install my-weights",
    )

    class MyWeights:
        @hookimpl
        def competition_register_weights(self):
            return {"my_weights": package}

    registered(MyWeights(), "my_weights_plugin")
    torch.manual_seed(1)
    model = load_pretrained(timm.create_model("resnet10t", num_classes=10), "my_weights")
    loaded = model.state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)

    # the config route: model.pretrained=my_weights on a 3-class backbone (the 10-class fc dropped)
    config = ModelConfig(backbone="resnet10t", pretrained="my_weights")
    backbone = Classifier("resnet10t", config, num_classes=3).backbone.state_dict()
    assert all(torch.equal(backbone[k], source[k]) for k in backbone)
    assert len(backbone) == len(source) - 2  # fc.weight, fc.bias

    with pytest.raises(ConfigError, match=r"set model\.backbone=resnet10t"):
        load_pretrained(timm.create_model("test_efficientnet"), "my_weights")
    get_plugin_manager().unregister(name="my_weights_plugin")
    with pytest.raises(ConfigError, match="neither a weights file nor a registered"):
        load_pretrained(timm.create_model("resnet10t"), "my_weights")
