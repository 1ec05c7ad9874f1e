"""The command line: every verb has --help, errors are one clear line, plugins are listed."""

import pytest

from competition.cli import build_parser, main
from competition.config import REPO_ROOT, load_config
from competition.data import read_competition
from competition.demo import DEMO_CONFIG, build_digits_competition

VERBS = ["demo", "folds", "train", "predict", "baseline", "tune", "ensemble", "plugins"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    assert "usage: competition " + verb in capsys.readouterr().out


def test_parser_knows_every_verb():
    actions = [a for a in build_parser()._actions if a.dest == "command"]
    assert set(VERBS) <= set(actions[0].choices)


def test_a_bad_config_is_one_clear_line_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.lr: expected a number" in err
    assert "Traceback" not in err


def test_bad_override_on_the_command_line(capsys):
    config = str(REPO_ROOT / "configs" / "trashnet.yaml")
    assert main(["train", config, "optim.name=adam"]) == 2
    assert "optim.name: 'adam' is not one of" in capsys.readouterr().err


def test_plugins_lists_components_and_providers(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind in ("backbones", "losses", "sample_transforms", "batch_augments", "tta"):
        assert f"\n{kind} (" in out
    assert "cross_entropy" in out and "plugins.losses" in out
    assert "--all" in out  # timm's zoo is cut short unless asked


def test_demo_competition_is_a_valid_kaggle_layout(tmp_path):
    root = build_digits_competition(tmp_path / "digits")
    config = load_config(DEMO_CONFIG, [f"competition.root={root}"])
    competition = read_competition(config)
    assert competition.classes == [f"digit_{d}" for d in range(10)]
    assert len(competition.train) + len(competition.test) == 1797
    assert len(competition.holdout) == len(competition.test)  # solution.csv scores the "LB"
    assert set(competition.sample_submission.columns) == {"id", "label"}


def test_overrides_may_follow_options():
    from competition.cli import parse

    args = parse(["train", "configs/x.yaml", "--folds", "0,2", "optim.lr=0.1", "name=a"])
    assert args.folds == [0, 2] and args.overrides == ["optim.lr=0.1", "name=a"]
    args = parse(["baseline", "configs/x.yaml", "--method", "knn", "data.image_size=64"])
    assert args.method == "knn" and args.overrides == ["data.image_size=64"]
    with pytest.raises(SystemExit):
        parse(["plugins", "optim.lr=0.1"])
