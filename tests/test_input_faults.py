"""Silent or surprising input made loud: unreadable images refused up front (all of them listed),
a class too small for the folds named, a failed run starting over on a fixed table, the data audit
verb's exit status, and frozen-feature baselines that never mix two random backbones."""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pandas as pd
import pytest
import torch

from competition import hookimpl
from competition.baseline import BaselineOptions, EmbeddingStore, embedding_key, run_baseline
from competition.cli import main
from competition.config import REPO_ROOT
from competition.cv import run_cv
from competition.errors import DataError
from competition.manager import get_plugin_manager
from competition.runs import RUNS_DIR
from competition.workspace import Workspace
from tests.conftest import trashnet_config

quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture
def broken_copy(kaggle_small, tmp_path):
    """``kaggle_small`` with three train rows whose files are not images (``.mat`` files)."""
    root = tmp_path / "broken"
    shutil.copytree(kaggle_small, root)
    train = pd.read_csv(root / "train.csv", dtype=str)
    bad = train["image_id"].iloc[[1, 5, 9]].tolist()
    for image_id in bad:
        mat = f"MATLAB 5.0 MAT-file {image_id}, not an image".encode() * 9
        (root / "train" / f"{image_id}.jpg").write_bytes(mat)
    return root, bad


def test_train_refuses_every_unreadable_image_before_any_work(broken_copy, tmp_path, run_paths):
    root, bad = broken_copy
    with pytest.raises(DataError) as error:
        run_cv(trashnet_config(root, tmp_path), **run_paths)
    message = str(error.value)
    assert "3 unreadable image(s)" in message
    assert all(image_id in message for image_id in bad)  # all listed, not the first only
    assert "row 3" in message  # the CSV row of the second data line
    assert not (run_paths["runs_dir"] / "t").exists()  # refused before the run started


def test_folds_verb_refuses_unreadable_images_too(broken_copy, capsys):
    root, bad = broken_copy
    code = main(["folds", str(REPO_ROOT / "configs/trashnet.yaml"), f"competition.root={root}"])
    assert code == 2
    err = capsys.readouterr().err
    assert all(image_id in err for image_id in bad)


class _FailingFold:
    """A plugin that stops the first fold as it starts, after the run recorded its folds."""

    @hookimpl
    def competition_fold_start(self, fold, run_dir, config):
        raise RuntimeError("stopped before the fold finished")


def test_a_run_with_no_finished_fold_starts_over_on_a_changed_table(
    kaggle_small, tmp_path, run_paths
):
    root = tmp_path / "comp"
    shutil.copytree(kaggle_small, root)
    pm = get_plugin_manager()
    failing = _FailingFold()
    pm.register(failing, name="failing_fold")
    try:
        with pytest.raises(RuntimeError, match="stopped before"):
            run_cv(trashnet_config(root, tmp_path), **run_paths)
    finally:
        pm.unregister(failing)
    assert (run_paths["runs_dir"] / "t" / "folds.csv").is_file()
    train = pd.read_csv(root / "train.csv", dtype=str)
    train.iloc[1:].to_csv(root / "train.csv", index=False)  # the user fixes the table
    said = []
    cv = run_cv(trashnet_config(root, tmp_path), folds=[0], log=said.append, **run_paths)
    assert cv["folds_done"] == [0]
    assert any("no fold finished yet; the run starts over" in s for s in said)
    snapshot = pd.read_csv(run_paths["runs_dir"] / "t" / "folds.csv", dtype=str)
    assert len(snapshot) == len(train) - 1


def test_a_class_too_small_for_the_folds_is_named(kaggle_small, tmp_path, run_paths):
    root = tmp_path / "small_class"
    shutil.copytree(kaggle_small, root)
    train = pd.read_csv(root / "train.csv", dtype=str)
    keep = train[train["label"] != "digit_3"]
    one = train[train["label"] == "digit_3"].head(1)
    pd.concat([keep, one]).to_csv(root / "train.csv", index=False)
    config = trashnet_config(root, tmp_path, "folds.k=3")
    with pytest.raises(DataError, match=r"'digit_3' \(1\)"):
        run_cv(config, **run_paths)


def test_check_verb_writes_its_table_and_fails_on_errors(broken_copy, kaggle_small, capsys):
    config = str(REPO_ROOT / "configs/trashnet.yaml")
    name = f"pytest-audit-{uuid.uuid4().hex[:8]}"
    out = RUNS_DIR / f"check-{name}"
    try:
        root, bad = broken_copy
        code = main(["check", config, f"competition.root={root}", f"competition.name={name}"])
        printed = capsys.readouterr().out
        assert code == 1 and "3 error(s)" in printed
        findings = pd.read_csv(out / "findings.csv")
        assert sorted(findings.loc[findings["severity"] == "error", "file"]) == sorted(
            f"train/{image_id}.jpg" for image_id in bad
        )
        assert (out / "report.md").is_file() and (out / "summary.json").is_file()

        clean = main(
            ["check", config, f"competition.root={kaggle_small}", f"competition.name={name}"]
        )
        assert clean == 0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_baseline_without_pretrained_weights_embeds_with_one_seeded_backbone(
    kaggle_small, tmp_path, run_paths
):
    config = trashnet_config(kaggle_small, tmp_path)  # model.pretrained=null
    workspace = Workspace(config, run_paths["folds_dir"], quiet)
    torch.manual_seed(123)
    first = EmbeddingStore(workspace, quiet)._model()
    torch.manual_seed(456)  # whatever the global RNG did before, the backbone is the same
    second = EmbeddingStore(workspace, quiet)._model()
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the cache key says which weights embedded: another seed is another cache
    other = Workspace(trashnet_config(kaggle_small, tmp_path, "seed=1"), run_paths["folds_dir"])
    assert embedding_key(workspace, "train", "identity") != embedding_key(
        other, "train", "identity"
    )

    # a resumed baseline reads train and test embeddings made by the same model
    cv = run_baseline(config, BaselineOptions("ncm"), log=quiet, **run_paths)
    again = run_baseline(config, BaselineOptions("ncm", temperature=0.1), log=quiet, **run_paths)
    assert again["embeddings"]["computed"] == [] and cv["embeddings"]["computed"]


def test_weights_files_key_the_cache_by_content(kaggle_small, tmp_path, run_paths):
    weights = tmp_path / "weights.pt"
    workspace = Workspace(trashnet_config(kaggle_small, tmp_path), run_paths["folds_dir"], quiet)
    torch.save(workspace.create_model().state_dict(), weights)
    config = trashnet_config(kaggle_small, tmp_path, f"model.pretrained={weights}")
    before = embedding_key(Workspace(config, run_paths["folds_dir"], quiet), "train", "identity")
    state = torch.load(weights, weights_only=True)
    key = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[key] = state[key] + 1
    torch.save(state, weights)
    after = embedding_key(Workspace(config, run_paths["folds_dir"], quiet), "train", "identity")
    assert before != after
    assert np.isfinite(float(state[key].sum()))
