"""Issue 12: CPU inference throughput of the runtimes, and the cost of batched TTA views.

(a) EfficientNet-Lite0 at 224 px with its ImageNet weights (``model.pretrained:
efficientnet_lite0_imagenet``, as configs/trashnet.yaml), ``embed`` as ``competition baseline``
runs it and ``forward`` (logits) as ``predict`` runs it, batches of 32 and 64, the contestants
alternated back to back in every round (order rotated): eager NCHW, eager channels_last, a raw
ONNX Runtime session with its default options on the same exported graph, and ours
(:func:`competition.runtime.inference_forward` with ``inference.runtime=auto``, exactly as
``extract`` / ``batch_logits`` call it). Prints img/s (best round), max |diff| to eager and
ours / ORT (target >= 0.90).

(b) TTA: ``predict_probs`` with N views batched (hflip: 2, d4: 8) against N plain passes
(identity), same model, runtime and loader; prints cost(N views) / (N x plain) (target <= 1.1).

    .venv/bin/python bench/inference.py             # ~4 min on 2 CPU cores (first run: + export)
    .venv/bin/python bench/inference.py --quick     # smoke run: 1 round, small batches

Pause other heavy processes while it runs: it measures the machine as it finds it.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from competition.config import REPO_ROOT, TransformSpec, load_config  # noqa: E402
from competition.predict import predict_probs, tta_views  # noqa: E402
from competition.runtime import graph_key, inference_forward  # noqa: E402
from plugins.backbones import Classifier  # noqa: E402

CACHE = REPO_ROOT / ".cache" / "onnx"


def _model() -> Classifier:
    config = load_config(REPO_ROOT / "configs" / "trashnet.yaml", [])
    return Classifier(config.model.backbone, config.model, num_classes=6).eval()


def _images(n: int, side: int) -> torch.Tensor:
    """Float images in [0, 1]: smooth random fields (closer to photos than white noise)."""
    generator = torch.Generator().manual_seed(0)
    small = torch.rand(n, 3, side // 8, side // 8, generator=generator)
    return torch.nn.functional.interpolate(small, size=(side, side), mode="bilinear")


def _time(fn, x, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - started) / repeats


def contestants(model: Classifier, method: str, batch: torch.Tensor) -> dict:
    """name -> callable batch -> output (NCHW float32 batches in, as extract / batch_logits)."""
    import onnxruntime as ort

    eager = model if method == "forward" else getattr(model, method)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_fn = cl if method == "forward" else getattr(cl, method)
    ours = inference_forward(model, method, "cpu", "auto", False, CACHE, images=None, log=print)
    with torch.inference_mode():
        ours(batch)  # builds (or reads) the graph and proves it equal to eager
    shape = tuple(batch.shape[1:])
    name = "x".join(str(s) for s in shape)
    path = CACHE / f"{type(model).__name__}-{method}-{name}-{graph_key(model, method, shape)}.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return {
        "eager NCHW": eager,
        "eager channels_last": lambda x: cl_fn(x.contiguous(memory_format=torch.channels_last)),
        "ORT raw session": lambda x: torch.from_numpy(
            session.run(None, {input_name: x.numpy()})[0]
        ),
        "ours (runtime=auto)": lambda x: ours(x).float().cpu(),
    }, ours


def bench_runtimes(model, batches: list[int], rounds: int, repeats: int) -> list[dict]:
    rows = []
    for method in ("embed", "forward"):
        for size in batches:
            x = _images(size, 224)
            fns, ours = contestants(model, method, x)
            with torch.inference_mode():
                reference = fns["eager NCHW"](x)
                diffs = {k: (f(x) - reference).abs().max().item() for k, f in fns.items()}
                seconds = {k: [] for k in fns}
                names = list(fns)
                for r in range(rounds):  # every contestant once per round, the order rotated:
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        seconds[name].append(_time(fns[name], x, repeats))  # (threads still
                        # spinning after a run slow down whoever runs next)
            best = {k: size / min(v) for k, v in seconds.items()}
            median = {k: size / statistics.median(v) for k, v in seconds.items()}
            rows.append(
                {"method": method, "batch": size, "best": best, "median": median, "diff": diffs}
            )
            print(f"\n{method}, batch {size} (ours ran on: {ours.kind})")
            print(f"  {'contestant':22s} {'img/s best':>10s} {'median':>8s} {'max|diff|':>10s}")
            for name in fns:
                print(f"  {name:22s} {best[name]:10.1f} {median[name]:8.1f} {diffs[name]:10.2e}")
            ratio = best["ours (runtime=auto)"] / best["ORT raw session"]
            print(f"  ours / ORT raw: {ratio:.3f} (target >= 0.90)", flush=True)
    return rows


class _Loader:
    """A loader of uint8 batches as predict_probs reads them (images, targets)."""

    def __init__(self, images: torch.Tensor, batch: int):
        self.images, self.batch = images, batch
        self.dataset = images

    def __iter__(self):
        for i in range(0, len(self.images), self.batch):
            chunk = self.images[i : i + self.batch]
            yield chunk, torch.zeros(len(chunk), dtype=torch.long)

    def __len__(self):
        return -(-len(self.images) // self.batch)


def bench_tta(model, images: int, batch: int, rounds: int, runtime: str) -> list[dict]:
    data = (_images(images, 224) * 255).to(torch.uint8)
    loader = _Loader(data, batch)
    plain = tta_views([])  # identity

    def run(views):
        predict_probs(model, loader, torch.device("cpu"), views, amp=False, runtime=runtime)

    run(plain)  # warm: graph built and proven
    rows = []
    for name in ("hflip", "d4"):
        views = tta_views([TransformSpec("identity"), TransformSpec(name)])
        run(views)
        times = {"views": [], "plain": []}
        for _ in range(rounds):
            times["views"].append(_time(run, views, 1))
            times["plain"].append(_time(run, plain, 1))
        n = len(views)
        ratio = min(times["views"]) / (n * min(times["plain"]))
        rows.append({"tta": name, "views": n, "ratio": ratio, "runtime": runtime})
        print(
            f"  tta {name:5s} ({n} views, runtime={runtime}): "
            f"{n * images / min(times['views']):6.1f} image-views/s vs plain "
            f"{images / min(times['plain']):6.1f} img/s; cost(N views) / "
            f"(N x plain) = {ratio:.3f} (target <= 1.1)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, batch 8: a smoke run")
    args = parser.parse_args()
    rounds, repeats, batches = (1, 1, [8]) if args.quick else (4, 1, [32, 64])
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}, "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    torch.manual_seed(0)
    model = _model()
    started = time.perf_counter()
    print("(a) EfficientNet-Lite0, 224 px, ImageNet weights")
    bench_runtimes(model, batches, rounds, repeats)
    print("\n(b) TTA views batched vs N plain passes (predict_probs, 32 images, batch 32)")
    for runtime in ("onnxruntime", "eager"):  # auto is eager below 1,000 image-views
        bench_tta(model, 16 if args.quick else 32, 32, 1 if args.quick else 2, runtime)
    load = os.getloadavg()
    print(
        f"\n{time.perf_counter() - started:.0f} s; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


if __name__ == "__main__":
    main()
