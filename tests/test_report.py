"""The run report: figures written by every verb's finish, `competition report` adding Grad-CAM of
the worst mistakes, frequency groups, calibration, and readable figures for 6 and 50 classes."""

from __future__ import annotations

import io
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from filelock import FileLock
from PIL import Image

from competition.baseline import BaselineOptions, run_baseline
from competition.cli import main
from competition.config import REPO_ROOT, dump_yaml, load_config, load_yaml
from competition.cv import predict_run, run_cv
from competition.errors import ConfigError
from competition.figures import confusion, recall_by_frequency
from competition.gradcam import grad_cam
from competition.report import calibration, frequency_groups, report_run, worst_confusions
from competition.runs import RunLockedError
from tests.conftest import tiny_overrides, trashnet_config

quiet = lambda *a, **k: None  # noqa: E731


def _figures_of(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def trained(kaggle_small, tmp_path_factory):
    """A finished 2-fold training run of ``kaggle_small`` (tiny model, 2 epochs), and its dirs."""
    tmp = tmp_path_factory.mktemp("report")
    paths = {"runs_dir": tmp / "runs", "folds_dir": tmp / "folds", "submissions_dir": tmp / "sub"}
    run_cv(trashnet_config(kaggle_small, tmp, "optim.epochs=2"), log=quiet, **paths)
    return paths["runs_dir"] / "t", paths


# -- numbers ------------------------------------------------------------------------------------


def test_frequency_groups_absolute_split_or_thirds():
    groups, rule = frequency_groups([500, 150, 60, 30, 12, 5])
    assert groups == ["head", "head", "medium", "medium", "tail", "tail"]
    assert "more than 100" in rule and "fewer than 20" in rule
    # every class would be 'medium' with the thresholds: thirds by frequency, most frequent first
    groups, rule = frequency_groups([40, 90, 25, 60, 30, 70])
    assert groups == ["medium", "head", "tail", "medium", "tail", "head"]
    assert rule.startswith("thirds") and "'medium'" in rule and "arbitrary" not in rule
    groups, rule = frequency_groups([8] * 6)
    assert sorted(groups) == ["head", "head", "medium", "medium", "tail", "tail"]
    assert "arbitrary" in rule


def test_calibration_ece_of_known_cases():
    targets = np.zeros(10, dtype=int)
    # confidence 0.8 and 8 of 10 right: calibrated
    probs = np.tile([0.8, 0.2], (10, 1))
    probs[:2] = [0.2, 0.8]
    *_, ece = calibration(probs, targets)
    assert ece == pytest.approx(0.0, abs=1e-12)
    # confidence 1.0 and half right: ECE 0.5
    probs = np.tile([1.0, 0.0], (10, 1))
    probs[:5] = [0.0, 1.0]
    confidence, accuracy, count, edges, ece = calibration(probs, targets)
    assert confidence[-1] == pytest.approx(1.0)
    assert ece == pytest.approx(0.5)
    assert count.sum() == 10 and count[-1] == 10 and accuracy[-1] == pytest.approx(0.5)
    assert len(edges) == len(count) + 1


def test_worst_confusions_most_confident_first_two_per_pair():
    classes = ["a", "b", "c"]
    rows = [  # (id, fold, target, probabilities)
        ("r0", 0, 0, [0.05, 0.9, 0.05]),  # a -> b, p 0.9
        ("r1", 0, 0, [0.1, 0.8, 0.1]),  # a -> b, 0.8
        ("r2", 1, 0, [0.15, 0.7, 0.15]),  # a -> b, 0.7: third of its pair, left out
        ("r3", 1, 2, [0.6, 0.1, 0.3]),  # c -> a, 0.6
        ("r4", 1, 1, [0.0, 0.99, 0.01]),  # right: never shown
    ]
    oof = pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "fold": [r[1] for r in rows],
            "target_index": [r[2] for r in rows],
        }
    )
    oof[classes] = np.array([r[3] for r in rows])
    worst = worst_confusions(oof, classes)
    assert worst["id"].tolist() == ["r0", "r1", "r3"]
    assert worst["predicted"].tolist() == [1, 1, 0]
    assert worst["p_true"].tolist() == pytest.approx([0.05, 0.1, 0.3])
    # two classes have two pairs only: up to 6 mistakes each, so a binary task still shows 12
    binary = pd.DataFrame({"id": [f"b{i}" for i in range(9)], "fold": 0, "target_index": 0})
    binary[["a", "b"]] = np.tile([0.2, 0.8], (9, 1))
    assert len(worst_confusions(binary, ["a", "b"])) == 6


