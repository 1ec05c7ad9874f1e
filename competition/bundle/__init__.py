"""What goes into an offline inference bundle besides the weights: the standalone script
(``predict.py``, copied verbatim: it imports only torch, timm, numpy, pandas, pillow and
safetensors) and a Kaggle notebook that runs it on ``/kaggle/input/...`` paths.

The notebook is nbformat 4 JSON written with the standard library (no nbformat needed).
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "predict.py"


def _cell(kind: str, text: str, index: int, tags: tuple[str, ...] = ()) -> dict:
    cell = {
        "cell_type": kind,
        "id": f"cell-{index}",
        "metadata": {"tags": list(tags)} if tags else {},
        "source": text.strip("\n").splitlines(keepends=True),
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook(bundle_name: str, manifest: dict) -> str:
    """A Kaggle notebook (JSON text) that runs ``predict.py`` of the bundle ``bundle_name``.

    Its first code cell holds the paths (tagged ``parameters``, for papermill); attach the bundle
    as a Kaggle dataset and the competition's data, check the paths, run all.
    """
    comp = manifest["competition"]
    data = f"/kaggle/input/{comp['name']}"
    kaggle = comp["layout"] == "kaggle"
    images = f"{data}/{comp.get('test_images') or 'test'}"
    sample = f"{data}/{comp['sample_submission']}" if kaggle and comp["sample_submission"] else ""
    test_csv = f"{data}/{comp['test_csv']}" if kaggle and comp.get("test_csv") else ""
    runs = ", ".join(f"{g['run']} (weight {g['weight']:.3g})" for g in manifest["groups"])
    classes = manifest["classes"]
    shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
    networks = sum(len(m["files"]) for m in manifest["models"])
    intro = f"""
# Offline inference: {bundle_name}

Made by `competition export` from {runs}: {networks} fold network(s), classes {shown}.
Internet off is fine: `predict.py` needs only torch, timm, numpy, pandas, pillow and safetensors.

1. Upload the bundle folder as a Kaggle dataset; add it and the competition data to this notebook.
2. Check the paths in the next cell, then *Run all*: it writes `/kaggle/working/submission.csv`.
"""
    params = f"""
BUNDLE = "/kaggle/input/{bundle_name}"  # the bundle folder (holds predict.py and bundle.json)
IMAGES = "{images}"  # the test images
SAMPLE_SUBMISSION = "{sample}"  # "" when the competition has none
TEST_CSV = "{test_csv}"  # a CSV of test ids; "" to use the sample submission's
OUT = "/kaggle/working/submission.csv"
"""
    run = """
import subprocess
import sys

command = [sys.executable, f"{BUNDLE}/predict.py", "--images", IMAGES, "--out", OUT]
if SAMPLE_SUBMISSION:
    command += ["--sample-submission", SAMPLE_SUBMISSION]
if TEST_CSV:
    command += ["--test-csv", TEST_CSV]
print(" ".join(command))
subprocess.run(command, check=True)
"""
    show = """
import pandas as pd

pd.read_csv(OUT).head()
"""
    cells = [
        _cell("markdown", intro, 0),
        _cell("code", params, 1, ("parameters",)),
        _cell("code", run, 2),
        _cell("code", show, 3),
    ]
    document = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(document, indent=1) + "\n"


__all__ = ["TEMPLATE", "notebook"]
