"""Decoupled classifiers (Kang et al. 2020) on a finished training run's fold models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from competition.cli import parse
from competition.cv import predict_run, run_cv
from competition.decouple import DecoupleOptions, decouple_run, tau_norm_logits
from competition.errors import ConfigError
from competition.runs import RunRecord
from tests.conftest import trashnet_config


@pytest.fixture(scope="module")
def trained(kaggle_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decouple")
    paths = {
        "runs_dir": tmp / "runs",
        "folds_dir": tmp / "folds",
        "submissions_dir": tmp / "submissions",
    }
    config = trashnet_config(kaggle_small, tmp, "metric=balanced_accuracy")
    run_cv(config, log=lambda *_: None, **paths)
    return paths


def test_tau_norm_hand_worked():
    # w_0 = (3, 4) (norm 5), w_1 = (0, 1) (norm 1); x = (1, 1): raw logits (7, 1)
    weight, x = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.allclose(tau_norm_logits(x, weight, 0.0), torch.tensor([[7.0, 1.0]]))
    assert torch.allclose(tau_norm_logits(x, weight, 1.0), torch.tensor([[7 / 5, 1.0]]))
    assert torch.allclose(tau_norm_logits(x, weight, 0.5), torch.tensor([[7 / 5**0.5, 1.0]]))


@pytest.mark.parametrize("method", ["crt", "lws", "ncm"])
def test_each_method_writes_a_run(trained, method):
    cv = decouple_run(
        trained["runs_dir"] / "t", DecoupleOptions(method, epochs=5), log=print, **trained
    )
    new = RunRecord.open(trained["runs_dir"] / f"t-{method}")
    assert cv["complete"] and new.produced_by["verb"] == "decouple"
    assert new.oof().shape[0] == 48 and np.isfinite(cv["oof"])
    assert (trained["submissions_dir"] / f"t-{method}.csv").is_file()
    if method == "lws":
        assert len(new.fold_result(0)["info"]["scales"]) == 6


def test_tau_norm_picks_tau_without_the_scored_rows(trained):
    source = trained["runs_dir"] / "t"
    for select in ("inner", "folds"):
        decouple_run(
            source, DecoupleOptions("tau_norm", select=select), log=lambda *_: None, **trained
        )
        new = RunRecord.open(trained["runs_dir"] / f"t-tau_norm-{select}")
        info = new.fold_result(0)["info"]
        assert info["select"] == select and 0.0 <= info["tau"] <= 2.0
    # the OOF rows are softmax(x . w_j / ||w_j||^tau) of the fold model's own features
    state = torch.load(source / "fold_0" / "best.pt", weights_only=True)["model"]
    weight = state["head.weight"]
    run = RunRecord.open(trained["runs_dir"] / "t-tau_norm-folds")
    tau = run.fold_result(0)["info"]["tau"]
    from competition.decouple import DecoupleFold
    from competition.workspace import Workspace

    ws = Workspace(run.config, trained["folds_dir"], log=lambda *_: None)
    features = DecoupleFold(
        ws, RunRecord.open(source), DecoupleOptions("tau_norm"), print
    ).features(0)
    rows = np.flatnonzero(ws.fold_of == 0)
    want = F.softmax(
        tau_norm_logits(torch.as_tensor(features["train"][rows]), weight, tau).double(), 1
    )
    assert np.allclose(run.fold_oof(0)[run.classes()].to_numpy(), want.numpy(), atol=1e-6)


def test_refusals(trained):
    with pytest.raises(ConfigError, match="--method"):
        DecoupleOptions("crtt")
    decouple_run(
        trained["runs_dir"] / "t", DecoupleOptions("ncm"), name="n2", log=lambda *_: None, **trained
    )
    with pytest.raises(ConfigError, match="training run"):
        decouple_run(trained["runs_dir"] / "n2", DecoupleOptions("crt"), **trained)
    with pytest.raises(ConfigError, match="no fold weights"):
        predict_run(trained["runs_dir"] / "n2", {"tta": ["identity"]}, **trained)


def test_cli_parses_decouple():
    args = parse(
        ["decouple", "runs/x", "--method", "tau_norm", "--select", "folds", "--folds", "0"]
    )
    assert (args.method, args.select, args.folds) == ("tau_norm", "folds", [0])