class _RedGreen(torch.nn.Module):
    """Logit 0 is the mean red, logit 1 the mean green: a network whose evidence is known."""

    def __init__(self, pooled_by_attribute: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
        pool = torch.nn.AdaptiveAvgPool2d(1)
        if pooled_by_attribute:
            self.pool = pool
        else:
            self.squeeze = pool
        self.head = torch.nn.Flatten()

    def forward(self, x):
        features = self.conv(x)
        return self.head((self.pool if hasattr(self, "pool") else self.squeeze)(features))


@pytest.mark.parametrize("pooled_by_attribute", [True, False], ids=["pool", "last-conv"])
def test_grad_cam_finds_the_evidence_of_each_class(pooled_by_attribute):
    image = torch.zeros(1, 3, 16, 16)
    image[0, 0, :6, :6] = 1.0  # red square top left
    image[0, 1, 10:, 10:] = 1.0  # green square bottom right
    (red, green), size = grad_cam(
        _RedGreen(pooled_by_attribute), image, [np.array([0]), np.array([1])]
    )
    assert size == (16, 16)
    assert red.shape == green.shape == (1, 16, 16)
    assert red.min() >= 0 and red.max() == pytest.approx(1.0)
    assert red[0, :6, :6].mean() > 0.9 and red[0, 10:, 10:].max() < 0.1
    assert green[0, 10:, 10:].mean() > 0.9 and green[0, :6, :6].max() < 0.1


def test_figures_grow_with_the_classes_and_stay_readable():
    rng = np.random.default_rng(0)
    sizes = {}
    for k in (6, 50):
        classes = [f"a_rather_long_species_name_{i:02d}" for i in range(k)]
        matrix = rng.integers(0, 5, (k, k)) + np.eye(k, dtype=int) * 40
        counts = np.arange(k, 0, -1) * 3
        groups, _ = frequency_groups(counts)
        recall = matrix.diagonal() / matrix.sum(1)
        present = {g: float(recall[[x == g for x in groups]].mean()) for g in set(groups)}
        sizes[k] = (
            _png_size(confusion(matrix, classes)),
            _png_size(recall_by_frequency(classes, recall, counts, groups, present, "t")),
        )
    (conf6, rec6), (conf50, rec50) = sizes[6], sizes[50]
    # 50 classes get a bigger canvas: at least ~20 px per class row, never all squeezed in
    assert conf50[1] > 2 * conf6[1] and conf50[1] / 50 >= 20
    assert rec50[1] > 3 * rec6[1] and rec50[1] / 50 >= 20


# -- through the run record -----------------------------------------------------------------------


def test_train_finishes_with_a_report_and_its_figures(trained):
    run_dir, _ = trained
    report = run_dir / "report.md"
    text = report.read_text()
    for section in (
        "## Score per fold",
        "## Learning curves",
        "## Per-class recall by training frequency",
        "Imbalance ratio (most / least frequent class in the train table): **1.0**",
        "thirds of the classes by training frequency",
        "## Confusion matrix (OOF, normalised by true class)",
        "Expected calibration error",
        "## Worst confusions",
        f"Run `competition report {run_dir}` to add Grad-CAM",
    ):
        assert section in text
    names = _figures_of(report)
    assert set(names) >= {
        "report_folds.png",
        "report_curves.png",
        "report_recall.png",
        "report_confusion.png",
        "report_reliability.png",
    }
    for name in names:
        assert _png_size((run_dir / name).read_bytes())[0] > 200
    # the worst confusions are the OOF's most confident mistakes, listed with their true label
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
    classes = [c for c in oof.columns if c not in ("id", "fold", "target", "target_index")]
    worst = worst_confusions(oof, classes)
    if len(worst):
        first = worst.iloc[0]
        assert f"| {first['id']} | {first['fold']} | {classes[first['target_index']]} |" in text
        assert "report_worst.png" in names
    assert "report_gradcam.png" not in names and not (run_dir / "report_gradcam.png").exists()


def test_report_verb_adds_grad_cam_and_changes_no_run_file(trained, capsys):
    run_dir, _ = trained
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    started = time.perf_counter()
    assert main(["report", str(run_dir)]) == 0
    seconds = time.perf_counter() - started
    assert "report_gradcam.png" in capsys.readouterr().out
    text = (run_dir / "report.md").read_text()
    assert "## Grad-CAM of the worst confusions" in text and "](report_gradcam.png)" in text
    assert _png_size((run_dir / "report_gradcam.png").read_bytes())[0] > 400
    assert "**Coarse maps**: the model's last feature map is 1×1" in text  # 32 px, resnet10t
    after = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changed = {n for n in before if before[n] != after.get(n)}
    assert changed <= {n for n in before if n.startswith("report")}, changed
    for name in ("cv.json", "oof.csv", "config.yaml"):
        assert before[name] == after[name]
    assert seconds < 120
    # --no-gradcam drops the figure again: no stale report_*.png outlives its report
    assert main(["report", str(run_dir), "--no-gradcam"]) == 0
    assert not (run_dir / "report_gradcam.png").exists()


def test_report_refuses_a_locked_or_unfinished_run(trained, tmp_path):
    run_dir, _ = trained
    lock = FileLock(run_dir / ".lock", timeout=0)
    with lock, pytest.raises(RunLockedError, match="in use by process"):
        report_run(run_dir, gradcam=False, log=quiet)
    unfinished = tmp_path / "u"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"not finished \(no cv.json\)"):
        report_run(unfinished, log=quiet)


