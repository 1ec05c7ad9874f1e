"""Inference runtimes (competition.runtime): equal to eager, fallbacks said once, end to end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from competition import runtime
from competition.baseline import BaselineOptions, run_baseline
from competition.config import REPO_ROOT, load_config
from competition.cv import predict_run, run_cv
from competition.runtime import AUTO_MIN_IMAGES, RTOL, choose, inference_forward, prune_graphs
from plugins.backbones import Classifier
from tests.conftest import trashnet_config

CPU = torch.device("cpu")
needs_onnx = pytest.mark.skipif(
    bool(runtime.missing_onnx_packages()), reason="needs the onnx extra: pip install '.[onnx]'"
)


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch):
    """Each test sees the runtime's one-per-process messages afresh."""
    monkeypatch.setattr(runtime, "_SAID", set())


@pytest.fixture(scope="module")
def model() -> Classifier:
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", ["model.backbone=test_efficientnet"])
    torch.manual_seed(0)
    return Classifier("test_efficientnet", config.model, num_classes=6).eval()


def _batches():
    """Two input sizes, odd batch sizes (a last batch is smaller), real-valued images in [0, 1]."""
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(b, 3, s, s, generator=generator) for b, s in ((5, 32), (3, 32), (4, 40))]


def _assert_equal_to_eager(forward, eager, batches):
    with torch.inference_mode():
        for x in batches:
            got, expected = forward(x), eager(x)
            scale = max(1.0, expected.abs().max().item())
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= RTOL * scale


@needs_onnx
def test_onnxruntime_embeddings_equal_eager_for_odd_batches_and_two_sizes(model, tmp_path):
    said = []
    forward = inference_forward(
        model, "embed", CPU, "onnxruntime", False, tmp_path, log=said.append
    )
    _assert_equal_to_eager(forward, model.embed, _batches())
    assert forward.kind == "onnxruntime" and set(forward.fast) == {(3, 32, 32), (3, 40, 40)}
    assert len(list(tmp_path.glob("*.onnx"))) == 2, "one graph per input size"
    assert len(said) == 1 and "embed on onnxruntime (equal to eager" in said[0]
    # built once and reused: the same object, its sessions warm
    again = inference_forward(model, "embed", CPU, "onnxruntime", False, tmp_path)
    assert again is forward


@pytest.mark.parametrize("kind", ["auto", "compile"])
def test_auto_and_compile_logits_equal_eager(kind, model, monkeypatch):
    if kind == "compile":  # inductor's C++ codegen takes minutes on 2 cores; aot_eager is the same
        real = torch.compile  # graph capture without code generation
        monkeypatch.setattr(torch, "compile", lambda m: real(m, backend="aot_eager"))
    forward = inference_forward(model, "forward", CPU, kind, False, images=10)
    _assert_equal_to_eager(forward, model, _batches())
    assert forward.kind == ("channels_last" if kind == "auto" else "compile")
    assert len(forward.fast) == 2


def test_auto_uses_onnxruntime_for_many_images_on_cpu_only():
    installed = not runtime.missing_onnx_packages()
    many = choose("auto", CPU, False, AUTO_MIN_IMAGES)[0]
    assert many == ("onnxruntime" if installed else "channels_last")
    assert choose("auto", CPU, False, AUTO_MIN_IMAGES - 1) == ("channels_last", None)
    assert choose("auto", CPU, "bf16", 10**6) == ("eager", None)  # autocast: eager, silently
    kind, why = choose("onnxruntime", CPU, "bf16")
    assert kind == "eager" and "amp=bf16" in why
    with pytest.raises(ValueError, match=r"inference\.runtime='tensorrt'"):
        choose("tensorrt", CPU)


