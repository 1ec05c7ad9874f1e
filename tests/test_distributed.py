"""Data-parallel training with torchrun (2 gloo processes on CPU), torch.compile and CPU bf16.

The DDP run must equal a one-process run with the same global batch: the same OOF table in the
same order, the same cv.json and submission, probabilities within 1e-5 (the gradients are
all-reduced in another summation order, nothing else differs). The model is a LayerNorm network
(timm's ``test_convnext``): BatchNorm statistics would be per process on CPU, where PyTorch has no
SyncBatchNorm, and the training transform is deterministic, as per-sample random augmentation
draws per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from competition import distributed
from competition.cli import main
from competition.config import REPO_ROOT, replace
from competition.cv import run_cv
from competition.device import amp_dtype, autocast
from competition.errors import ConfigError
from competition.runs import read_oof
from tests.conftest import trashnet_config

#: The probabilities of a DDP run and of one process agree to this (measured: 4e-8).
TOLERANCE = 1e-5

EXACT = [
    "model.backbone=test_convnext",
    "model.drop_rate=0",
    "optim.epochs=2",
    "augment.train=[{name: CenterCrop}]",
    "tta=[identity]",
]

WORKER = textwrap.dedent(
    """
    import sys
    from competition import distributed
    from competition.config import REPO_ROOT, load_config
    from competition.cv import run_cv

    out = sys.argv[1]
    config = load_config(REPO_ROOT / "configs" / "trashnet.yaml", sys.argv[2:])
    paths = {k: f"{out}/{k.split('_')[0]}" for k in ("runs_dir", "folds_dir", "submissions_dir")}
    try:
        run_cv(config, **paths)
    finally:
        distributed.teardown()
    """
)


def torchrun(script, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_two_gloo_processes_train_the_run_one_process_trains(kaggle_small, tmp_path, run_paths):
    config = trashnet_config(kaggle_small, tmp_path, *EXACT)
    single = run_cv(config, log=lambda *a: None, **run_paths)

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    overrides = [f"competition.root={kaggle_small}", "folds.k=2", "name=t"]
    overrides += [
        "model.pretrained=null",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.warmup_epochs=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        *EXACT,
    ]
    done = torchrun(script, 2, str(out), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone reports and writes: each epoch line once
    assert done.stdout.count("fold 0 epoch 1/2") == 1, done.stdout

    ddp_run, one_run = out / "runs" / "t", run_paths["runs_dir"] / "t"
    ddp_cv = json.loads((ddp_run / "cv.json").read_text())
    assert ddp_cv["complete"] and ddp_cv["folds_done"] == [0, 1]
    for key in ("folds", "mean", "oof"):
        assert ddp_cv[key] == pytest.approx(single[key], abs=1e-6)

    ddp_oof, one_oof = read_oof(ddp_run / "oof.csv"), read_oof(one_run / "oof.csv")
    train = pd.read_csv(kaggle_small / "train.csv", dtype=str)
    assert sorted(ddp_oof["id"]) == sorted(train["image_id"])  # every train row, once
    pd.testing.assert_frame_equal(
        ddp_oof[["id", "fold", "target"]], one_oof[["id", "fold", "target"]]
    )
    classes = [c for c in one_oof.columns if c.startswith("digit_")]
    assert np.abs(ddp_oof[classes].to_numpy() - one_oof[classes].to_numpy()).max() < TOLERANCE
    for fold in (0, 1):
        a = np.load(ddp_run / f"fold_{fold}" / "test_probs.npy")
        b = np.load(one_run / f"fold_{fold}" / "test_probs.npy")
        assert np.abs(a - b).max() < TOLERANCE
        log = pd.read_csv(ddp_run / f"fold_{fold}" / "log.csv")
        assert len(log) == 2  # one row per epoch: written by one process
    submission = pd.read_csv(out / "submissions" / "t.csv")
    assert submission.equals(pd.read_csv(run_paths["submissions_dir"] / "t.csv"))


def test_each_rank_gets_its_chunk_of_every_global_batch():
    order = list(range(10, 31))  # 21 rows, global batch 8: two batches, the ragged 5 dropped
    chunks = [list(distributed.RankBatches(order, 8, r, 2)) for r in (0, 1)]
    assert chunks[0] == [[10, 11, 12, 13], [18, 19, 20, 21]]
    assert chunks[1] == [[14, 15, 16, 17], [22, 23, 24, 25]]
    assert len(distributed.RankBatches(order, 8, 0, 2)) == 2
    # fewer rows than one batch: the only batch is kept, split as evenly as it goes
    assert [list(distributed.RankBatches([1, 2, 3], 8, r, 2)) for r in (0, 1)] == [
        [[1, 2]],
        [[3]],
    ]
    with pytest.raises(ConfigError, match=r"data\.batch_size=1 is the global batch"):
        distributed.RankBatches(order, 1, 0, 2)


def test_outside_torchrun_every_helper_is_one_process():
    assert not distributed.launched() and distributed.is_main()
    rows = np.arange(6).reshape(3, 2)
    assert distributed.gather_rows(rows) is rows
    assert distributed.shard(np.arange(5)).tolist() == [0, 1, 2, 3, 4]
    assert distributed.from_main(lambda: 7) == 7
    assert distributed.all_sum([1.0, 2.0]) == [1.0, 2.0]


def test_nproc_checks_the_config_before_starting_processes(capsys):
    config = str(REPO_ROOT / "configs" / "trashnet.yaml")
    assert main(["train", config, "--nproc", "2", "optim.name=adam"]) == 2
    err = capsys.readouterr().err
    assert "optim.name: 'adam' is not one of" in err and "torch.distributed.run" not in err


def test_only_train_runs_under_torchrun(tmp_path):
    script = tmp_path / "verb.py"
    script.write_text("import sys\nfrom competition.cli import main\nsys.exit(main(['plugins']))\n")
    done = torchrun(script, 2, timeout=120)
    assert done.returncode != 0
    assert "only `competition train` runs data-parallel" in done.stderr


# -- torch.compile --------------------------------------------------------------------------------


def test_compile_trains_the_same_model(kaggle_small, tmp_path, run_paths):
    one_epoch = trashnet_config(kaggle_small, tmp_path, *EXACT, "optim.epochs=1")
    eager = run_cv(one_epoch, folds=[0], log=lambda *a: None, **run_paths)
    lines = []
    compiled = run_cv(
        replace(
            one_epoch,
            {
                "name": "c",
                "model.compile": True,
                "model.compile_backend": "aot_eager",  # dynamo + AOTAutograd, no C++ build
            },
        ),
        folds=[0],
        log=lines.append,
        **run_paths,
    )
    assert not any("model.compile" in line for line in lines), lines  # no fallback
    assert compiled["folds"] == pytest.approx(eager["folds"], abs=1e-6)
    a = read_oof(run_paths["runs_dir"] / "t" / "oof.csv")
    b = read_oof(run_paths["runs_dir"] / "c" / "oof.csv")
    classes = [c for c in a.columns if c.startswith("digit_")]
    assert np.abs(a[classes].to_numpy() - b[classes].to_numpy()).max() < 1e-4


def test_a_backend_that_cannot_compile_falls_back_to_eager_with_a_message(
    kaggle_small, tmp_path, run_paths
):
    lines = []
    config = trashnet_config(
        kaggle_small, tmp_path, "model.compile=true", "model.compile_backend=no_such_backend"
    )
    cv = run_cv(config, folds=[0], log=lines.append, **run_paths)
    assert cv["folds_done"] == [0]
    message = next(line for line in lines if line.startswith("model.compile:"))
    assert "'no_such_backend' failed" in message and "Training eagerly" in message
    assert "model.compile=false" in message


# -- bf16 autocast on CPU -------------------------------------------------------------------------


def test_amp_bf16_runs_the_forward_in_bf16_on_cpu(kaggle_small, tmp_path, run_paths):
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, True) is None  # amp=true: GPUs only, as before
    assert amp_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="amp=fp16: fp16 autocast is for CUDA"):
        amp_dtype(cpu, "fp16")
    layer = torch.nn.Linear(4, 3)
    with autocast(cpu, "bf16"):
        assert layer(torch.ones(2, 4)).dtype is torch.bfloat16
    with autocast(cpu, True):
        assert layer(torch.ones(2, 4)).dtype is torch.float32

    dtypes = set()

    def record(module, inputs, output):  # every module of every model built meanwhile
        if isinstance(module, torch.nn.Conv2d):
            dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        config = trashnet_config(kaggle_small, tmp_path, "amp=bf16", "name=bf16")
        cv = run_cv(config, folds=[0], log=lambda *a: None, **run_paths)
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16}  # every convolution of training and prediction
    oof = read_oof(run_paths["runs_dir"] / "bf16" / "oof.csv")
    classes = [c for c in oof.columns if c.startswith("digit_")]
    assert np.isfinite(oof[classes].to_numpy()).all() and cv["folds_done"] == [0]
