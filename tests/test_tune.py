"""Optuna studies: the YAML space, storages, pruning steps, resume, best overlay, report."""

import optuna
import pytest
import yaml
from PIL import Image

from competition.config import load_config, replace
from competition.errors import ConfigError, PluginError
from competition.space import apply_space, check_space, parse_space
from competition.tune import report, study_place, suggest_config, trial_config, tune
from tests.conftest import trashnet_config

SPACE = {
    "optim.lr": {"float": [1.0e-4, 1.0e-2], "log": True},
    "optim.epochs": {"int": [2, 6], "step": 2},
    "model.backbone": {"categorical": ["resnet10t", "test_resnet.r160_in1k"]},
    "loss": {
        "categorical": [
            {"name": "cross_entropy", "params": {"label_smoothing": 0.1}},
            {"name": "focal", "params": {"gamma": 2.0}},
        ]
    },
    "loss.params.gamma": {"float": [1.0, 4.0], "when": {"loss.name": "focal"}},
    "augment.batch": {"categorical": [[], [{"name": "mixup", "alpha": 0.2}]]},
    "augment.batch.mixup.alpha": {"float": [0.1, 1.0]},
}


def test_builtin_space_opens_only_the_named_dimensions():
    config = load_config(None, ["tune.params=[optim.lr, loss.params.label_smoothing]"])
    trial = optuna.trial.FixedTrial({"optim.lr": 0.002, "loss.params.label_smoothing": 0.05})
    tuned = suggest_config(trial, config)
    assert tuned.optim.lr == 0.002 and tuned.loss.params["label_smoothing"] == 0.05
    assert tuned.optim.weight_decay == config.optim.weight_decay
    with pytest.raises(ConfigError, match=r"tune\.params: unknown built-in dimension"):
        suggest_config(trial, load_config(None, ["tune.params=[optim.momentum_x]"]))


def test_yaml_space_is_conditional_and_records_sections_as_yaml_text():
    config = replace(load_config(None), {"tune.params": [], "tune.space": SPACE})
    dims = parse_space(config.tune.space)
    check_space(config, dims)
    focal = optuna.trial.FixedTrial(
        {
            "optim.lr": 0.001,
            "optim.epochs": 4,
            "model.backbone": "resnet10t",
            "loss": "{name: focal, params: {gamma: 2.0}}",
            "loss.params.gamma": 3.0,
            "augment.batch": "[{name: mixup, alpha: 0.2}]",
            "augment.batch.mixup.alpha": 0.5,
        }
    )
    tuned = apply_space(focal, config, dims)
    assert (tuned.optim.lr, tuned.optim.epochs, tuned.loss.name) == (0.001, 4, "focal")
    assert tuned.loss.params == {"gamma": 3.0}
    assert [(s.name, s.params) for s in tuned.augment.batch] == [("mixup", {"alpha": 0.5})]
    # a real study: inactive dimensions (gamma without focal, alpha without mixup) are not drawn
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        tuned = suggest_config(trial, config)
        assert ("loss.params.gamma" in trial.params) == (tuned.loss.name == "focal")
        mixup = [s for s in tuned.augment.batch if s.name == "mixup"]
        assert ("augment.batch.mixup.alpha" in trial.params) == bool(mixup)
        seen.add((tuned.loss.name, bool(mixup)))
        study.tell(trial, 0.5)
    assert len(seen) == 4


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.lrr": {"float": [0.1, 1.0]}}, r"tune\.space\.optim\.lrr: .*Did you mean lr"),
        ({"optim.lr": {"float": [1.0, 0.1]}}, r"tune\.space\.optim\.lr\.float: .*low <= high"),
        ({"optim.lr": {"float": [0.0, 1.0], "log": True}}, r"low > 0"),
        ({"optim.lr": {"floats": [0.1, 1.0]}}, r"tune\.space\.optim\.lr: unknown parameter"),
        ({"data.image_size": {"int": [4, 64]}}, r"tune\.space\.data\.image_size: .*at least 8"),
        ({"optim.lr": [0.1, 1.0]}, r"tune\.space\.optim\.lr: expected a mapping"),
        ({"loss.params.gamma": {"float": [1, 2], "when": {"loss.nam": "focal"}}}, r"loss\.nam"),
    ],
)
def test_bad_yaml_space_is_refused_naming_the_key(space, message):
    config = replace(load_config(None), {"tune.space": space})
    with pytest.raises(ConfigError, match=message):
        check_space(config, parse_space(config.tune.space))