def test_predicted_run_explains_with_its_weights_runs_models(trained):
    run_dir, paths = trained
    predict_run(run_dir, {"tta": ["identity"]}, name="p", log=quiet, **paths)
    predicted = paths["runs_dir"] / "p"
    text = (predicted / "report.md").read_text()
    assert "(of t, whose weights it uses)" in text  # learning curves of the weights' run
    report_run(predicted, log=quiet)
    assert (predicted / "report_gradcam.png").is_file()


def test_baseline_with_a_holdout_reports_cv_vs_lb_and_has_no_grad_cam(
    folders_small, tmp_path, run_paths
):
    config = load_config(
        REPO_ROOT / "configs" / "hymenoptera.yaml",
        [f"competition.root={folders_small}", "folds.k=2", "name=h", *tiny_overrides(tmp_path)],
    )
    cv = run_baseline(config, BaselineOptions(method="ncm"), log=quiet, **run_paths)
    run_dir = run_paths["runs_dir"] / "h-ncm"
    text = (run_dir / "report.md").read_text()
    assert "## CV vs LB (labelled holdout)" in text
    assert f"| fold-mean prediction | | **{cv['lb']:.4f}** |" in text
    assert "report_cv_lb.png" in _figures_of(run_dir / "report.md")
    assert "No learning curves: a baseline run trains no network." in text
    report_run(run_dir, log=quiet)
    text = (run_dir / "report.md").read_text()
    if "## Grad-CAM" in text:  # only when the baseline made a mistake to show
        assert "this baseline run has no fold weights" in text
    assert not (run_dir / "report_gradcam.png").exists()


def test_report_of_a_run_whose_data_moved_goes_on_without_images(trained, tmp_path):
    run_dir, _ = trained
    moved = tmp_path / "runs" / "t"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns(".lock*"))
    config = load_yaml((moved / "config.yaml").read_text())
    config["competition"]["root"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(dump_yaml(config))
    messages = []
    report_run(moved, log=messages.append)
    assert "gone" in messages[0] and "without images" in messages[0]
    text = (moved / "report.md").read_text()
    assert "No thumbnails: the competition's data could not be read." in text
    assert "class in the OOF rows" in text
    assert not (moved / "report_worst.png").exists()


def test_report_verb_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: competition report" in out and "--no-gradcam" in out
