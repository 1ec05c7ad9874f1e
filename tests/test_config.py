"""Config: YAML -> typed frozen dataclasses, overrides, rejected keys and types."""

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from competition.config import (
    REPO_ROOT,
    Config,
    TransformSpec,
    build,
    dump_yaml,
    load_config,
    load_yaml,
    plain_name,
    replace,
)
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


# -- YAML 1.2 numbers -----------------------------------------------------------------------------


def test_exponent_without_a_dot_is_a_float(tmp_path):
    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4  # the README's example
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5E-2\n")
    optim = load_config(path).optim
    assert (optim.lr, optim.weight_decay) == (1e-4, 5e-2)
    assert isinstance(optim.lr, float)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3e-4", 3e-4),
        ("-2.5E+3", -2500.0),
        (".5", 0.5),
        ("1.", 1.0),
        ("7", 7),
        ("017", 17),
        ("0o17", 15),
        ("0x1F", 31),
        ("true", True),
        ("null", None),
    ],
)
def test_load_yaml_reads_the_yaml_1_2_core_schema(text, value):
    parsed = load_yaml(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["yes", "off", "1_000", "1:30", "2024-01-01", "0b101"])
def test_yaml_1_1_only_scalars_are_strings(text):
    assert load_yaml(text) == text


def test_ints_stay_ints_and_a_float_is_no_integer():
    assert load_config(None, ["optim.epochs=017"]).optim.epochs == 17  # not octal 15
    with pytest.raises(ConfigError, match=r"optim\.epochs: expected an integer, got 100\.0"):
        load_config(None, ["optim.epochs=1e2"])


def test_a_string_field_given_a_number_is_rejected_unless_quoted():
    # no silent coercion: 3e-4 is a number, so a string field asks for quotes
    with pytest.raises(ConfigError, match=r"name: expected a string, got 0\.0003 \(quote it"):
        load_config(None, ["name=3e-4"])
    assert load_config(None, ["name='3e-4'"]).name == "3e-4"
    assert load_config(None, ["name=2024-01-01"]).name == "2024-01-01"  # no YAML 1.1 date
    classes = load_config(None, ["competition.classes=[yes, no, off]"]).competition.classes
    assert classes == ["yes", "no", "off"]  # no YAML 1.1 booleans


def test_text_that_is_not_yaml_is_taken_as_it_is():
    config = load_config(None, ["competition.image_pattern={id}.jpg"])
    assert config.competition.image_pattern == "{id}.jpg"


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "optim.grad_clip=-.inf"])
def test_non_finite_numbers_are_rejected(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: expected a finite number"):
        load_config(None, [override])


def test_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 0.1\noptim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"(?s)dup\.yaml: not valid YAML.*duplicate key 'optim'"):
        load_config(path)


def test_dump_yaml_reads_back_the_same_with_either_loader():
    overrides = ["name='3e-4'", "competition.classes=[yes, '1_000', '017']", "optim.lr=1e-5"]
    config = load_config(None, overrides)
    text = dump_yaml(config.to_dict())
    assert load_yaml(text) == yaml.safe_load(text) == config.to_dict()
    assert build(Config, load_yaml(text)) == config


def test_replace_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"optim\.lr\.x: 'lr' is not a section"):
        replace(load_config(None), {"optim.lr.x": 1})


# -- plain names ----------------------------------------------------------------------------------

BAD_NAMES = [
    "../../x",
    "/abs/path",
    "a/b",
    "a\\b",
    "..",
    ".",
    "",
    ".hidden",
    "-x",
    "a b",
    "x" * 129,
]


@pytest.mark.parametrize("key", ["name", "competition.name"])
@pytest.mark.parametrize("value", BAD_NAMES)
def test_names_that_are_paths_are_rejected(key, value):
    with pytest.raises(ConfigError) as info:
        replace(load_config(None), {key: value})
    assert str(info.value).startswith(f"{key}={value!r}: names are plain names")


def test_a_traversal_override_names_the_key_the_value_and_a_fix():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["name=../../x"])
    message = str(info.value)
    assert message.startswith("name='../../x': names are plain names (1-128 letters, digits,")
    assert "runs/<name>" in message and message.endswith("choose e.g. name=x")


def test_plain_names_pass():
    config = load_config(None, ["name=exp-2_lr3e4.v1", "competition.name=cub_200.2011"])
    assert (config.name, config.competition.name) == ("exp-2_lr3e4.v1", "cub_200.2011")
    assert plain_name("x" * 128, "--name") == "x" * 128
    with pytest.raises(ConfigError, match=r"--name=None: .* choose e\.g\. --name=x"):
        plain_name(None, "--name")


# -- no network at import -------------------------------------------------------------------------


def test_import_switches_off_the_albumentations_update_check():
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    code = "import os, competition; print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1", out.stderr