def test_unknown_component_in_a_space_key_names_the_closest():
    config = replace(
        load_config(None), {"tune.space": {"augment.batch.mixpu.alpha": {"float": [0.1, 1]}}}
    )
    with pytest.raises(PluginError, match=r"tune\.space\.augment\.batch\.mixpu\.alpha.*mixup"):
        check_space(config, parse_space(config.tune.space))


def test_storage_forms(tmp_path):
    config = load_config(None, ["name=s"])
    default = study_place(config, tmp_path)
    assert default.kind == "journal" and default.target == str(tmp_path / "s-study.journal")
    place = study_place(replace(config, {"tune.storage": str(tmp_path / "x.db")}), tmp_path)
    assert (place.kind, place.target) == ("sqlite", f"sqlite:///{tmp_path / 'x.db'}")
    journal = replace(config, {"tune.storage": "j.journal", "tune.study": "other"})
    assert study_place(journal, tmp_path).kind == "journal"
    assert study_place(journal, tmp_path).name == "other"
    with pytest.raises(ConfigError, match=r"tune\.storage='x\.txt': not a storage.*journal"):
        study_place(replace(config, {"tune.storage": "x.txt"}), tmp_path)
    with pytest.raises(ConfigError, match=r"tune\.study="):
        study_place(replace(config, {"tune.study": "../x"}), tmp_path)
    postgres = replace(config, {"tune.storage": "postgresql://u@h/db"})
    try:
        import psycopg  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install -e '\.\[postgres\]'"):
            study_place(postgres, tmp_path)
    else:  # the extra's driver is chosen for a plain postgresql:// URL
        assert study_place(postgres, tmp_path).target == "postgresql+psycopg://u@h/db"
    with pytest.raises(ConfigError, match=r"SQLite locks up.*journal"):
        tune(replace(config, {"tune.storage": "x.db", "tune.workers": 2}), runs_dir=tmp_path)


def test_trial_folder_depends_on_the_recipe_not_on_tune_settings():
    config = load_config(None, ["tune.params=[optim.lr]", "name=s"])
    trial = optuna.trial.FixedTrial({"optim.lr": 0.002})
    a = trial_config(trial, config)
    b = trial_config(trial, replace(config, {"tune.trials": 99, "tune.pruner": "hyperband"}))
    assert a.name == b.name and a.name.startswith("s-") and a.to_dict() == b.to_dict()
    assert a.tune == load_config(None).tune  # the trial's saved config holds no tune.* of its study
    other = trial_config(optuna.trial.FixedTrial({"optim.lr": 0.003}), config)
    assert other.name != a.name
    assert trial_config(trial, replace(config, {"optim.epochs": 3})).name != a.name


def test_study_prunes_per_epoch_resumes_writes_best_and_report(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(
        kaggle_small, tmp_path, "tune.params=[optim.lr]", "name=study", "optim.epochs=2"
    )
    runs_dir = run_paths.pop("runs_dir")
    study = tune(config, trials=1, runs_dir=runs_dir, **run_paths)
    assert len(study.trials) == 1
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    # one step per epoch across both folds; the last step of each fold is its OOF score
    assert sorted(first.intermediate_values) == [1, 2, 3, 4]  # epochs trained so far
    assert first.intermediate_values[4] == pytest.approx(first.value)
    assert (runs_dir / "study-study.journal").is_file()

    resumed = tune(config, trials=2, runs_dir=runs_dir, **run_paths)  # one more, not two
    assert len(resumed.trials) == 2 and resumed.trials[0].params == first.params
    assert resumed.trials[1].params != first.params  # a resumed sampler does not replay trials
    best = yaml.safe_load((runs_dir / "study-best.yaml").read_text())
    assert best["optim"]["lr"] == pytest.approx(resumed.best_params["optim.lr"])
    assert best["name"] == resumed.best_trial.user_attrs["run_dir"].split("/")[-1]
    overlay = yaml.safe_load((runs_dir / "study-best.overrides.yaml").read_text())
    assert overlay == {"optim": {"lr": pytest.approx(resumed.best_params["optim.lr"])}}
    # each trial's run folder holds a normal CV run
    assert all(
        (runs_dir / t.user_attrs["run_dir"].split("/")[-1] / "cv.json").is_file()
        for t in resumed.trials
    )

    out = report(config, runs_dir=runs_dir, log=lambda *a: None)
    for name in ("history.png", "importance.png", "parallel.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600
    assert len((out / "trials.csv").read_text().splitlines()) == 3
