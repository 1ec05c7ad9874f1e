"""The built-in search space for Optuna studies: the recipe knobs that matter most when fine-tuning.

Only the dimensions named in ``tune.params`` are opened. Ranges are centred on the config's own
values, so a study refines a sensible recipe instead of searching blindly (Akiba et al. 2019,
"Optuna: A Next-generation Hyperparameter Optimization Framework").
"""

from __future__ import annotations

from competition import hookimpl
from competition.errors import ConfigError


def _suggest(trial, config) -> dict:
    optim = config.optim
    return {
        "optim.lr": lambda: trial.suggest_float("optim.lr", optim.lr / 10, optim.lr * 10, log=True),
        "optim.weight_decay": lambda: trial.suggest_float(
            "optim.weight_decay", 1e-5, max(0.1, optim.weight_decay * 3), log=True
        ),
        "loss.params.label_smoothing": lambda: trial.suggest_float(
            "loss.params.label_smoothing", 0.0, 0.2
        ),
        "model.drop_rate": lambda: trial.suggest_float("model.drop_rate", 0.0, 0.5),
        "model.backbone_lr_factor": lambda: trial.suggest_float(
            "model.backbone_lr_factor", 0.01, 1.0, log=True
        ),
        "optim.warmup_epochs": lambda: trial.suggest_float("optim.warmup_epochs", 0.0, 3.0),
    }


@hookimpl
def competition_search_space(trial, config):
    space = _suggest(trial, config)
    unknown = [name for name in config.tune.params if name not in space]
    if unknown:
        raise ConfigError(
            f"tune.params: unknown built-in dimension(s) {unknown}; built-in: {', '.join(space)}. "
            "Add your own through a competition_search_space plugin."
        )
    return {name: space[name]() for name in config.tune.params}