def test_a_missing_onnxruntime_falls_back_to_eager_with_the_fix(model, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    said = []
    forward = inference_forward(
        model, "embed", CPU, "onnxruntime", False, tmp_path, log=said.append
    )
    assert forward.kind == "eager"
    assert said == [
        "inference.runtime=onnxruntime: onnxruntime is not installed (pip install '.[onnx]'); "
        "using eager PyTorch"
    ]
    x = _batches()[0]
    with torch.inference_mode():
        assert torch.equal(forward(x), model.embed(x))
    assert not list(tmp_path.iterdir()), "nothing exported"


class Noisy(torch.nn.Module):
    """A model whose output is random: no runtime can equal an earlier eager call."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) + torch.rand(len(x), 3)


@needs_onnx
def test_a_runtime_that_differs_from_eager_is_not_used(tmp_path):
    said = []
    forward = inference_forward(
        Noisy(), "forward", CPU, "onnxruntime", False, tmp_path, log=said.append
    )
    with torch.inference_mode():
        forward(torch.rand(2, 3, 8, 8))
    assert forward.kind == "eager" and not forward.fast
    assert len(said) == 1 and "differs from eager" in said[0] and "using eager PyTorch" in said[0]


@needs_onnx
def test_other_weights_never_reuse_a_graph(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", ["model.backbone=test_efficientnet"])
    net = Classifier("test_efficientnet", config.model, num_classes=2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        inference_forward(net, "forward", CPU, "onnxruntime", False, tmp_path)(x)
        with torch.no_grad():
            net.head.bias.add_(1.0)  # in place: the cached forward is stale
        forward = inference_forward(net, "forward", CPU, "onnxruntime", False, tmp_path)
        assert torch.allclose(forward(x), net(x), atol=1e-4) and forward.fast
    assert len(list(tmp_path.glob("*.onnx"))) == 2


# -- end to end: the same OOF as eager --------------------------------------------------------


@needs_onnx
def test_baseline_and_predict_give_eager_oof_on_onnxruntime(kaggle_small, tmp_path, run_paths):
    quiet = lambda *a: None  # noqa: E731
    oofs = {}
    for name in ("eager", "onnxruntime"):
        config = trashnet_config(
            kaggle_small,
            tmp_path,
            f"inference.runtime={name}",
            f"data.cache_dir={tmp_path / name / 'cache'}",
        )  # each its own embedding cache (<cache>/../embeddings): both compute
        cv = run_baseline(config, BaselineOptions(method="linear", C=1.0), log=quiet, **run_paths)
        assert cv["embeddings"]["computed"], "computed, not read from a cache"
        oofs[name] = pd.read_csv(Path(cv["run"]) / "oof.csv").iloc[:, 4:].to_numpy()
        run_paths["runs_dir"] = tmp_path / f"runs-{name}"
    assert list((tmp_path / "onnxruntime" / "onnx").glob("*embed*.onnx"))
    np.testing.assert_allclose(oofs["onnxruntime"], oofs["eager"], atol=1e-4)

    config = trashnet_config(kaggle_small, tmp_path, "inference.runtime=eager", "name=tr")
    run_cv(config, folds=[0], log=quiet, **run_paths)
    source = run_paths["runs_dir"] / "tr"
    again = predict_run(
        source, {"inference.runtime": "onnxruntime"}, name="tr-ort", log=quiet, **run_paths
    )
    assert list((tmp_path / "onnx").glob("*forward*.onnx"))
    read = lambda run: pd.read_csv(Path(run) / "oof.csv").iloc[:, 4:].to_numpy()  # noqa: E731
    np.testing.assert_allclose(read(again["run"]), read(source), atol=1e-4)


def test_the_graph_cache_drops_the_least_recently_used_graphs_past_its_limit(tmp_path):
    graphs = []
    for i in range(4):  # 100 bytes each, used in this order
        graph = tmp_path / f"g{i}.onnx"
        graph.write_bytes(bytes(100))
        os.utime(graph, (1_000 + i, 1_000 + i))
        graphs.append(graph)
    os.utime(graphs[0], (2_000, 2_000))  # g0 used again last
    deleted = prune_graphs(tmp_path, keep=graphs[3], limit=250)
    assert deleted == [graphs[1], graphs[2]]  # the two least recently used
    assert sorted(g.name for g in tmp_path.glob("*.onnx")) == ["g0.onnx", "g3.onnx"]
    assert prune_graphs(tmp_path, keep=graphs[3], limit=250) == []  # under the limit: no change
