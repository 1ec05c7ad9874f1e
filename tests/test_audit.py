"""The data audit on a Kaggle-layout competition made here, with every problem planted once."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image
from sklearn.datasets import load_digits

from competition import audit as audit_module
from competition.audit import Audit, audit, raise_if_unreadable, unreadable_images
from competition.config import REPO_ROOT, load_config
from competition.data import read_competition
from competition.errors import DataError
from tests.conftest import TRASHNET

DIGIT_CLASSES = {"zero": (0, 24), "one": (1, 20), "two": (2, 16), "three": (3, 1)}


def _digit(image: np.ndarray) -> Image.Image:
    """An 8x8 scikit-learn digit (0..16) as a 32 px grey image."""
    return Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """Digits (PNG) and photos (JPEG) with one of each problem the audit looks for.

    Ids carry the file name (``image_pattern: "{id}"``), so a ``.mat`` file can be listed.
    """
    root = tmp_path_factory.mktemp("planted")
    (root / "train").mkdir()
    (root / "test").mkdir()
    digits = load_digits()
    files: dict[str, tuple[str, bytes]] = {}  # train id -> (label, bytes)

    def by_class(digit: int) -> np.ndarray:
        return np.flatnonzero(digits.target == digit)

    for label, (digit, count) in DIGIT_CLASSES.items():
        for k, index in enumerate(by_class(digit)[:count]):
            files[f"{label}_{k:02d}.png"] = (label, _png(_digit(digits.images[index])))
    coffee, astronaut, chelsea = (
        skimage.data.coffee(),
        skimage.data.astronaut(),
        skimage.data.chelsea(),
    )
    smaller = np.asarray(Image.fromarray(astronaut).resize((461, 461), Image.BICUBIC))
    cat = _jpeg(chelsea)
    rocket = _jpeg(skimage.data.rocket())
    files.update(
        {
            "zero_dup.png": ("zero", files["zero_00.png"][1]),  # exact duplicate, same label
            "coffee_q95.jpg": ("zero", _jpeg(coffee, 95)),  # near duplicate: re-encoded
            "coffee_q60.jpg": ("zero", _jpeg(coffee, 60)),
            "astronaut.jpg": ("one", _jpeg(astronaut)),  # near duplicate: resized by 10%
            "astronaut_small.jpg": ("one", _jpeg(smaller)),
            "cat_a.jpg": ("one", cat),  # byte-identical, conflicting labels
            "cat_b.jpg": ("two", cat),
            "rgba.png": ("one", _png(_digit(digits.images[by_class(1)[30]]).convert("RGBA"))),
            "two_png.jpg": ("two", _png(_digit(digits.images[by_class(2)[30]]))),  # PNG as .jpg
            "truncated.jpg": ("two", rocket[: len(rocket) // 2]),
            "garbage.mat": ("two", b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + bytes(range(256))),
        }
    )
    for name, (_, data) in files.items():
        (root / "train" / name).write_bytes(data)
    pd.DataFrame({"id": list(files), "label": [label for label, _ in files.values()]}).to_csv(
        root / "train.csv", index=False
    )

    test = {
        f"test_{digit}_{k}.png": _png(_digit(digits.images[index]))
        for digit in range(3)
        for k, index in enumerate(by_class(digit)[40:43])
    }
    test["leak.png"] = files["one_03.png"][1]  # the same bytes as a training image
    test["cat_q70.jpg"] = _jpeg(chelsea, 70)  # a near copy of a training image
    for name, data in test.items():
        (root / "test" / name).write_bytes(data)
    pd.DataFrame({"id": list(test), "label": "zero"}).to_csv(
        root / "sample_submission.csv", index=False
    )
    return root


def planted_config(root: Path, *extra: str):
    return load_config(
        None, [f"competition.root={root}", "competition.image_pattern='{id}'", *extra]
    )


EXPECTED = {
    ("error", "unreadable", "train", frozenset({"train/garbage.mat"})),
    ("error", "truncated", "train", frozenset({"train/truncated.jpg"})),
    ("error", "format_mismatch", "train", frozenset({"train/two_png.jpg"})),
    ("error", "conflicting_labels", "train", frozenset({"train/cat_a.jpg", "train/cat_b.jpg"})),
    ("warning", "duplicate", "train", frozenset({"train/zero_00.png", "train/zero_dup.png"})),
    (
        "warning",
        "near_duplicate",
        "train",
        frozenset({"train/coffee_q95.jpg", "train/coffee_q60.jpg"}),
    ),
    (
        "warning",
        "near_duplicate",
        "train",
        frozenset({"train/astronaut.jpg", "train/astronaut_small.jpg"}),
    ),
    (
        "warning",
        "train_test_duplicate",
        "train/test",
        frozenset({"train/one_03.png", "test/leak.png"}),
    ),
    ("warning", "near_duplicate", "train/test", frozenset({"train/cat_a.jpg", "test/cat_q70.jpg"})),
    ("warning", "imbalance", "train", frozenset()),
    ("warning", "odd_mode", "train", frozenset({"train/rgba.png"})),
}


@pytest.fixture(scope="module")
def planted_audit(planted) -> tuple[Audit, list[str]]:
    messages: list[str] = []
    # two workers: the fixture's 80-odd images go through the process pool
    return audit(planted_config(planted), log=messages.append, workers=2), messages


def test_audit_finds_every_planted_problem_and_nothing_else(planted_audit):
    result, _ = planted_audit
    found = {
        (
            row.severity,
            row.kind,
            row.split,
            frozenset(f for f in (row.file, row.other_file) if f),
        )
        for row in result.findings.itertuples()
    }
    assert found == EXPECTED
    assert len(result.findings) == len(EXPECTED)
    assert result.errors == 4
    assert result.warnings == 7
    assert list(result.findings.columns) == [
        "severity",
        "kind",
        "split",
        "file",
        "other_file",
        "detail",
    ]
    assert list(result.findings["severity"]) == ["error"] * 4 + ["warning"] * 7


def test_findings_name_rows_ids_and_labels(planted_audit):
    result, _ = planted_audit
    detail = dict(zip(result.findings["kind"], result.findings["detail"], strict=False))
    assert "id 'garbage.mat'" in detail["unreadable"]
    assert "b'MATLAB 5.0 MAT-f'" in detail["unreadable"]
    assert "truncated" in detail["truncated"]
    assert "content is PNG" in detail["format_mismatch"]
    assert "extension .jpg" in detail["format_mismatch"]
    assert "'one' vs 'two'" in detail["conflicting_labels"]
    assert "train.csv row" in detail["conflicting_labels"]
    assert "sample_submission.csv row" in detail["train_test_duplicate"]
    assert "ratio 27.0 > 10" in detail["imbalance"]
    assert "mode RGBA" in detail["odd_mode"]


def test_summary_counts_classes_sizes_and_modes(planted_audit, planted):
    result, messages = planted_audit
    summary = result.summary
    train = pd.read_csv(planted / "train.csv")
    assert summary["classes"] == train["label"].value_counts().sort_index().to_dict()
    assert summary["classes"]["zero"] == 24 + 3  # 24 digits, the duplicate, two coffee copies
    assert summary["imbalance_ratio"] == pytest.approx(27 / 1)
    assert summary["images"] == {"train": len(train), "test": 11}
    # every readable file once (truncated.jpg has a header: it counts; garbage.mat does not)
    readable = len(train) + 11 - 1
    assert sum(summary["modes"].values()) == readable
    assert summary["modes"]["L"] > summary["modes"]["RGB"] >= 8
    assert summary["modes"]["RGBA"] == 1
    assert summary["formats"]["PNG"] == sum(summary["modes"][m] for m in ("L", "RGBA"))
    assert summary["sizes"]["most_common"]["32x32"] >= 70
    assert summary["sizes"]["width"]["max"] == 640  # the rocket, truncated but with a header
    assert summary["kinds"]["near_duplicate"] == 3
    assert summary["errors"] == 4
    assert summary["warnings"] == 7
    assert any(m.startswith("audited") for m in messages)
    assert messages[-1].startswith("audit of competition: 4 error(s), 7 warning(s)")


def test_markdown_report(planted_audit):
    result, _ = planted_audit
    text = result.to_markdown()
    assert "| zero | 27 |" in text
    assert "| three | 1 |" in text
    assert "Imbalance ratio (largest / smallest class): 27.00" in text
    assert "| 32x32 |" in text
    assert "| RGBA | 1 |" in text
    assert "| error | conflicting_labels | 1 |" in text
    assert "train/garbage.mat" in text
    assert "4 error(s), 7 warning(s)" in text
    assert "more finding(s) not shown" in result.to_markdown(max_rows=3)


def test_unreadable_images_lists_all_three_bad_files(planted):
    competition = read_competition(planted_config(planted))
    paths = list(competition.train["path"]) + list(competition.test["path"])
    for workers in (1, 2):
        found = dict(unreadable_images(paths, workers))
        assert {p.name for p in found} == {"garbage.mat", "truncated.jpg", "two_png.jpg"}
        assert "content is PNG" in found[planted / "train" / "two_png.jpg"]
        assert "truncated" in found[planted / "train" / "truncated.jpg"]


def test_raise_if_unreadable_names_rows_ids_and_fix(planted, monkeypatch):
    competition = read_competition(planted_config(planted))
    with pytest.raises(DataError) as info:
        raise_if_unreadable(competition.train, "train.csv")
    message = str(info.value)
    train = pd.read_csv(planted / "train.csv")
    row = int(train.index[train["id"] == "garbage.mat"][0]) + 2
    assert "train.csv: 3 unreadable image(s)" in message
    assert f"row {row}, id 'garbage.mat'" in message
    assert "Remove these rows from train.csv or replace the files." in message
    raise_if_unreadable(competition.test, "sample_submission.csv")  # the test set is clean

    monkeypatch.setattr(audit_module, "MAX_LISTED", 2)
    with pytest.raises(DataError, match=r"\.\.\. and 1 more \(3 in all\)"):
        raise_if_unreadable(competition.train, "train.csv", csv_rows=False)


def test_cheap_check_tolerates_trailing_bytes_and_catches_broken_png(tmp_path):
    photo = skimage.data.coffee()
    good = tmp_path / "trailing.jpg"
    good.write_bytes(_jpeg(photo) + b"\x00camera maker notes")  # legal junk after the end marker
    png = _png(Image.fromarray(photo))
    cut = tmp_path / "cut.png"
    cut.write_bytes(png[: len(png) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    found = dict(unreadable_images([good, cut, empty, good], 1))
    assert set(found) == {cut, empty}
    assert "empty" in found[empty]


def test_clean_competition_has_no_findings(planted, tmp_path):
    root = tmp_path / "clean"
    (root / "train").mkdir(parents=True)
    names = ["zero_00.png", "zero_01.png", "one_00.png", "one_01.png"]
    for name in names:
        shutil.copy(planted / "train" / name, root / "train" / name)
    pd.DataFrame({"id": names, "label": ["zero", "zero", "one", "one"]}).to_csv(
        root / "train.csv", index=False
    )
    result = audit(
        planted_config(root, "competition.test_images=null", "competition.sample_submission=null"),
        log=lambda _: None,
    )
    assert result.findings.empty
    assert result.errors == 0
    assert "No problems found." in result.to_markdown()


@pytest.mark.shared_data  # skipped by conftest where ../shared/data is absent
def test_trashnet_has_three_byte_identical_pairs(capsys):
    """TrashNet's README: 3 byte-identical pairs carry different labels. With the test labels
    withheld, one pair is inside train (an error) and two join train to test (warnings)."""
    config = load_config(REPO_ROOT / "configs" / "trashnet.yaml", [f"competition.root={TRASHNET}"])
    start = time.perf_counter()
    result = audit(config, log=lambda _: None, workers=2)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\naudit of trashnet (2,527 images, 2 workers): {seconds:.1f} s")
    findings = result.findings
    errors = findings[findings["severity"] == "error"]
    assert list(errors["kind"]) == ["conflicting_labels"]
    assert set(errors.iloc[0][["file", "other_file"]]) == {"train/t0777.jpg", "train/t1972.jpg"}
    leaks = findings[findings["kind"] == "train_test_duplicate"]
    assert {frozenset(p) for p in leaks[["file", "other_file"]].itertuples(index=False)} == {
        frozenset({"train/t0575.jpg", "test/t2073.jpg"}),
        frozenset({"train/t0199.jpg", "test/t2497.jpg"}),
    }
    assert set(findings["kind"]) <= {"conflicting_labels", "train_test_duplicate", "near_duplicate"}
    assert result.summary["images"] == {"train": 2021, "test": 506}
    assert result.summary["modes"] == {"RGB": 2527}
