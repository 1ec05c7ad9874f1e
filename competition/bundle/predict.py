#!/usr/bin/env python
"""Offline inference for a bundle written by ``competition export`` (Kaggle code competitions).

Runs with the internet off and needs only torch, timm, numpy, pandas and pillow, plus safetensors
(timm's own dependency, a small package) to read the weights; nothing else, not the repository
that trained the models. It repeats, step for step, what the repository does at prediction time:

1. decode each image to RGB (EXIF orientation, any mode), resize the shorter side and centre-crop
   to the cache side (or squash), as the repository's decode-once cache does;
2. centre-crop to the evaluation size (the default ``augment.eval``);
3. float in [0, 1], the model normalises with its backbone's mean/std, pools (avg or GeM,
   Radenovic et al. 2018) and applies its head (linear, or cosine: Gidaris & Komodakis 2018);
4. softmax merged over the run's TTA views (the dihedral group D4, scales, crops), averaged over
   folds, then blended as the run's blend says (weights, temperatures, mean or geometric);
5. the submission in the sample submission's columns and row order (label or probabilities).

Usage (``bundle.json`` beside this file describes the models)::

    python predict.py --images /kaggle/input/comp/test \\
        --sample-submission /kaggle/input/comp/sample_submission.csv --out submission.csv

This file is a template copied verbatim into every bundle; keep its imports to the packages above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
CHUNK = 512  # images decoded and predicted at a time (bounds memory on any test set size)


class BundleError(Exception):
    """A problem with the inputs or the bundle; the message names the file and the fix."""


# -- 1. decoding (as competition/images.py) -------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (palette, grayscale, RGBA, 16-bit, CMYK, animated GIF) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() or 1.0
        scale = 255.0 / (65535.0 if high > 255 else max(high, 255.0))
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(), array.max()
        array = (array - low) / ((high - low) or 1.0) * 255.0
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode(path, side: int, mode: str = "crop") -> np.ndarray:
    """(side, side, 3) uint8: shorter side resized + centre crop, or squashed (bicubic)."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = to_rgb(image)
    except Exception as exc:
        raise BundleError(
            f"{path}: cannot read image ({type(exc).__name__}: {exc}). Replace or remove it."
        ) from exc
    if mode == "squash":
        image = image.resize((side, side), Image.BICUBIC)
    else:
        image = ImageOps.fit(image, (side, side), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


# -- 2. the eval pipeline: centre crops (as plugins/augment_cpu.py CenterCrop) -------------------


def center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(image[top : top + crop, left : left + crop])


# -- 3. the network (as plugins/backbones.py Classifier) ------------------------------------------


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): (mean x^p)^(1/p), learnt p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class CosineClassifier(nn.Module):
    """Logits = scale * cos(feature, class weight) (Gidaris & Komodakis 2018; Wang et al. 2018)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class Net(nn.Module):
    """A timm backbone (no pooling, no classifier), normalisation, pooling and head."""

    def __init__(self, spec: dict):
        super().__init__()
        self.backbone = timm.create_model(
            spec["backbone"],
            pretrained=False,
            num_classes=0,
            global_pool="",
            **spec.get("timm_kwargs", {}),
        )
        self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"]).view(1, 3, 1, 1), persistent=False)
        self.pool = GeM() if spec["pooling"] == "gem" else AvgPool()
        dim, classes = self.backbone.num_features, spec["num_classes"]
        self.head = (
            CosineClassifier(dim, classes) if spec["head"] == "cosine" else nn.Linear(dim, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features((x - self.mean) / self.std)
        if features.ndim == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
                features = features.permute(0, 3, 1, 2)
            pooled = self.pool(features)
        else:  # tokens (B, N, C): average the patch tokens
            prefix = getattr(self.backbone, "num_prefix_tokens", 0) or 0
            pooled = features[:, prefix:].mean(dim=1)
        return self.head(pooled)


def load_net(spec: dict, path: Path, device: torch.device) -> Net:
    """The network of ``spec`` with the fold weights in ``path`` (safetensors), for inference."""
    net = Net(spec)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise BundleError(
            f"{path}: cannot read the weights ({exc}). Copy the bundle again."
        ) from exc
    net.load_state_dict(state)
    net = net.to(device).eval()
    if spec["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    return net


# -- 4. TTA views and merging (as plugins/tta.py, competition/predict.py) --------------------------


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    out = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def make_view(view: dict):
    """A view of float (B, 3, H, W) images: an element of D4, a scale or a crop."""
    kind = view["kind"]
    if kind == "d4":
        k, flip = view["k"], view["flip"]

        def d4(x):
            if k == 2 and flip:
                return x.flip(-2)
            out = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
            return out.flip(-1) if flip else out

        return d4
    if kind == "scale":
        size, factor = view["size"], view["factor"]

        def scale(x):
            height, width = x.shape[-2:]
            if size is not None:
                return _resize(x, size)
            return _resize(x, (max(1, round(height * factor)), max(1, round(width * factor))))

        return scale
    if kind == "crop":
        position, fraction, flip = view["position"], view["fraction"], view["flip"]

        def crop(x):
            height, width = x.shape[-2:]
            ch, cw = max(1, round(height * fraction)), max(1, round(width * fraction))
            vertical, _, horizontal = position.partition("_")
            if position == "center":
                top, left = (height - ch) // 2, (width - cw) // 2
            else:
                top = 0 if vertical == "top" else height - ch
                left = 0 if horizontal == "left" else width - cw
            out = _resize(x[..., top : top + ch, left : left + cw], (height, width))
            return out.flip(-1) if flip else out

        return crop
    raise BundleError(f"bundle.json: TTA view {view!r} is unknown to this script")


def autocast(device: torch.device, amp):
    """The run's ``amp``: true = bf16 (fp16 on older GPUs) on CUDA only; "bf16" also on CPU."""
    if amp == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if amp is not True or device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        bf16 = torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


