"""``competition export``: an offline bundle that reproduces the repository's test predictions.

The bundle's script runs in a fresh interpreter, outside the repository, with the repository's
packages blocked from import, on a copy of the test images; its submission must equal the
repository's row for row and its probabilities the fold mean within 1e-5.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from competition.bundle import predict as script
from competition.cli import main
from competition.cv import predict_run, run_cv
from competition.ensemble import blend
from competition.errors import ConfigError
from competition.export import BUNDLE_FORMAT, export
from competition.runs import RunRecord
from tests.conftest import trashnet_config

#: Run in the bundle's interpreter: block the repository and the heavy extras, run predict.py,
#: then list every top-level module it loaded beyond the allowed packages and the standard library.
GUARD = """
import importlib.abc, json, runpy, sys
BLOCKED = {"competition", "plugins", "albumentations", "kornia", "optuna", "pluggy", "cv2", "tests"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import: {name}")
sys.meta_path.insert(0, Block())
import numpy, pandas, PIL.Image, PIL.ImageOps, safetensors.torch, timm, torch  # the allowed ones
allowed = {m.split(".")[0] for m in sys.modules}
script, report, *argv = sys.argv[1:]
sys.argv = [script, *argv]
try:
    runpy.run_path(script, run_name="__main__")
    status = 0
except SystemExit as exc:
    status = exc.code
loaded = {m.split(".")[0] for m in sys.modules}
extra = sorted(loaded - allowed - set(sys.stdlib_module_names) - {"__main__", "__mp_main__"})
with open(report, "w") as f:
    json.dump({"status": status, "extra": extra, "loaded": sorted(loaded)}, f)
sys.exit(status)
"""


@pytest.fixture(scope="module")
def trained(kaggle_small, tmp_path_factory):
    """A tiny two-fold run (resnet10t, GeM, cosine head, 32 px, TTA identity + hflip)."""
    tmp = tmp_path_factory.mktemp("export")
    paths = {
        "runs_dir": tmp / "runs",
        "folds_dir": tmp / "folds",
        "submissions_dir": tmp / "submissions",
    }
    run_cv(trashnet_config(kaggle_small, tmp, "model.pooling=gem", "model.head=cosine"), **paths)
    return {"tmp": tmp, "run": paths["runs_dir"] / "t", **paths}


def _fold_mean(run_dir) -> np.ndarray:
    record = RunRecord.open(run_dir)
    return np.mean([record.fold_probs(f, "test") for f in record.done_folds()], axis=0)


def test_bundle_reproduces_the_run_offline(trained, kaggle_small, tmp_path):
    out = tmp_path / "bundle"
    summary = export([trained["run"]], out, log=lambda *a: None)
    assert summary["verified"]["t"] <= 1e-5  # checked at export on the first test images
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["format"] == BUNDLE_FORMAT and manifest["classes"][0] == "digit_0"
    assert sorted(p.name for p in (out / "weights" / "t").iterdir()) == [
        "fold_0.safetensors",
        "fold_1.safetensors",
    ]
    assert (out / "configs" / "t.yaml").is_file()
    notebook = json.loads((out / "inference.ipynb").read_text())
    assert notebook["nbformat"] == 4
    assert "/kaggle/input/bundle" in "".join(notebook["cells"][1]["source"])

    # a Kaggle-like machine: the bundle and the data elsewhere, cwd outside the repository
    kaggle = tmp_path / "kaggle"
    shutil.copytree(out, kaggle / "input" / "bundle")
    shutil.copytree(kaggle_small / "test", kaggle / "input" / "comp" / "test")
    shutil.copy(kaggle_small / "sample_submission.csv", kaggle / "input" / "comp")
    (kaggle / "working").mkdir()
    report = kaggle / "imports.json"
    command = [
        sys.executable,
        "-I",  # isolated: no PYTHONPATH, no user site, no script folder on sys.path
        "-c",
        GUARD,
        str(kaggle / "input" / "bundle" / "predict.py"),
        str(report),
        "--images",
        str(kaggle / "input" / "comp" / "test"),
        "--sample-submission",
        str(kaggle / "input" / "comp" / "sample_submission.csv"),
        "--out",
        "submission.csv",
        "--probs",
        "probs.csv",
        "--device",
        "cpu",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=kaggle / "working", capture_output=True, text=True, timeout=300
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    imports = json.loads(report.read_text())
    assert imports["extra"] == [], f"the bundle imported {imports['extra']}"
    assert not {"competition", "plugins", "albumentations", "cv2"} & set(imports["loaded"])

    ours = pd.read_csv(kaggle / "working" / "submission.csv", dtype=str)
    theirs = pd.read_csv(trained["submissions_dir"] / "t.csv", dtype=str)
    pd.testing.assert_frame_equal(ours, theirs)
    probs = pd.read_csv(kaggle / "working" / "probs.csv", dtype={"image_id": str})
    sample = pd.read_csv(kaggle_small / "sample_submission.csv", dtype=str)
    assert probs["image_id"].tolist() == sample["image_id"].tolist()
    gap = np.abs(probs[manifest["classes"]].to_numpy() - _fold_mean(trained["run"])).max()
    assert gap <= 1e-5
    size = summary["bytes"] / 2**20
    per_1000 = seconds / len(sample) * 1000
    print(
        f"\nbundle {size:.2f} MiB (resnet10t, 2 folds); {len(sample)} images in {seconds:.1f} s "
        f"with interpreter start: {per_1000:.0f} s per 1,000 images; max |p - repo| {gap:.1e}; "
        f"{done.stdout.strip()}"
    )


def test_blend_bundle_reproduces_the_blend(trained, tmp_path):
    """A blend of the run and a re-prediction with other TTA: members share fold weights."""
    paths = {k: trained[k] for k in ("runs_dir", "folds_dir", "submissions_dir")}
    views = ["rot90", {"name": "crop", "position": "top_left", "fraction": 0.75}]
    views.append({"name": "scale", "factor": 1.25})
    other = predict_run(
        trained["run"],
        {"tta": views, "tta_merge": "mean_logits"},
        name="t-tta",
        log=lambda *a: None,
        **paths,
    )
    assert other["complete"]
    blend(
        [trained["run"], paths["runs_dir"] / "t-tta"],
        "b",
        log=lambda *a: None,
        method="geometric",
        calibrate=True,
        **paths,
    )
    out = tmp_path / "bundle"
    summary = export([paths["runs_dir"] / "b"], out, verify=False, log=lambda *a: None)
    assert summary["models"] == 2 and summary["networks"] == 2  # one set of fold weights
    manifest = json.loads((out / "bundle.json").read_text())
    node = manifest["groups"][0]["node"]
    assert node["method"] == "geometric" and all(m["temperature"] for m in node["members"])
    assert [v["kind"] for v in manifest["models"][1]["tta"]] == ["d4", "crop", "scale"]
    record = RunRecord.open(paths["runs_dir"] / "b")
    test = pd.read_csv(record.config.data_root() / "sample_submission.csv", dtype=str)
    images = [record.config.data_root() / "test" / f"{i}.jpg" for i in test["image_id"]]
    got = script.Predictor(manifest, script.select_device("cpu"), root=out).predict(images)
    assert np.abs(got - _fold_mean(paths["runs_dir"] / "b")).max() <= 1e-5


def _copy_run(trained, name: str, edit) -> object:
    """A copy of the trained run whose config.yaml ``edit`` changes (a run made another way)."""
    target = trained["runs_dir"] / name
    if not target.exists():
        shutil.copytree(trained["run"], target)
        config = yaml.safe_load((target / "config.yaml").read_text())
        edit(config)
        config["name"] = name
        (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def test_export_refuses_what_the_bundle_cannot_reproduce(trained, tmp_path):
    out = tmp_path / "bundle"

    def refused(run, match):
        with pytest.raises(ConfigError, match=match):
            export([run], out, log=lambda *a: None)
        assert not out.exists()  # nothing half-written

    def baseline(config):
        config["produced_by"] = {"verb": "baseline", "baseline": {"method": "knn"}}

    refused(_copy_run(trained, "knn", baseline), "baseline run .* no network weights")

    def resize(config):
        config["augment"]["eval"] = [{"name": "Resize", "params": {}}]

    refused(_copy_run(trained, "resize", resize), r"augment.eval\[0\]=Resize is not reproduced")

    def crop_pct(config):
        config["augment"]["eval"] = [{"name": "CenterCrop", "params": {"crop_pct": 0.5}}]

    refused(_copy_run(trained, "pct", crop_pct), "resizes to 32 with OpenCV")

    def rank(config):
        config["produced_by"] = {
            "verb": "ensemble",
            "method": "rank",
            "members": [{"run": str(trained["run"]), "weight": 1.0}],
        }

    refused(_copy_run(trained, "rank", rank), "'rank' blend is not reproduced")


def test_out_is_a_folder_of_its_own(trained, tmp_path, capsys):
    run = trained["run"]
    quiet = {"log": lambda *a: None, "verify": False}
    with pytest.raises(ConfigError, match="runs/ belongs to the run record"):
        export([run], trained["runs_dir"] / "bundle", **quiet)
    with pytest.raises(ConfigError, match="runs/ belongs to the run record"):
        export([run], trained["runs_dir"].parent, **quiet)
    with pytest.raises(ConfigError, match="plain names"):
        export([run], tmp_path / "my bundle!", **quiet)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"not empty\. Pass --force"):
        export([run], mine, **quiet)
    with pytest.raises(ConfigError, match="only replaces bundles"):
        export([run], mine, force=True, **quiet)
    assert (mine / "todo.txt").read_text() == "keep me"

    out = tmp_path / "bundle"
    assert main(["export", str(run), str(out)]) == 0  # the command line, checked on test images
    printed = capsys.readouterr().out
    assert f"bundle: {out} (" in printed and "t: max |p - run|" in printed
    assert main(["export", str(run), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: export OUT=") and "not empty" in error
    (out / "stale.txt").write_text("old")
    export([run], out, force=True, **quiet)  # a bundle is replaced whole
    assert not (out / "stale.txt").exists() and (out / "bundle.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
