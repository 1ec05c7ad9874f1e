"""Config: YAML -> typed frozen dataclasses, overrides, rejected keys and types."""

import dataclasses

import pytest

from competition.config import REPO_ROOT, Config, TransformSpec, load_config, replace
from competition.errors import ConfigError

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.competition.name


def test_defaults_and_overrides_are_typed():
    config = load_config(None, ["optim.lr=0.01", "optim.epochs=3", "tta=[identity, hflip]"])
    assert config.optim.lr == 0.01 and isinstance(config.optim.lr, float)
    assert config.optim.epochs == 3
    assert config.tta == [TransformSpec("identity"), TransformSpec("hflip")]


def test_integer_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"optim\.epochs: expected an integer"):
        load_config(None, ["optim.epochs=2.5"])


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 3.0


def test_unknown_key_names_path_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "bad.yaml" in message and "optim.learning_rate: unknown key" in message


def test_wrong_type_and_choice_are_rejected():
    with pytest.raises(ConfigError, match=r"data\.image_size: expected an integer, got 'big'"):
        load_config(None, ["data.image_size=big"])
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam' is not one of"):
        load_config(None, ["optim.name=adam"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optim.lr"])


def test_transform_spec_shorthand():
    config = load_config(None, ["augment.batch=[{name: mixup, alpha: 0.2}, cutmix]"])
    assert config.augment.batch == [
        TransformSpec("mixup", {"alpha": 0.2}),
        TransformSpec("cutmix", {}),
    ]


def test_replace_validates():
    config = load_config(None)
    assert replace(config, {"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"optim\.nope"):
        replace(config, {"optim.nope": 1})


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", r"data\.batch_size: 0 must be at least 1"),
        ("data.crop_pct=0", r"data\.crop_pct: 0\.0 must be in \(0, 1\]"),
        ("optim.epochs=0", r"optim\.epochs: 0 must be at least 1"),
        ("folds.k=1", r"folds\.k: 1 must be at least 2"),
    ],
)
def test_values_the_runner_cannot_use_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