@torch.inference_mode()
def predict_batch(net: Net, spec: dict, images: np.ndarray, device, views) -> np.ndarray:
    """Probabilities (B, K) of uint8 (B, H, W, 3) images, merged over ``views``."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    layout = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    batch = batch.contiguous(memory_format=layout).float().div_(255)
    logits = []
    for view in views:
        with autocast(device, spec["amp"]):
            logits.append(net(view(batch).contiguous(memory_format=layout)).float())
    logits = torch.stack(logits)  # (V, B, K)
    if spec["tta_merge"] == "mean_logits":
        probs = logits.mean(dim=0).softmax(dim=-1)
    else:
        probs = logits.softmax(dim=-1).mean(dim=0)
    return probs.cpu().numpy().astype(np.float64)


# -- blends (as competition/ensemble.py combine, competition/calibration.py) ---------------------


def normalised(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum(axis=-1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature) row by row (Guo et al. 2017)."""
    logits = np.log(np.clip(probs, 1e-15, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    return normalised(np.exp(logits))


def evaluate(node: dict, fold: int, per_model: dict) -> np.ndarray:
    """One fold's probabilities of a model, or of a blend of nodes (recursively)."""
    if "model" in node:
        return normalised(per_model[node["model"]][fold])
    weights = np.array([member["weight"] for member in node["members"]], dtype=np.float64)
    stack = []
    for member in node["members"]:
        probs = evaluate(member["node"], fold, per_model)
        if member.get("temperature") is not None:
            probs = apply_temperature(probs, member["temperature"])
        stack.append(probs)
    stack = np.stack(stack)
    if node["method"] == "geometric":
        logits = np.tensordot(weights, np.log(np.clip(stack, 1e-15, 1.0)), axes=1)
        logits -= logits.max(axis=1, keepdims=True)
        return normalised(normalised(np.exp(logits)))
    return normalised(np.tensordot(weights, stack, axes=1))


class Predictor:
    """Every fold network of the bundle, kept in memory; predicts chunks of image paths."""

    def __init__(self, manifest: dict, device, batch_size: int | None = None, root: Path = HERE):
        self.manifest, self.device, self.batch_size = manifest, device, batch_size
        self.nets = {}  # (model index, fold) -> Net
        for m, spec in enumerate(manifest["models"]):
            for fold, fold_file in spec["files"].items():
                self.nets[m, int(fold)] = load_net(spec, Path(root) / fold_file, device)
        self.views = [[make_view(v) for v in spec["tta"]] for spec in manifest["models"]]
        self.workers = max(1, min(8, os.cpu_count() or 1))

    def _decoded(self, paths: list) -> dict:
        """Each image decoded once per (side, resize) the models need."""
        out = {}
        with ThreadPoolExecutor(self.workers) as pool:
            for spec in self.manifest["models"]:
                key = (spec["side"], spec["resize"])
                if key not in out:
                    jobs = pool.map(lambda p, k=key: decode(p, *k), paths)
                    out[key] = np.stack(list(jobs))
        return out

    def _model_folds(self, m: int, decoded: dict) -> dict:
        """{fold: (N, K) probabilities} of model ``m`` on one chunk."""
        spec = self.manifest["models"][m]
        images = decoded[spec["side"], spec["resize"]]
        for crop in spec["crops"]:
            images = np.stack([center_crop(image, crop) for image in images])
        batch = self.batch_size or spec["batch_size"]
        out = {}
        for fold in map(int, spec["files"]):
            net = self.nets[m, fold]
            parts = [
                predict_batch(net, spec, images[i : i + batch], self.device, self.views[m])
                for i in range(0, len(images), batch)
            ]
            out[fold] = np.concatenate(parts)
        return out

    def predict(self, paths: list) -> np.ndarray:
        """Class probabilities (N, K) of ``paths``: the runs' test predictions, row for row."""
        manifest, chunks = self.manifest, []
        started, done = time.perf_counter(), 0
        for start in range(0, len(paths), CHUNK):
            part = paths[start : start + CHUNK]
            decoded = self._decoded(part)
            per_model = {m: self._model_folds(m, decoded) for m in range(len(manifest["models"]))}
            total = 0.0
            for group in manifest["groups"]:
                folds = [evaluate(group["node"], fold, per_model) for fold in group["folds"]]
                total = total + group["weight"] * np.mean(folds, axis=0)
            chunks.append(total)
            done += len(part)
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"{done}/{len(paths)} images, {rate:.1f} img/s", file=sys.stderr, flush=True)
        return np.concatenate(chunks)


# -- 5. the test table and the submission (as competition/data.py, competition/submission.py) ----


def read_csv(path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: {what} not found. Pass its path (see --help).")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_table(manifest: dict, images: str, sample_csv=None, test_csv=None):
    """(ids, paths, sample submission or None) of the test images, as the repository lists them."""
    comp = manifest["competition"]
    folder = Path(images).resolve()
    if not folder.is_dir():
        raise BundleError(f"{folder}: image folder not found. Pass it with --images.")
    if comp["layout"] == "folders":
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise BundleError(f"{folder}: no images in the test folder")
        return [str(p.relative_to(folder)) for p in paths], paths, None
    id_column = comp["id_column"]
    sample = read_csv(sample_csv, "sample submission") if sample_csv else None
    if sample is not None and id_column not in sample.columns:
        raise BundleError(f"{sample_csv}: no column '{id_column}'; is it this competition's?")
    if test_csv:
        table = read_csv(test_csv, "test CSV")
        if id_column not in table.columns:
            raise BundleError(f"{test_csv}: no column '{id_column}'; is it this competition's?")
        ids = list(table[id_column])
    elif sample is not None:
        ids = list(sample[id_column])
    else:
        raise BundleError("pass --sample-submission (or --test-csv) to list the test ids")
    paths, missing = [], []
    for row, image_id in enumerate(ids):
        path = Path(os.path.normpath(folder / comp["image_pattern"].format(id=image_id)))
        if not path.is_relative_to(folder):
            raise BundleError(f"row {row + 2}: id {image_id!r} resolves outside {folder}")
        if not path.is_file():
            missing.append(str(path))
        paths.append(path)
    if missing:
        raise BundleError(
            f"{len(missing)} test image(s) not found, e.g. {missing[0]}. Check --images."
        )
    return ids, paths, sample


def build_submission(manifest: dict, ids: list, probs: np.ndarray, sample) -> pd.DataFrame:
    """One row per test id: the label, or one probability per class; the sample's columns/order."""
    comp, classes = manifest["competition"], manifest["classes"]
    id_column = comp["id_column"]
    if comp["submission_format"] == "probabilities":
        frame = pd.DataFrame(probs, columns=classes)
        frame.insert(0, id_column, ids)
    else:
        label_column = comp["label_column"]
        if sample is not None and len(sample.columns) == 2:
            label_column = next(c for c in sample.columns if c != id_column)
        labels = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
        frame = pd.DataFrame({id_column: ids, label_column: labels})
    if sample is not None:
        frame = frame.set_index(id_column).reindex(sample[id_column]).reset_index()
        missing = [c for c in sample.columns if c not in frame.columns]
        if missing:
            raise BundleError(f"sample submission columns {missing} are not produced")
        frame = frame[list(sample.columns)]
    if frame.isna().any().any():
        rows = frame.index[frame.isna().any(axis=1)][:3].tolist()
        raise BundleError(f"submission rows {rows} have no test image; check --test-csv")
    return frame


def write_csv(frame: pd.DataFrame, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def load_manifest(folder: Path = HERE) -> dict:
    path = folder / "bundle.json"
    if not path.is_file():
        raise BundleError(f"{path}: missing; predict.py runs from inside an exported bundle")
    return json.loads(path.read_text())


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of the test images")
    parser.add_argument("--sample-submission", help="sample_submission.csv (Kaggle layout)")
    parser.add_argument("--test-csv", help="a CSV listing the test ids (default: the sample's)")
    parser.add_argument("--out", default="submission.csv", help="submission CSV to write")
    parser.add_argument("--probs", help="also write id + one probability per class here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--batch-size", type=int, help="images per forward pass")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest()
        made = manifest.get("packages", {})
        for name, version in (("timm", timm.__version__), ("torch", torch.__version__)):
            if made.get(name) and made[name].split("+")[0] != version.split("+")[0]:
                print(
                    f"note: bundle made with {name} {made[name]}, running {version}: "
                    "predictions may differ slightly",
                    file=sys.stderr,
                )
        ids, paths, sample = test_table(
            manifest, args.images, args.sample_submission, args.test_csv
        )
        started = time.perf_counter()
        predictor = Predictor(manifest, select_device(args.device), args.batch_size)
        probs = predictor.predict(paths)
        seconds = time.perf_counter() - started
        frame = build_submission(manifest, ids, probs, sample)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_csv(frame, args.out)
    if args.probs:
        table = pd.DataFrame(probs, columns=manifest["classes"])
        table.insert(0, manifest["competition"]["id_column"], ids)
        write_csv(table, args.probs)
    per_1000 = seconds / max(len(paths), 1) * 1000
    folds = sum(len(s["files"]) for s in manifest["models"])
    print(
        f"{len(paths)} images, {folds} fold model(s), {seconds:.1f} s "
        f"({per_1000:.1f} s per 1,000 images on {predictor.device}); wrote {args.out}"
    )
    return 0 if math.isfinite(probs.sum()) else 1


if __name__ == "__main__":
    sys.exit(main())
